"""Interoperability: PEFT checkpoints in and out, and plain merged Hugging Face checkpoints."""
from .merged import load_static_prefix, save_merged
from .peft import PeftInteropError, from_peft, to_peft

__all__ = ["PeftInteropError", "from_peft", "load_static_prefix", "save_merged", "to_peft"]
