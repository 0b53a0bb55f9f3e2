"""``python -m sam_fast.bench``: the benchmark CLI (same as ``sam-fast-bench``)."""

import sys

from .cli import main

sys.exit(main())
