"""Model loading (built-in ``tiny-blip2`` or any local HF LMM directory) and the
collate function that turns records into model inputs."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .tiny_blip2 import build_processor, build_tiny_blip2, build_tokenizer

__all__ = ["build_tiny_blip2", "build_tokenizer", "build_processor", "load_local_model",
           "MMCollator", "render_prompt"]


def load_local_model(path: str, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """Load an image-text model and its processor from a local directory (never the hub)."""
    from transformers import AutoConfig, AutoProcessor

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.name: {path!r} is neither 'tiny-blip2' nor a local model folder")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    kw = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = dtype
    errors = []
    import transformers
    for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(path, **kw)
            break
        except ValueError as e:  # this auto class does not know the model_type
            errors.append(f"{auto}: {e}")
    else:
        raise ValueError(f"{path}: no image-text model class for model_type {cfg.model_type!r}: {errors}")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def render_prompt(template: str, question: str) -> str:
    """Fill the prompt template (``{question}`` is the VQA question; captioning templates
    usually have no field)."""
    return template.format(question=question) if "{question}" in template else template


class MMCollator:
    """Batch ``(record, image[, target])`` items with the model's own processor.

    Uses left padding throughout, so the target tokens are the last tokens of each row in
    training mode and generation continues from the right edge in generation mode.
    Labels are -100 everywhere except the target tokens (and the EOS after them).
    """

    def __init__(self, processor: Any, prompt_template: str, train: bool, max_length: int | None = None):
        self.processor = processor
        self.tok = getattr(processor, "tokenizer", processor)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:  # e.g. LLaMA tokenizers
            self.tok.pad_token = self.tok.eos_token
        self.template = prompt_template
        self.train = train
        self.max_length = max_length

    def _len(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    def __call__(self, items: Sequence[tuple]) -> dict:
        recs = [it[0] for it in items]
        images = [it[1] for it in items]
        prompts = [render_prompt(self.template, r.question) for r in recs]
        if self.train:
            targets = [it[2] if len(it) > 2 and it[2] is not None else r.train_target() for it, r in zip(items, recs)]
            texts = [f"{p} {t}{self.tok.eos_token}" if p else f"{t}{self.tok.eos_token}"
                     for p, t in zip(prompts, targets)]
        else:
            texts = prompts
        enc = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        batch = dict(enc)
        if self.train:
            ids = batch["input_ids"]
            labels = torch.full_like(ids, -100)
            for i, (p, t) in enumerate(zip(prompts, texts)):
                n = self._len(t) - self._len(p)  # target + EOS tokens, right-aligned (left padding)
                labels[i, ids.shape[1] - n:] = ids[i, ids.shape[1] - n:]
            batch["labels"] = labels
        batch["record_ids"] = [r.id for r in recs]
        return batch
