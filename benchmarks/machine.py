"""Machine description for benchmark reports: CPU model, cores, torch version, load."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> dict:
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except Exception:  # pragma: no cover
        tf = None
    try:
        import peft

        pv = peft.__version__
    except Exception:  # pragma: no cover
        pv = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": tf,
        "peft_version": pv,
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
    }
