"""``python -m ptpeft_fast.train``."""
from .cli import console

console()
