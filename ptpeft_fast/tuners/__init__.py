"""The trainable modules PT-PEFT adds: prefixes, LoRA, bottleneck adapters."""
from .adapter import BottleneckAdapter
from .lora import LoraWeights
from .prefix import GlobalPrefixMLP, LayerPrefix

__all__ = ["BottleneckAdapter", "GlobalPrefixMLP", "LayerPrefix", "LoraWeights"]
