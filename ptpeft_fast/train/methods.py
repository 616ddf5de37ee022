"""The methods a multi-run experiment compares: each a row label and the config overrides that
make a run that method (the stage budgets come from the config)."""
from __future__ import annotations

__all__ = ["METHODS", "SEED_FREE"]

_SINGLE = ["eval.zero_shot=false", "eval.after_each_stage=false"]
METHODS: dict[str, tuple[str, list[str]]] = {
    "pretrained": ("pre-trained (random head)", ["stage1.enabled=false", "stage2.enabled=false",
                                                 "eval.zero_shot=true"]),
    # generation: the untouched model; greedy decoding makes every seed give the same row, so an
    # experiment runs it for its first seed only
    "zero-shot": ("Zero-shot", ["stage1.enabled=false", "stage2.enabled=false", "eval.zero_shot=true"]),
    "linear-probe": ("Linear probe", ["stage1.enabled=false", "stage2.enabled=true", "stage2.method=head", *_SINGLE]),
    "prefix": ("Prefix", ["stage1.enabled=true", "stage2.enabled=false", *_SINGLE]),
    "lora": ("LoRA", ["stage1.enabled=false", "stage2.enabled=true", "stage2.method=lora", *_SINGLE]),
    "adapter": ("Adapter", ["stage1.enabled=false", "stage2.enabled=true", "stage2.method=adapter", *_SINGLE]),
    "full": ("Full FT", ["stage1.enabled=false", "stage2.enabled=true", "stage2.method=full", *_SINGLE]),
    "pt-lora": ("PT-LoRA", ["stage1.enabled=true", "stage2.enabled=true", "stage2.method=lora", *_SINGLE]),
    "pt-adapter": ("PT-Adapter", ["stage1.enabled=true", "stage2.enabled=true", "stage2.method=adapter", *_SINGLE]),
    "pt-full": ("PT-Full", ["stage1.enabled=true", "stage2.enabled=true", "stage2.method=full", *_SINGLE]),
}
SEED_FREE = frozenset({"zero-shot"})
