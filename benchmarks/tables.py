"""The terminal tables of fused-lora-bench: format_table, and the tables built from the rows of benchmarks.runs."""
from __future__ import annotations

import math

from . import sweep as sw
from .layout import WIDTH, wrap
from .rows import HostOverhead, MeasuredRow, ModeledRow, SavedBytesRow, ratio
from .sweep import PROVIDERS

MiB = 2**20


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


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# The row labels every per-point table starts with (format_table repeats them when it splits a table).
POINT_HEADERS = ["shape", "tokens", "r", "p", "dtype", "provider"]


def _point_labels(row: MeasuredRow | SavedBytesRow) -> list:
    p = row.point
    return [p.shape, p.tokens, p.r, p.dropout, SHORT_DTYPES.get(p.dtype, p.dtype), row.provider]


def _short_dtypes(text: str) -> str:
    """'bfloat16(8192, 16); bool(8192, 4096)' -> 'bf16(8192, 16); bool(8192, 4096)'."""
    for name, short in SHORT_DTYPES.items():
        text = text.replace(f"{name}(", f"{short}(")
    return text


def _num(v: float) -> str:
    """3 significant digits, without the exponent .3g gives from 1000 on."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _ms(row: MeasuredRow, direction: str) -> str:
    t = row.timings.get(direction)
    if t is None:
        return (row.error or "-")[:20] if direction == "fwd" else "-"
    return f"{_num(t.ms)} [{_num(t.p20)}-{_num(t.p80)}]"


def _x(v):
    return f"{v:.2f}x" if v is not None else "-"


def _mib(v):
    return v / MiB if v is not None else None


def measured_times_table(rows: list[MeasuredRow]) -> str:
    """Median [p20-p80] ms of each direction, one row per point and provider."""
    return format_table(POINT_HEADERS + ["fwd ms [p20-p80]", "bwd ms [p20-p80]", "fwd+bwd ms [p20-p80]"],
                        [_point_labels(r) + [_ms(r, "fwd"), _ms(r, "bwd"), _ms(r, "fwd+bwd")] for r in rows],
                        keys=len(POINT_HEADERS))


def measured_ratios_table(rows: list[MeasuredRow], gpu: bool) -> str:
    """fwd+bwd TFLOP/s, time ratios to gemm / eager / peft, saved (and on a GPU, peak) MiB: the same rows."""
    headers = POINT_HEADERS + ["fwd+bwd TFLOP/s", "fwd+bwd x gemm", "x eager", "x peft", "saved MiB"]
    if gpu:
        headers.append("peak MiB")
    out = []
    for r in rows:
        line = _point_labels(r) + [r.tflops("fwd+bwd"), _x(r.ratio_to("fwd+bwd", "gemm")),
                                   _x(r.ratio_to("fwd+bwd", "eager")), _x(r.ratio_to("fwd+bwd", "peft")),
                                   _mib(r.saved_bytes)]
        if gpu:
            line.append(_mib(r.peak_mem_bytes))
        out.append(line)
    return format_table(headers, out, keys=len(POINT_HEADERS))


def saved_table(rows: list[SavedBytesRow]) -> str:
    return format_table(
        POINT_HEADERS + ["saved MiB", "bytes/token", "x fused", "saved tensors"],
        [_point_labels(r) + [r.saved_bytes / MiB, int(r.saved_bytes_per_token), _x(r.ratio_to_fused),
                             _short_dtypes(r.saved_tensors)] for r in rows],
        keys=len(POINT_HEADERS))


def modeled_detail_table(rows: list[ModeledRow]) -> str:
    headers = ["provider", "direction", "launches", "GFLOP", "HBM MiB", "modeled us", "modeled TFLOP/s",
               "modeled x gemm", "modeled x eager"]
    return format_table(headers, [[r.provider, r.direction, len(r.launches), r.gflop, r.hbm_mib, r.us, r.tflops,
                                   _x(r.ratio_to["gemm"]), _x(r.ratio_to["eager"])] for r in rows],
                        keys=2)


def modeled_summary_table(rows: list[ModeledRow], r_: int, dropout: float, dtype: str, *,
                          at_efficiency: bool = False) -> str:
    """fwd+bwd per shape and token count: modeled us of each provider and fused's modeled speed-ups.

    at_efficiency: the second table's times (TRITON_GEMM_EFFICIENCY on Triton launches) instead of the
    ideal ones. A time is marked * where the provider's measured host time per layer exceeds it (host-bound).
    """
    sel = [r for r in rows if r.point.r == r_ and r.point.dropout == dropout and r.point.dtype == dtype
           and r.direction == "fwd+bwd"]
    providers = [p for p in PROVIDERS if any(r.provider == p for r in sel)]

    def key(r):
        return r.point.in_features, r.point.out_features, r.point.tokens

    def us(r: ModeledRow) -> float:
        return r.us_at_efficiency if at_efficiency else r.us

    def cell(r: ModeledRow | None):
        if r is None:
            return None
        host_bound = r.host_us is not None and r.host_us > us(r)
        return f"{_cell(us(r))}*" if host_bound else us(r)

    def gemm_ratio(r: ModeledRow) -> float | None:
        return (r.ratio_to_at_efficiency if at_efficiency else r.ratio_to).get("gemm")

    keys = sorted({key(r) for r in sel},
                  key=lambda k: (sw.MODEL_SHAPES.index(k[:2]) if k[:2] in sw.MODEL_SHAPES else 99, k))
    table = []
    for K, N, M in keys:
        at = {r.provider: r for r in sel if key(r) == (K, N, M)}
        fused = at.get("fused")
        speedups = [_x(ratio(us(at[p]), us(fused))) if fused and p in at else "-" for p in ("eager", "addmm")]
        table.append([f"{K}->{N}", M] + [cell(at.get(p)) for p in providers]
                     + speedups + [_x(gemm_ratio(fused)) if fused else "-"])
    headers = ["shape", "tokens"] + [f"{p} us" for p in providers] + ["eager/fused", "addmm/fused", "fused/gemm"]
    return format_table(headers, table, keys=2)


def launch_lines(rows: list[ModeledRow]) -> str:
    """Each modeled launch of the fwd and bwd rows (fwd+bwd is the two lists one after the other)."""
    from . import roofline

    out = []
    for r in rows:
        if r.direction == "fwd+bwd":
            continue
        gpu = roofline.GPUS[r.gpu]
        out.append(f"  {r.provider} {r.direction} (modeled):")
        for launch in r.launches:
            occupancy = (f"occupancy {1 / launch.wave_factor(gpu):4.2f}, {launch.waves(gpu)} wave(s)"
                         if launch.programs is not None else " " * 14)
            out.append(f"    {launch.name:<28} {launch.flops / 1e9:9.3f} GFLOP {launch.bytes / 2**20:9.2f} MiB  "
                       f"{occupancy}".rstrip())
            if launch.detail:
                out.append(wrap(launch.detail, " " * 6))
    return "\n".join(out)


def host_table(result: HostOverhead) -> str:
    return format_table(
        ["dropout", "fused us", "eager us", "fused/eager", "fused median us", "eager median us", "launches/call",
         "rounds"],
        [[r.dropout, r.fused_us, r.eager_us, f"{r.ratio:.2f}x", r.fused_median_us, r.eager_median_us,
          r.launches_per_call, r.rounds] for r in result.rows], keys=1)
