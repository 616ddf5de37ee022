"""ptpeft_fast: fast two-stage prefix-tuned PEFT (PT-PEFT) for Hugging Face transformers."""
__version__ = "0.1.0"
