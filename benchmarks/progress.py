"""The one-line progress bar fused-lora-bench draws on stderr while it runs."""
from __future__ import annotations

import sys


class Progress:
    """A one-line progress bar on stderr; nothing when stderr is not a terminal or when disabled."""

    def __init__(self, total: int, *, enabled: bool = True, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0 and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.done, self.width = total, 0, width

    def step(self, label: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 80) + "\r")
            self.stream.flush()
