"""python -m fused_lora.benchmarks: the same as the fused-lora-bench command."""
import sys

from .cli import main

sys.exit(main())
