import json
import os
import zlib

import pytest

# Triton kernels run on CPU tensors in the interpreter; this must be set before triton is imported.
# A GPU run sets TRITON_INTERPRET=0 itself (tools/gpu_check.py): the kernels then compile for CUDA.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARD_ENV = "PTPEFT_TEST_SHARD"  # "i/n": run every n-th collected test from the i-th (parallel GPU runs)
CONFIG_LOG_ENV = "PTPEFT_TRITON_CONFIG_LOG"  # file: the autotune configs the compiled tests launched


def pytest_collection_modifyitems(config, items):
    """Keep one shard of the collected tests when ``PTPEFT_TEST_SHARD=i/n`` is set.

    Round-robin over the collection order, so that each shard gets a share of every module's
    expensive parameters; tools/gpu_check.py runs the n shards at once to compile kernels on n cores.
    """
    spec = os.environ.get(SHARD_ENV)
    if not spec:
        return
    i, n = (int(x) for x in spec.split("/"))
    if not 0 <= i < n:
        raise pytest.UsageError(f"{SHARD_ENV}={spec!r}: need 0 <= i < n")
    keep = [it for k, it in enumerate(items) if k % n == i]
    dropped = [it for k, it in enumerate(items) if k % n != i]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def _compiled_triton() -> bool:
    """Triton compiles for a CUDA device in this process (not its CPU interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    import torch

    return torch.cuda.is_available()


def _autotuners() -> list:
    """Every ``@triton.autotune`` kernel of ptpeft_fast.kernels, found by type (the list changes with the kernels)."""
    from triton.runtime.autotuner import Autotuner

    from ptpeft_fast.kernels import adapter, lora, prefix_attention

    found = []
    for obj in (o for mod in (prefix_attention, lora, adapter) for o in vars(mod).values()):
        for _ in range(4):  # through @triton.heuristics and other wrappers that keep the kernel in .fn
            if isinstance(obj, Autotuner) or callable(obj) and type(obj).__name__ == "function":
                break
            obj = getattr(obj, "fn", None)
        if isinstance(obj, Autotuner) and all(obj is not f for f in found):
            found.append(obj)
    return found


_configs_used: set = set()


@pytest.fixture(autouse=True)
def one_autotune_config(request):
    """With compiled Triton on a GPU: every kernel launch in a test uses ONE autotune config, no timing.

    Autotuning would compile and time every config per shape key (minutes over the suite) and check
    only the winner's output. Instead each test picks, by a hash of its id, one of the configs the
    kernel's own shared-memory pruner keeps, so the suite's outputs check every kept config somewhere
    against the float64 reference. No-op in the interpreter (one config there already).
    """
    if not _compiled_triton():
        yield
        return
    pick_at = zlib.crc32(request.node.nodeid.encode())
    saved = []
    for tuner in _autotuners():
        saved.append((tuner, tuner.early_config_prune, tuner.cache))
        name = getattr(tuner, "base_fn", tuner.fn).__name__

        def prune(cfgs, nargs, *args, __orig=tuner.early_config_prune, __name=name, **kwargs):
            kept = list(__orig(cfgs, nargs, *args, **kwargs)) if __orig else list(cfgs)
            pick = kept[pick_at % len(kept)]
            _configs_used.add((__name, str(pick)))
            return [pick]

        tuner.early_config_prune = prune
        tuner.cache = {}
        # Triton 3.6 times even a single remaining config; 3.9 does not. Nothing to time here.
        tuner._bench = lambda *a, **k: [0.0, 0.0, 0.0]
    try:
        yield
    finally:
        for tuner, prune_fn, cache in saved:
            tuner.early_config_prune = prune_fn
            tuner.cache = cache
            tuner.__dict__.pop("_bench", None)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(CONFIG_LOG_ENV)
    if path and _configs_used:
        with open(path, "a", encoding="utf-8") as f:
            for kernel, cfg in sorted(_configs_used):
                f.write(json.dumps({"kernel": kernel, "config": cfg}) + "\n")
