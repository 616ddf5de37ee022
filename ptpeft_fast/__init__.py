"""ptpeft_fast: fast two-stage prefix-tuned PEFT (PT-PEFT) for Hugging Face transformers.

    import ptpeft_fast as pf
    pf.patch(model, pf.PTPeftConfig())     # prefix + LoRA in the language component
    pf.set_stage(model, "prefix")          # stage 1: only the prefix trains
    ...
    pf.set_stage(model, "peft")            # stage 2: LoRA/Adapter (+ prefix) train
    pf.save(model, "ckpt/")
"""
from ._sources import install_checkout_finder
from .version import __version__  # noqa: F401 (ptpeft_fast.__version__)

install_checkout_finder()  # ptpeft_fast.kernels from an uninstalled checkout (see _sources)

from .architectures import supported_model_types
from .checkpoint import load, load_prefix, save
from .config import AdapterConfig, LoraConfig, PrefixConfig, PTPeftConfig
from .disable import disabled
from .interop import PeftInteropError, from_peft, load_static_prefix, save_merged, to_peft
from .merging import merge, unmerge
from .optimizer_guard import StaleOptimizerError
from .patching import patch, unpatch
from .stages import mark_trainable, parameter_groups, present_parameters, set_stage, trainable_parameters

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "PeftInteropError",
    "PTPeftConfig",
    "PrefixConfig",
    "StageCallback",
    "StaleOptimizerError",
    "disabled",
    "from_peft",
    "load",
    "load_prefix",
    "load_static_prefix",
    "mark_trainable",
    "merge",
    "parameter_groups",
    "patch",
    "present_parameters",
    "save",
    "save_merged",
    "set_stage",
    "supported_model_types",
    "to_peft",
    "trainable_parameters",
    "unmerge",
    "unpatch",
]


def __getattr__(name: str):
    # StageCallback imports transformers' Trainer stack (about 1.5 s): only when asked for
    if name == "StageCallback":
        from .trainer_callback import StageCallback

        return StageCallback
    raise AttributeError(f"module 'ptpeft_fast' has no attribute {name!r}")
