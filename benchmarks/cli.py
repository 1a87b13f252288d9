"""fused-lora-bench: fused LoRA against PEFT-style LoRA, an addmm_ baseline and the bare GEMM.

On a GPU it times every provider (fwd, bwd, fwd+bwd), measures peak memory and saved activation
bytes, and models the launches on an H100. Without one it runs in CPU mode: CPU timings of the
CPU path on small shapes, exact saved-activation bytes at real sizes (meta tensors), and the
modeled H100 table. Nothing in CPU mode is a GPU time.

    fused-lora-bench                      # GPU: --quick; CPU: CPU mode (about 2 minutes on 2 cores)
    fused-lora-bench --full --out results/
    fused-lora-bench --model-only --shapes 4096x4096 --tokens 8192 --ranks 16 --dtypes bf16   # no timings
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import sweep as sw
from .sweep import DIRECTIONS, PROVIDERS, FilterError, Point, Sweep

CPU_MODE_BANNER = "CPU mode: no CUDA device; GPU timings not measured."
# CPU timing runs on one thread by default. Measured on this project's 2-core machine while another
# process held one core: a 32x64x64 mm took 16 ms with 2 threads (the OpenMP barrier waits for a
# scheduler slice) and 8 us with 1; 256x1024x1024 took 16 ms with 2 threads and 5.9 ms with 1.
CPU_TIMING_THREADS = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fused-lora-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the default: a few minutes on one GPU")
    preset.add_argument("--full", action="store_true", help="the issue's whole sweep (shapes x tokens x ranks x "
                        "dropout x bf16/fp16)")
    preset.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests, CI)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument("--shapes", help="IN x OUT features, comma-separated: 4096x4096,8192->28672")
    p.add_argument("--tokens", help="token counts (rows of x), comma-separated")
    p.add_argument("--ranks", help="LoRA ranks 1..256, comma-separated")
    p.add_argument("--dropout", help="LoRA dropout probabilities, comma-separated: 0,0.1")
    p.add_argument("--dtypes", help="bfloat16, float16, float32 (or bf16, fp16, fp32), comma-separated")
    p.add_argument("--providers", help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--cpu-threads", type=int, default=CPU_TIMING_THREADS,
                   help="torch threads for CPU-mode timing (default 1: with 2 threads on a busy 2-core "
                   "machine each op waited for a scheduler slice)")
    p.add_argument("--out", default="bench-out", help="directory for points.csv/json, modeled.csv, "
                   "saved_bytes.csv and the PNGs (default: bench-out)")
    p.add_argument("--model-only", action="store_true", help="skip the timings: saved bytes and the modeled table")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also print the modeled launch list of the detailed points")
    return p


def parse_filters(args) -> dict:
    parsers = {
        "shapes": sw.parse_shapes,
        "tokens": lambda t: sw.parse_ints(t, "token count", 1),
        "ranks": lambda t: sw.parse_ints(t, "rank", 1, 256),
        "dropouts": sw.parse_dropouts,
        "dtypes": sw.parse_dtypes,
    }
    raw = {"shapes": args.shapes, "tokens": args.tokens, "ranks": args.ranks, "dropouts": args.dropout,
           "dtypes": args.dtypes}
    return {k: (parsers[k](v) if v is not None else None) for k, v in raw.items()}


def resolve_device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise FilterError(f"bad device {text!r}: {e}") from None
    if device.type not in ("cuda", "cpu"):
        raise FilterError(f"bad device {text!r}: expected cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FilterError("--device cuda, but torch sees no CUDA device (use --device cpu for CPU mode)")
    return device


# ---------------------------------------------------------------------------------------------
# The three parts of a run
# ---------------------------------------------------------------------------------------------

def _ratio(a, b):
    return a / b if a is not None and b else None


def run_measured(points: list[Point], providers: tuple[str, ...], device, progress, warnings) -> list[dict]:
    """Time each provider at each point; saved bytes and (GPU) peak memory alongside."""
    import torch

    from . import measure
    from .providers import BUILDERS, Params, make_input, torch_backend_for_cpu

    gpu = device.type == "cuda"
    timer = measure.time_gpu if gpu else measure.time_cpu
    rows = []
    for point in points:
        params = Params.make(point, device)
        x, dy = make_input(point, device)
        by_provider = {}
        for provider in providers:
            progress.step(f"measure {provider} {point.shape} M={point.tokens} r={point.r} p={point.dropout}")
            row = {"kind": "measured-gpu" if gpu else "measured-cpu", **point.as_dict(), "provider": provider}
            try:
                with torch_backend_for_cpu() if not gpu else _nullcontext():
                    layer = BUILDERS[provider](params)
                    saved = measure.saved_activation_bytes(layer, x)
                    fns = measure.direction_fns(layer, x, dy)
                    grads = layer.trainable + [x]
                    for direction in DIRECTIONS:
                        (med, p20, p80), reps = timer(fns[direction], grads)
                        row[f"{direction}_ms"] = med
                        row[f"{direction}_ms_p20"] = p20
                        row[f"{direction}_ms_p80"] = p80
                        row[f"{direction}_tflops"] = measure.tflops(point.useful_flops(provider, direction), med)
                        if reps is not None:
                            row[f"{direction}_reps"] = reps
                    row["saved_bytes"] = saved.activation_bytes
                    row["saved_tensors"] = "; ".join(saved.tensors)
                    row["peak_mem_bytes"] = measure.peak_memory_gpu(layer, x, dy) if gpu else None
                    del layer, fns
            except Exception as e:  # one failing provider (OOM at a big point) must not end the sweep
                if gpu and isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                warnings.append(f"{provider} at {point.shape} M={point.tokens} r={point.r} "
                                f"p={point.dropout} {point.dtype}: {row['error']}")
            x.grad = None
            by_provider[provider] = row
        for row in by_provider.values():
            for direction in DIRECTIONS:
                t = row.get(f"{direction}_ms")
                for ref in ("gemm", "eager", "peft"):
                    row[f"{direction}_ratio_to_{ref}"] = _ratio(t, by_provider.get(ref, {}).get(f"{direction}_ms"))
        rows += by_provider.values()
    return rows


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def saved_bytes_points(model_sweep: Sweep) -> list[Point]:
    """Where the saved-bytes table measures: every swept shape and dropout at 8192 tokens and r = 16
    (or the largest token count and the first rank swept). Saved bytes are linear in tokens."""
    tokens = sw.HEADLINE["tokens"] if sw.HEADLINE["tokens"] in model_sweep.tokens else max(model_sweep.tokens)
    r = sw.HEADLINE["r"] if sw.HEADLINE["r"] in model_sweep.ranks else model_sweep.ranks[0]
    return Sweep(model_sweep.shapes, (tokens,), (r,), model_sweep.dropouts, model_sweep.dtypes[:1]).points()


def run_saved_bytes(points: list[Point], providers, progress, warnings) -> list[dict]:
    """Exact saved-activation bytes at real sizes on meta tensors (no memory), dropout as on CUDA."""
    from . import measure
    from .providers import BUILDERS, Params, cuda_dropout_on_meta, make_input, torch_backend_for_cpu

    rows = []
    for point in points:
        params = Params.make(point, "meta")
        x, _ = make_input(point, "meta")
        by_provider = {}
        for provider in providers:
            progress.step(f"saved bytes {provider} {point.shape} M={point.tokens}")
            try:
                with cuda_dropout_on_meta(), torch_backend_for_cpu():
                    saved = measure.saved_activation_bytes(BUILDERS[provider](params), x)
            except Exception as e:
                warnings.append(f"saved bytes of {provider} at {point.shape}: {type(e).__name__}: {e}")
                continue
            by_provider[provider] = {"kind": "measured-saved-bytes (meta, as on CUDA)", **point.as_dict(),
                                     "provider": provider, "saved_bytes": saved.activation_bytes,
                                     "saved_bytes_per_token": saved.activation_bytes / point.tokens,
                                     "saved_tensors": "; ".join(saved.tensors)}
        fused = by_provider.get("fused", {}).get("saved_bytes")
        for row in by_provider.values():
            row["ratio_to_fused"] = _ratio(row["saved_bytes"], fused)
        rows += by_provider.values()
    return rows


def run_modeled(points: list[Point], providers, progress, warnings) -> list[dict]:
    from . import model

    rows = []
    for point in points:
        per_provider = {}
        for provider in providers:
            progress.step(f"model {provider} {point.shape} M={point.tokens} r={point.r}")
            try:
                per_provider[provider] = model.model_point(provider, point)
            except Exception as e:
                warnings.append(f"model of {provider} at {point.shape} M={point.tokens}: {type(e).__name__}: {e}")
        for provider, by_direction in per_provider.items():
            for direction, m in by_direction.items():
                row = {"kind": "modeled-h100", **point.as_dict(), "provider": provider, "direction": direction,
                       "modeled_launches": len(m.launches), "modeled_gflop": m.flops / 1e9,
                       "modeled_hbm_mib": m.bytes / 2**20, "modeled_us": m.seconds * 1e6,
                       "modeled_tflops": point.useful_flops(provider, direction) / m.seconds / 1e12}
                for ref in ("gemm", "eager", "peft"):
                    other = per_provider.get(ref, {}).get(direction)
                    row[f"modeled_ratio_to_{ref}"] = _ratio(m.seconds, other.seconds if other else None)
                row["_launches"] = m.launches
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def _point_of(row: dict) -> Point:
    return Point(row["in_features"], row["out_features"], row["tokens"], row["r"], row["dropout"], row["dtype"],
                 row["bias"])


def _ms(row, direction):
    med = row.get(f"{direction}_ms")
    if med is None:
        return row.get("error", "-")[:20] if direction == "fwd" else "-"
    return f"{med:.3g} [{row[f'{direction}_ms_p20']:.3g}-{row[f'{direction}_ms_p80']:.3g}]"


def _x(v):
    return f"{v:.2f}x" if v is not None else "-"


def measured_table(rows: list[dict], gpu: bool) -> str:
    from .report import MiB, format_table

    headers = ["shape", "tokens", "r", "p", "dtype", "provider", "fwd ms [p20-p80]", "bwd ms [p20-p80]",
               "fwd+bwd ms [p20-p80]", "fwd+bwd TFLOP/s", "fwd+bwd x gemm", "x eager", "x peft", "saved MiB"]
    if gpu:
        headers.append("peak MiB")
    out = []
    for r in rows:
        line = [r["shape"], r["tokens"], r["r"], r["dropout"], r["dtype"], r["provider"],
                _ms(r, "fwd"), _ms(r, "bwd"), _ms(r, "fwd+bwd"), r.get("fwd+bwd_tflops"),
                _x(r.get("fwd+bwd_ratio_to_gemm")), _x(r.get("fwd+bwd_ratio_to_eager")),
                _x(r.get("fwd+bwd_ratio_to_peft")),
                r["saved_bytes"] / MiB if r.get("saved_bytes") is not None else None]
        if gpu:
            line.append(r["peak_mem_bytes"] / MiB if r.get("peak_mem_bytes") is not None else None)
        out.append(line)
    return format_table(headers, out)


def saved_table(rows: list[dict]) -> str:
    from .report import MiB, format_table

    return format_table(
        ["shape", "tokens", "r", "p", "dtype", "provider", "saved MiB", "bytes/token", "x fused", "saved tensors"],
        [[r["shape"], r["tokens"], r["r"], r["dropout"], r["dtype"], r["provider"], r["saved_bytes"] / MiB,
          int(r["saved_bytes_per_token"]), _x(r["ratio_to_fused"]), r["saved_tensors"]] for r in rows])


def modeled_detail_table(rows: list[dict]) -> str:
    from .report import format_table

    return format_table(
        ["provider", "direction", "launches", "GFLOP", "HBM MiB", "modeled us", "modeled TFLOP/s",
         "modeled x gemm", "modeled x eager"],
        [[r["provider"], r["direction"], r["modeled_launches"], r["modeled_gflop"], r["modeled_hbm_mib"],
          r["modeled_us"], r["modeled_tflops"], _x(r["modeled_ratio_to_gemm"]), _x(r["modeled_ratio_to_eager"])]
         for r in rows])


def modeled_summary_table(rows: list[dict], r_: int, dropout: float, dtype: str) -> str:
    """fwd+bwd per shape and token count: modeled µs of each provider and fused's modeled speed-ups."""
    from .report import format_table

    sel = [r for r in rows if r["r"] == r_ and r["dropout"] == dropout and r["dtype"] == dtype
           and r["direction"] == "fwd+bwd"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
    keys = sorted({(r["in_features"], r["out_features"], r["tokens"]) for r in sel},
                  key=lambda k: (sw.MODEL_SHAPES.index(k[:2]) if k[:2] in sw.MODEL_SHAPES else 99, k))
    table = []
    for K, N, M in keys:
        at = {r["provider"]: r for r in sel if (r["in_features"], r["out_features"], r["tokens"]) == (K, N, M)}
        fused = at.get("fused")
        speedups = [_x(_ratio(at[p]["modeled_us"], fused["modeled_us"])) if fused and p in at else "-"
                    for p in ("eager", "addmm")]
        table.append([f"{K}->{N}", M] + [at[p]["modeled_us"] if p in at else None for p in providers]
                     + speedups + [_x(fused["modeled_ratio_to_gemm"]) if fused else "-"])
    headers = (["shape", "tokens"] + [f"{p} modeled us" for p in providers]
               + ["modeled eager/fused", "modeled addmm/fused", "modeled fused/gemm"])
    return format_table(headers, table)


def _launch_lines(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["direction"] == "fwd+bwd":
            continue
        out.append(f"  {r['provider']} {r['direction']}:")
        for launch in r["_launches"]:
            out.append(f"    {launch.name:<24} {launch.flops / 1e9:9.3f} GFLOP {launch.bytes / 2**20:9.2f} MiB  "
                       f"{launch.detail}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        filters = parse_filters(args)
        providers = sw.parse_providers(args.providers) if args.providers else PROVIDERS
        device = resolve_device(args.device)
    except FilterError as e:
        parser.error(str(e))  # exits with status 2 and the message

    import torch

    from . import model, report
    from .providers import available

    started = time.perf_counter()
    gpu = device.type == "cuda"
    mode = "gpu" if gpu else "cpu"
    preset = "tiny" if args.tiny else "full" if args.full else "quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = report.run_metadata(device, mode, argv)
    warnings: list[str] = []
    notes: list[str] = []

    usable = []
    for provider in providers:
        ok, why = available(provider)
        if ok:
            usable.append(provider)
        else:
            notes.append(f"provider {provider} skipped: {why}")
    providers = tuple(usable)

    if gpu:
        measured_sweep = sw.GPU_PRESETS[preset].with_filters(filters)
        model_sweep = measured_sweep
    else:
        # CPU timings stay at the preset's small fp32 sizes (a bf16 8192x4096x4096 mm would take
        # minutes on CPU); --shapes, --tokens and --dtypes select the modeled and saved-bytes points.
        measured_sweep = sw.CPU_PRESETS[preset].with_filters(
            {k: filters[k] for k in ("ranks", "dropouts")})
        model_sweep = sw.MODEL_PRESETS[preset].with_filters(filters)
    model_dtypes = tuple(d for d in model_sweep.dtypes if model.modeled_dtype_supported(d))
    if len(model_dtypes) < len(model_sweep.dtypes):
        notes.append("modeled table: float32 not modeled (the model's peaks are the fp16/bf16 tensor-core ones)")
    model_points = Sweep(model_sweep.shapes, model_sweep.tokens, model_sweep.ranks, model_sweep.dropouts,
                         model_dtypes).points() if model_dtypes else []
    measured_points = [] if args.model_only else measured_sweep.points()
    saved_points = saved_bytes_points(Sweep(model_sweep.shapes, model_sweep.tokens, model_sweep.ranks,
                                            model_sweep.dropouts, model_dtypes or model_sweep.dtypes))

    print(f"fused-lora-bench ({preset}): {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['git_commit'][:12]}{'+changes' if meta['git_dirty'] else ''} | {meta['date_utc']}")
    if not gpu:
        print(CPU_MODE_BANNER)
        interp = meta["triton_interpret_env"]
        print("  fused = fused_lora.lora_linear's CPU path (its torch backend: addmm into the output buffer), "
              "not the Triton kernels"
              + (f"; TRITON_INTERPRET={interp} is set and ignored for timing (FUSED_LORA_BACKEND=torch)"
                 if interp else "") + ".")
        print("  CPU timings run at the preset's small fp32 sizes; --shapes, --tokens and --dtypes select the "
              "saved-bytes and modeled points.")
    for note in notes:
        print(f"  note: {note}")
    print(flush=True)

    progress = report.Progress(len(providers) * (len(measured_points) + len(saved_points) + len(model_points)),
                               enabled=not args.quiet)
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(args.cpu_threads)
    try:
        measured = run_measured(measured_points, providers, device, progress, warnings)
    finally:
        torch.set_num_threads(threads)
    saved = run_saved_bytes(saved_points, providers, progress, warnings)
    modeled = run_modeled(model_points, providers, progress, warnings)
    progress.close()

    part = 0
    total_parts = 3
    part += 1
    if gpu:
        print(f"[{part}/{total_parts}] Measured on {meta['device']}: do_bench median [p20-p80] ms, "
              "synchronised, after warm-up; peak memory of one fwd+bwd above inputs and parameters.")
    else:
        print(f"[{part}/{total_parts}] Measured CPU times (not GPU): wall-clock median [p20-p80] ms, "
              f"{meta['device']}, timed on {args.cpu_threads} thread(s). Saved MiB here is what torch saves on CPU (CPU dropout keeps a noise "
              "tensor in x's dtype; CUDA keeps a bool mask: see part 2).")
    print("  bwd = backward of a retained graph with a fixed dY (grads of x, A, B; W frozen); "
          "x gemm / x eager / x peft: fwd+bwd time ratios at the same point.")
    print(measured_table(measured, gpu) if measured else
          "  (skipped: --model-only)" if args.model_only else "  (no points)")
    print()

    part += 1
    print(f"[{part}/{total_parts}] Activation bytes saved for backward per layer: measured, exact "
          "(torch.autograd.graph.saved_tensors_hooks; storages counted once, parameters excluded), "
          "on meta tensors at real size, dropout dispatched as on CUDA (native_dropout, bool mask).")
    print(saved_table(saved) if saved else "  (no points)")
    print()

    part += 1
    print(f"[{part}/{total_parts}] MODELED H100 SXM (not measured): per launch max(FLOPs / 989e12 FLOP/s, "
          f"compulsory bytes / 3.35e12 B/s) + {model.LAUNCH_OVERHEAD_S * 1e6:g} us assumed launch overhead, "
          "summed over launches.")
    print("  fused: launches from the launchers' plans (grids, tiles, passes; padded rank R; fp32 atomics); "
          "others: aten ops traced on meta tensors.")
    detail_points = [p for p in model_points if p.shape == "->".join(map(str, sw.HEADLINE["shape"]))
                     and p.tokens == sw.HEADLINE["tokens"] and p.r == sw.HEADLINE["r"]
                     and p.dtype == sw.HEADLINE["dtype"]] or model_points[:1]
    for point in detail_points:
        sel = [r for r in modeled if _point_of(r) == point]
        print(f"  modeled at {point.shape}, {point.tokens} tokens, r={point.r}, dropout {point.dropout}, "
              f"{point.dtype}:")
        print(modeled_detail_table(sel))
        if args.verbose:
            print(_launch_lines(sel))
        print()
    if len(model_points) > len(detail_points):
        first = model_points[0]
        r_ = sw.HEADLINE["r"] if any(p.r == sw.HEADLINE["r"] for p in model_points) else first.r
        dropout = 0.0 if any(p.dropout == 0.0 for p in model_points) else first.dropout
        dtype = first.dtype
        print(f"  modeled fwd+bwd across the sweep (r={r_}, dropout {dropout}, {dtype}; every point in "
              f"{out / 'modeled.csv'}):")
        print(modeled_summary_table(modeled, r_, dropout, dtype))
        print()

    # Files
    json_modeled = []
    for row in modeled:
        clean = {k: v for k, v in row.items() if k != "_launches"}
        if row["direction"] != "fwd+bwd":  # fwd+bwd is the two lists one after the other
            # [name, flops, bytes], plus each launch's tensors and grid at the detailed points (size).
            detailed = _point_of(row) in detail_points
            clean["launches"] = [[l.name, l.flops, l.bytes] + ([l.detail] if detailed else [])
                                 for l in row["_launches"]]
        json_modeled.append(clean)
    csv_modeled = [{k: v for k, v in row.items() if k != "_launches"} for row in modeled]
    report.write_csv(out / "points.csv", measured, meta)
    report.write_csv(out / "modeled.csv", csv_modeled, meta)
    report.write_csv(out / "saved_bytes.csv", saved, meta)
    report.write_json(out / "points.json", {
        "metadata": meta, "modeled_assumptions": model.ASSUMPTIONS, "notes": notes, "warnings": warnings,
        "measured": measured, "saved_bytes": saved, "modeled": json_modeled})
    written = ["points.csv", "points.json", "modeled.csv", "saved_bytes.csv"]

    if args.no_plots:
        pass
    elif report._pyplot() is None:
        print("plots skipped: pip install 'fused_lora[plots]'")
    else:
        written += [p.name for p in _plots(out, gpu, measured, saved, modeled)]

    for w in warnings:
        print(f"warning: {w}")
    print(f"wrote {', '.join(written)} to {out}/ in {time.perf_counter() - started:.0f} s")
    return 0


def _plots(out: Path, gpu: bool, measured, saved, modeled) -> list[Path]:
    from . import report

    written = []
    if gpu:
        rows, key, title, ylabel = measured, "{d}_ratio_to_gemm", "measured on GPU: time / gemm time", "time / gemm"
    else:
        rows, key = modeled, "modeled_ratio_to_gemm"
        title, ylabel = "MODELED H100 (not measured): modeled time / modeled gemm time", "modeled time / gemm"
    if rows:
        first = rows[0]
        r_ = sw.HEADLINE["r"] if any(r["r"] == sw.HEADLINE["r"] for r in rows) else first["r"]
        dropout = 0.0 if any(r["dropout"] == 0.0 for r in rows) else first["dropout"]
        series: dict = {}
        for row in rows:
            if row["r"] != r_ or row["dropout"] != dropout or row["dtype"] != first["dtype"]:
                continue
            if row["provider"] == "gemm":
                continue
            for direction in DIRECTIONS:
                if not gpu and row["direction"] != direction:
                    continue
                value = row.get(key.format(d=direction))
                if value is not None:
                    series.setdefault(row["shape"], {}).setdefault(direction, {}).setdefault(
                        row["provider"], []).append((row["tokens"], value))
        written += report.plot_ratio_to_gemm(out, series, ylabel=ylabel,
                                             title=f"{title}, r={r_}, dropout {dropout}, {first['dtype']}")
    bars: dict = {}
    for row in saved:
        bars.setdefault(f"{row['shape']}\np={row['dropout']}", {})[row["provider"]] = row["saved_bytes"] / 2**20
    if saved:
        title = (f"activation bytes saved for backward (measured, exact; meta tensors, dropout as on CUDA), "
                 f"{saved[0]['tokens']} tokens, r={saved[0]['r']}, {saved[0]['dtype']}")
        written += report.plot_saved_bytes(out, bars, title=title)
    return written


if __name__ == "__main__":
    sys.exit(main())
