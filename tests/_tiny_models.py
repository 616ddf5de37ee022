"""Tiny Hugging Face models built from configs, saved and loaded back (no hub access).

Shared by the interop / trainer / hardening tests. Each model directory is written once
per test session (``functools.lru_cache``) and every call returns a fresh model loaded
through ``from_pretrained``, the real loading path.
"""
from __future__ import annotations

import functools
import tempfile

import torch

VOCAB = 100


@functools.cache
def model_dir(kind: str) -> str:
    """Directory of a saved tiny model: ``"llama"`` (GQA 4/2 heads, RoPE), ``"gpt2"`` (Conv1D, wpe) or ``"blip2"``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gen = torch.random.get_rng_state()
    torch.manual_seed(1234)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg)
    elif kind == "blip2":  # the project's tiny-blip2 (vision + Q-Former + OPT), random init
        from ptpeft_fast.models.tiny_blip2 import build_tiny_blip2

        model, _ = build_tiny_blip2(seed=0)
    elif kind == "gpt2":
        # no dropout: train-mode gradients compare
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                         eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    torch.random.set_rng_state(gen)
    path = tempfile.mkdtemp(prefix=f"ptpeft_tiny_{kind}_")
    model.save_pretrained(path)
    return path


def load(kind: str = "llama"):
    """A fresh tiny model of ``kind`` in eval mode."""
    from transformers import AutoModelForCausalLM, Blip2ForConditionalGeneration

    cls = Blip2ForConditionalGeneration if kind == "blip2" else AutoModelForCausalLM
    return cls.from_pretrained(model_dir(kind)).eval()


def blip2_inputs(model, seed: int = 0) -> dict:
    """Images, image placeholder tokens + text, and a mask for the tiny BLIP-2."""
    g = torch.Generator().manual_seed(seed)
    n_q = model.config.num_query_tokens
    ids = torch.cat([torch.full((2, n_q), model.config.image_token_index),
                     torch.randint(5, 20, (2, 5), generator=g)], 1)
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def batch(seed: int = 0, b: int = 2, length: int = 6, pad: str = "left"):
    """``(input_ids, attention_mask)`` with two padding tokens in the second row.

    ``pad="right"`` for comparisons with PEFT's prefix tuning under ``positions="shift"``:
    without ``position_ids`` PEFT numbers a left-padded row's tokens from the first pad
    (P + 2.., the KV-cache convention of a plain forward), while a patched model numbers real
    tokens from the attention mask (P + 0.., as ``generate`` does). With right padding the two
    agree on every real token; compare the logits there (:func:`real`).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    if b > 1:
        if pad == "left":
            mask[1, :2] = 0
        else:
            mask[1, -2:] = 0
    return ids, mask


def real(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``out [B, L, ...]`` at real (unpadded) tokens."""
    return out[mask.bool()]


def logits(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def randomize(model, *substrings: str, std: float = 0.5, seed: int = 0) -> None:
    """Give parameters whose names contain any of ``substrings`` random values (e.g. LoRA B, zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in substrings):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def greedy_by_forward(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding of one unpadded row ``ids [1, L]`` by full forward passes (no KV cache):
    the argmax of the last position's logits, appended ``steps`` times; returns ``[1, L + steps]``.

    The oracle for ``generate``: it needs nothing but the model's forward pass, so it does not move
    when a peer's (or transformers') cache handling changes.
    """
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq
