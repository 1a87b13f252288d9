"""Terminal tables, the progress bar, the CSV / JSON files and the PNG plots."""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
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


def format_table(headers: list[str], rows: list[list], *, indent: str = "  ") -> str:
    """Aligned plain text: text columns left-aligned, numeric columns right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_is_number(row[i]) for row in cells) for i in range(len(headers))]

    def line(values):
        return indent + "  ".join(v.rjust(w) if num else v.ljust(w)
                                  for v, w, num in zip(values, widths, numeric)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


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


def git_commit() -> tuple[str, bool | None]:
    """(HEAD of the checkout this package runs from, whether the tree has changes); ("unknown", None)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


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


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ratio_to_gemm(out: Path, series: dict, *, title: str, ylabel: str) -> list[Path]:
    """One PNG per shape: ratio to gemm against tokens, a line per provider, a panel per direction.

    series: {shape: {direction: {provider: [(tokens, ratio), ...]}}}
    """
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for shape, by_direction in series.items():
        fig, axes = plt.subplots(1, len(by_direction), figsize=(5 * len(by_direction), 4), squeeze=False)
        for ax, (direction, by_provider) in zip(axes[0], by_direction.items()):
            for i, (provider, pts) in enumerate(by_provider.items()):
                pts = sorted(pts)
                # Distinct markers and dashes: eager and peft often coincide exactly.
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="osv^D"[i % 5], markersize=8 - 1.5 * (i % 3),
                        linestyle=("-", "--", ":", "-.")[i % 4], label=provider)
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(direction)
            ax.legend()
        fig.suptitle(f"{title}\n{shape}")
        fig.tight_layout()
        path = out / f"ratio_to_gemm_{shape.replace('->', 'x')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_saved_bytes(out: Path, bars: dict, *, title: str) -> list[Path]:
    """bars: {group label: {provider: MiB}} -> saved_bytes.png, grouped bars."""
    plt = _pyplot()
    if plt is None or not bars:
        return []
    groups = list(bars)
    providers = []
    for by_provider in bars.values():
        providers += [p for p in by_provider if p not in providers]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.3 * len(groups) * len(providers))), 4.5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [bars[g].get(provider, 0) for g in groups], width, label=provider)
    ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("activation MiB saved for backward")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = out / "saved_bytes.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
