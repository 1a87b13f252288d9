"""How every line fused-lora-bench prints is laid out: the width, wrapped prose."""
from __future__ import annotations

import textwrap

# Every line fused-lora-bench prints fits this many columns: tables wider than it are split into
# several tables that repeat their key columns, prose is wrapped.
WIDTH = 120


def wrap(text: str, indent: str = "", *, subsequent: str | None = None, width: int = WIDTH) -> str:
    """text wrapped to width columns: the first line after ``indent``, the others after ``subsequent``
    (indent plus two spaces by default). Words longer than a line (paths) are not broken."""
    return textwrap.fill(text, width, initial_indent=indent,
                         subsequent_indent=indent + "  " if subsequent is None else subsequent,
                         break_long_words=False, break_on_hyphens=False)
