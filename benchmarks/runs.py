"""The three parts of a run: measured timings, saved-activation bytes, the modeled H100 table.

Each returns typed rows (benchmarks.rows): one per (point, provider), per direction too for the model.
"""
from __future__ import annotations

import contextlib

from . import sweep as sw
from .rows import MeasuredRow, ModeledRow, SavedBytesRow, Timing, ratio, ratios_to_references
from .sweep import DIRECTIONS, Point, Sweep


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _where(point: Point) -> str:
    return f"{point.shape} M={point.tokens} r={point.r} p={point.dropout} {point.dtype}"


# ---------------------------------------------------------------------------------------------
# 1. Measured
# ---------------------------------------------------------------------------------------------

def run_measured(points: list[Point], providers: tuple[str, ...], device, progress, warnings) -> list[MeasuredRow]:
    """Time each provider at each point; saved bytes and (GPU) peak memory alongside.

    GPU: one provider after another, do_bench per direction. CPU: every provider and direction of a
    point timed side by side in shuffled rounds (measure.time_cpu_interleaved), so their ratios, and
    fwd + bwd against fwd+bwd, share the same load.
    """
    import torch

    from . import measure
    from .providers import BUILDERS, Params, fused_cpu_path, make_input

    gpu = device.type == "cuda"
    kind = "measured-gpu" if gpu else "measured-cpu"
    rows = []
    for point in points:
        params = Params.make(point, device)
        x, dy = make_input(point, device)
        by_provider, fns, grads = {}, {}, {}
        for provider in providers:
            progress.step(f"measure {provider} {_where(point)}")
            row = by_provider[provider] = MeasuredRow(kind, point, provider)
            try:
                with contextlib.nullcontext() if gpu else fused_cpu_path():
                    layer = BUILDERS[provider](params)
                    saved = measure.saved_activation_bytes(layer, x)
                    row.saved_bytes = saved.activation_bytes
                    row.saved_tensors = "; ".join(saved.tensors)
                    grads[provider] = layer.trainable + [x]
                    if gpu:
                        # Before direction_fns: its retained graph must not be alive while measuring.
                        row.peak_mem_bytes = measure.peak_memory(layer, x, dy, grads[provider])
                        for direction, fn in measure.direction_fns(layer, x, dy).items():
                            _store_time(row, point, direction, *measure.time_gpu(fn, grads[provider]))
                    else:
                        fns[provider] = measure.direction_fns(layer, x, dy)
            except Exception as e:  # one failing provider (OOM at a big point) must not end the sweep
                if gpu and isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                row.error = _error_text(e)
                warnings.append(f"{provider} at {_where(point)}: {row.error}")
                fns.pop(provider, None)
            measure.clear_grads([x])
        if not gpu and fns:
            with fused_cpu_path():
                timed = measure.time_cpu_interleaved(
                    {(p, d): f[d] for p, f in fns.items() for d in DIRECTIONS},
                    {(p, d): grads[p] for p in fns for d in DIRECTIONS},
                    clock=measure.cpu_clock(torch.get_num_threads())[0])
            for (provider, direction), (stats, reps) in timed.items():
                _store_time(by_provider[provider], point, direction, stats, reps)
        del fns
        add_time_ratios(by_provider)
        rows += by_provider.values()
    return rows


def add_time_ratios(by_provider: dict[str, MeasuredRow]) -> None:
    """Each timing's ratio_to: its median over each reference provider's at the same point and direction."""
    for direction in DIRECTIONS:
        ratios = ratios_to_references({p: row.ms(direction) for p, row in by_provider.items()})
        for provider, row in by_provider.items():
            if direction in row.timings:
                row.timings[direction].ratio_to = ratios[provider]


def _store_time(row: MeasuredRow, point: Point, direction: str, stats, reps) -> None:
    from .measure import tflops

    med, p20, p80 = stats
    row.timings[direction] = Timing(med, p20, p80, tflops(point.useful_flops(row.provider, direction), med), reps)


# ---------------------------------------------------------------------------------------------
# 2. Saved bytes
# ---------------------------------------------------------------------------------------------

def saved_bytes_points(model_sweep: Sweep) -> list[Point]:
    """Where the saved-bytes table measures: every swept shape and dropout at 8192 tokens and r = 16
    (or the largest token count and the first rank swept). Saved bytes are linear in tokens."""
    tokens = sw.HEADLINE["tokens"] if sw.HEADLINE["tokens"] in model_sweep.tokens else max(model_sweep.tokens)
    r = sw.HEADLINE["r"] if sw.HEADLINE["r"] in model_sweep.ranks else model_sweep.ranks[0]
    return Sweep(model_sweep.shapes, (tokens,), (r,), model_sweep.dropouts, model_sweep.dtypes[:1]).points()


