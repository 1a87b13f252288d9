"""The PNG plots: time ratio to gemm against tokens per shape, and saved-activation bytes per provider.

Need matplotlib (pip install 'fused_lora[plots]'); without it nothing is drawn and the run says so.
"""
from __future__ import annotations

from pathlib import Path

from . import sweep as sw
from .rows import MeasuredRow, ModeledRow, SavedBytesRow
from .sweep import DIRECTIONS


def pyplot():
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
    plt = pyplot()
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
    plt = pyplot()
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


def _headline_selection(rows: list[MeasuredRow] | list[ModeledRow]) -> tuple[int, float, str]:
    """(r, dropout, dtype) of the rows to plot: r = 16 and dropout 0 when swept, else the first row's."""
    first = rows[0].point
    r_ = sw.HEADLINE["r"] if any(r.point.r == sw.HEADLINE["r"] for r in rows) else first.r
    dropout = 0.0 if any(r.point.dropout == 0.0 for r in rows) else first.dropout
    return r_, dropout, first.dtype


def write_plots(out: Path, gpu: bool, measured: list[MeasuredRow], saved: list[SavedBytesRow],
                modeled: list[ModeledRow]) -> list[Path]:
    """ratio_to_gemm_<shape>.png (measured on a GPU; modeled in CPU mode) and saved_bytes.png."""
    written = []
    if gpu:
        rows, title, ylabel = measured, "measured on GPU: time / gemm time", "measured time / gemm time"
    else:
        rows = modeled
        gpu_name = modeled[0].gpu_name if modeled else "H100 SXM"
        title, ylabel = (f"MODELED {gpu_name} (not measured): modeled time / modeled gemm time",
                         "modeled time / gemm time")
    if rows:
        r_, dropout, dtype = _headline_selection(rows)
        series: dict = {}
        for row in rows:
            if (row.point.r, row.point.dropout, row.point.dtype) != (r_, dropout, dtype) or row.provider == "gemm":
                continue
            for direction in DIRECTIONS:
                if gpu:
                    value = row.ratio_to(direction, "gemm")
                elif row.direction == direction:
                    value = row.ratio_to.get("gemm")
                else:
                    continue
                if value is not None:
                    series.setdefault(row.point.shape, {}).setdefault(direction, {}).setdefault(
                        row.provider, []).append((row.point.tokens, value))
        written += plot_ratio_to_gemm(out, series, ylabel=ylabel, title=f"{title}, r={r_}, dropout {dropout}, {dtype}")
    if saved:
        bars: dict = {}
        for row in saved:
            bars.setdefault(f"{row.point.shape}\np={row.point.dropout}", {})[row.provider] = row.saved_bytes / 2**20
        first = saved[0].point
        title = (f"activation bytes saved for backward (measured, exact; meta tensors, dropout as on CUDA), "
                 f"{first.tokens} tokens, r={first.r}, {first.dtype}")
        written += plot_saved_bytes(out, bars, title=title)
    return written
