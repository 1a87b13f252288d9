"""The progress bar, table formatting, run metadata, and the CSV / JSON files."""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
from importlib import metadata as importlib_metadata
from pathlib import Path

MiB = 2**20


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


# Every line fused-lora-bench prints fits this many columns: tables wider than it are split into
# several tables that repeat their key columns, prose is wrapped.
WIDTH = 120


def wrap(text: str, indent: str = "", *, subsequent: str | None = None, width: int = WIDTH) -> str:
    """text wrapped to width columns: the first line after ``indent``, the others after ``subsequent``
    (indent plus two spaces by default). Words longer than a line (paths) are not broken."""
    return textwrap.fill(text, width, initial_indent=indent,
                         subsequent_indent=indent + "  " if subsequent is None else subsequent,
                         break_long_words=False, break_on_hyphens=False)


def format_table(headers: list[str], rows: list[list], *, indent: str = "  ", keys: int = 0,
                 width: int = WIDTH) -> str:
    """Aligned plain text: text columns left-aligned, numeric columns right-aligned.

    When a line would be wider than ``width``, the columns after the first ``keys`` (the row labels)
    are dealt out to several tables, each repeating the key columns and as many of the others as
    fit, separated by a blank line.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(row[i]) for row in cells) for i in range(len(headers))]

    def table(columns):
        def line(values):
            return indent + "  ".join(values[i].rjust(widths[i]) if numeric[i] else values[i].ljust(widths[i])
                                      for i in columns).rstrip()

        rule = indent + "  ".join("-" * widths[i] for i in columns)
        return "\n".join([line(headers), rule] + [line(r) for r in cells])

    def span(columns):
        return len(indent) + sum(widths[i] for i in columns) + 2 * (len(columns) - 1)

    key_columns = list(range(keys))
    groups: list[list[int]] = [[]]
    for i in range(keys, len(headers)):
        if groups[-1] and span(key_columns + groups[-1] + [i]) > width:
            groups.append([])
        groups[-1].append(i)
    return "\n\n".join(table(key_columns + group) for group in groups)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.1f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _is_number(text: str) -> bool:
    """Right-align a column whose cells all start with a number ("1.2", "3.4 [3.1-3.6]", "-")."""
    return text in ("", "-") or text.lstrip("-")[:1].isdigit()


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def git_commit(source: Path | None = None) -> tuple[str, bool | None]:
    """(HEAD of the git checkout this package runs from, whether its tracked files have changes).

    ("unknown", None) unless ``source`` (this file by default) is tracked by the enclosing checkout:
    a wheel installed into a venv that sits inside some other repository must not report that
    repository's commit. The current directory plays no part.
    """
    source = Path(__file__).resolve() if source is None else Path(source).resolve()

    def git(*args):
        return subprocess.run(["git", *args], cwd=source.parent, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", source.name)
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") != ""
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, dirty


def run_metadata(device, mode: str, argv: list[str]) -> dict:
    import torch

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    commit, dirty = git_commit()
    return {
        "mode": mode,
        "device": device_name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "fused_lora": _version("fused_lora"),
        "git_commit": commit,
        "git_dirty": dirty,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "command": " ".join(["fused-lora-bench"] + argv),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET", ""),
    }


_TAGS = ("mode", "device", "torch", "triton", "git_commit", "date_utc")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """Every row tagged with the run's device, versions, commit and date (CSVs get concatenated)."""
    tagged = [{**row, **{k: meta[k] for k in _TAGS}} for row in rows]
    fields: list[str] = []
    for row in tagged:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(tagged)


def write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")


def write_files(out: Path, meta: dict, *, measured: list[dict], saved: list[dict], modeled: list[dict],
                detailed, payload: dict) -> list[str]:
    """points.csv (measured), modeled.csv, saved_bytes.csv and points.json (all of it plus payload).

    The JSON lists each modeled fwd and bwd row's launches as [name, flops, bytes], plus the
    launch's tensors and grid where detailed(row) (the printed points: the detail is large).
    """
    json_modeled = []
    for row in modeled:
        clean = {k: v for k, v in row.items() if k != "_launches"}
        if row["direction"] != "fwd+bwd":  # fwd+bwd is the two lists one after the other
            clean["launches"] = [[launch.name, launch.flops, launch.bytes]
                                 + ([launch.detail] if detailed(row) else []) for launch in row["_launches"]]
        json_modeled.append(clean)
    write_csv(out / "points.csv", measured, meta)
    write_csv(out / "modeled.csv", [{k: v for k, v in row.items() if k != "_launches"} for row in modeled], meta)
    write_csv(out / "saved_bytes.csv", saved, meta)
    write_json(out / "points.json", {"metadata": meta, **payload, "measured": measured, "saved_bytes": saved,
                                     "modeled": json_modeled})
    return ["points.csv", "points.json", "modeled.csv", "saved_bytes.csv"]