def run_saved_bytes(points: list[Point], providers, progress, warnings) -> list[SavedBytesRow]:
    """Exact saved-activation bytes at real sizes on meta tensors (no memory), dropout as on CUDA."""
    from . import measure
    from .providers import BUILDERS, Params, cuda_dropout_on_meta, make_input, torch_backend_for_cpu

    rows = []
    for point in points:
        params = Params.make(point, "meta")
        x, _ = make_input(point, "meta")
        by_provider = {}
        for provider in providers:
            progress.step(f"saved bytes {provider} {_where(point)}")
            try:
                with cuda_dropout_on_meta(), torch_backend_for_cpu():
                    saved = measure.saved_activation_bytes(BUILDERS[provider](params), x)
            except Exception as e:
                warnings.append(f"saved bytes of {provider} at {_where(point)}: {_error_text(e)}")
                continue
            by_provider[provider] = SavedBytesRow(point, provider, saved.activation_bytes, "; ".join(saved.tensors))
        fused = by_provider["fused"].saved_bytes if "fused" in by_provider else None
        for row in by_provider.values():
            row.ratio_to_fused = ratio(row.saved_bytes, fused)
        rows += by_provider.values()
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Modeled
# ---------------------------------------------------------------------------------------------

def run_modeled(points: list[Point], providers, progress, warnings, gpu=None) -> list[ModeledRow]:
    """One row per point, provider and direction, with its modeled launch list, on the ``gpu`` preset
    (benchmarks.roofline.Gpu; the H100 by default)."""
    from . import roofline

    gpu = gpu or roofline.DEFAULT_GPU
    efficiency = roofline.TRITON_GEMM_EFFICIENCY
    rows = []
    for point in points:
        per_provider = {}
        for provider in providers:
            progress.step(f"model {provider} {_where(point)}")
            try:
                per_provider[provider] = roofline.model_point(provider, point, gpu)
            except Exception as e:
                warnings.append(f"model of {provider} at {_where(point)}: {_error_text(e)}")
        rows_at = {}  # {(provider, direction): row}
        for direction in DIRECTIONS:
            by_provider = {}
            for provider, by_direction in per_provider.items():
                m = by_direction[direction]
                by_provider[provider] = rows_at[provider, direction] = ModeledRow(
                    point, provider, direction, m.launches, gflop=m.flops / 1e9, hbm_mib=m.bytes / 2**20,
                    us=m.seconds * 1e6, tflops=point.useful_flops(provider, direction) / m.seconds / 1e12,
                    gpu=gpu.key, gpu_name=gpu.name, atomic_mib=m.atomic_bytes / 2**20,
                    atomics_us=m.atomic_seconds * 1e6, triton_waves=m.triton_waves, triton_efficiency=efficiency,
                    us_at_efficiency=m.seconds_at(efficiency) * 1e6)
            ratios = ratios_to_references({p: row.us for p, row in by_provider.items()})
            ratios_eff = ratios_to_references({p: row.us_at_efficiency for p, row in by_provider.items()})
            for provider, row in by_provider.items():
                row.ratio_to = ratios[provider]
                row.ratio_to_at_efficiency = ratios_eff[provider]
        rows += [rows_at[provider, direction] for provider in per_provider for direction in DIRECTIONS]
    return rows


# The providers whose host time per layer the host-overhead part measures: {provider: HostRow field}.
# It times fused (kernels stubbed) and eager on a tiny layer, fwd+bwd; peft, addmm and gemm are not timed.
HOST_MEASURED = {"fused": "fused_us", "eager": "eager_us"}


def attach_host_times(rows: list[ModeledRow], host) -> None:
    """Set host_us of each fused and eager fwd+bwd row from the host-overhead part's result (a HostOverhead,
    or None when it did not run): the minimum us per call at the row's dropout regime (the host part's
    dropout-0 row for p = 0, its p > 0 row otherwise).

    Assumed: the host time of the host part's tiny layer stands for every shape and token count (the
    launches are asynchronous, so the Python work per call is the same checks, plans and launch arguments
    at any size)."""
    if host is None:
        return
    by_dropout = {row.dropout > 0.0: row for row in host.rows}
    for row in rows:
        host_row = by_dropout.get(row.point.dropout > 0.0)
        if row.direction == "fwd+bwd" and row.provider in HOST_MEASURED and host_row is not None:
            row.host_us = getattr(host_row, HOST_MEASURED[row.provider])


def detail_points(model_points: list[Point]) -> list[Point]:
    """The points whose modeled launches are printed: the headline shape, tokens, r and dtype (both
    dropouts), else the first modeled point."""
    K, N = sw.HEADLINE["shape"]
    return [p for p in model_points if (p.in_features, p.out_features) == (K, N)
            and p.tokens == sw.HEADLINE["tokens"] and p.r == sw.HEADLINE["r"]
            and p.dtype == sw.HEADLINE["dtype"]] or model_points[:1]
