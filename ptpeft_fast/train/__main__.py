"""``python -m ptpeft_fast.train``."""
import sys

from . import main

sys.exit(main())
