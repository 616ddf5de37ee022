"""Caption pre-training of the built-in ``tiny-blip2`` on ``synthetic-shapes``, cached.

The demo needs a model that already "sees" (as a real BLIP-2 does) before PT-PEFT
adapts it to VQA.  The result is a normal HF folder (``save_pretrained`` of the model and
its ``Blip2Processor``) under the user cache directory, keyed by a hash of the recipe,
and reused by later runs.  It is written to a temporary folder and renamed, so an
interrupted pre-training never leaves a half-written model behind. This module holds the
recipes and where their results live; ``runner.ensure_tiny_pretrained`` trains one (it is a
run like any other).
"""
from __future__ import annotations

import hashlib
import json
import os

from ..models.tiny_blip2 import DEFAULT_SIZE

RECIPES = {
    # lr 1e-3: at 3e-3 the tiny LM locks onto the caption prior and never uses the image
    "full": {"n_train": 2000, "steps": 800, "batch_size": 32, "lr": 1e-3, "seed": 0},
    # quick: a smoke-test budget; the tiny model starts to use the image only after
    # ~10k captions, so --quick reuses the full recipe's model whenever it is cached
    "quick": {"n_train": 600, "steps": 150, "batch_size": 16, "lr": 1e-3, "seed": 0},
}
RECIPE_VERSION = 3  # 2-3: vision tower, query tokens and Q-Former initialised so the image is seen


def recipe_path(name: str, cache: str | None = None) -> str:
    """Cache folder of recipe ``name`` (exists only once pre-training has finished)."""
    from .checkpointing import cache_dir
    r = {**RECIPES[name], "size": DEFAULT_SIZE, "v": RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache or cache_dir(), f"tiny-blip2-{name}-{key}")
