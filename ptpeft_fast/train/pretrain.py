"""Caption pre-training of the built-in ``tiny-blip2`` on ``synthetic-shapes``, cached.

The demo needs a model that already "sees" (as a real BLIP-2 does) before PT-PEFT
adapts it to VQA.  The result is a normal HF folder (``save_pretrained`` of the model and
its ``Blip2Processor``) under the user cache directory, keyed by a hash of the recipe,
and reused by later runs.  It is written to a temporary folder and renamed, so an
interrupted pre-training never leaves a half-written model behind. The pre-training is a
captioning run like any other (:class:`~.runner.Run` with :class:`~.generation.GenerationTask`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

from ..cache import cache_dir
from ..models.tiny_blip2 import DEFAULT_SIZE
from . import run_folder
from .config import load_config
from .generation import GenerationTask
from .runner import Run

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
    r = {**RECIPES[name], "size": DEFAULT_SIZE, "v": RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache or str(cache_dir()), f"tiny-blip2-{name}-{key}")


def ensure_tiny_pretrained(name: str = "full", cache: str | None = None,
                           log: Callable[[str], None] = print, progress: bool = True) -> str:
    """Path of the caption-pretrained tiny-blip2 for recipe ``name``; trains it if absent."""
    final = recipe_path(name, cache)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    r = RECIPES[name]
    log(f"pre-training tiny-blip2 on synthetic-shapes captions ({name} recipe, {r['steps']} steps); "
        f"cached at {final}")
    work = f"{final}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(None, [
        "model.name=tiny-blip2", "model.pretrained=false", "data.task=caption",
        f"data.train.n={r['n_train']}", "data.val.n=100", "stage1.enabled=false",
        "stage2.method=full", f"stage2.max_steps={r['steps']}", f"stage2.batch_size={r['batch_size']}",
        f"stage2.lr={r['lr']}", "stage2.warmup_ratio=0.05", "eval.zero_shot=false", "eval.spectrum=false",
        "eval.use_java=false", "eval.max_new_tokens=12", f"train.seed={r['seed']}", "train.log_every=50",
        f"train.progress={str(progress).lower()}",
        # the tiny model's ops are too small to gain from intra-op threads; one thread avoids
        # the thread hand-off cost (and is far faster on a busy machine)
        "train.num_threads=1",
    ])
    run = Run(cfg, os.path.join(work, "run"), GenerationTask("caption"), log=log)
    run.execute()
    model_dir = os.path.join(work, "model")
    run.model.save_pretrained(model_dir)
    run.processor.save_pretrained(model_dir)
    shutil.copy(os.path.join(work, "run", run_folder.RESULTS), os.path.join(model_dir, "pretrain_results.md"))
    if os.path.exists(final):  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
        return final
    os.replace(model_dir, final)
    shutil.rmtree(work, ignore_errors=True)
    return final
