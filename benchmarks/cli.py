"""fused-lora-bench: fused LoRA against PEFT-style LoRA, an addmm_ baseline and the bare GEMM.

On a GPU it times every provider (fwd, bwd, fwd+bwd), measures peak memory and saved activation
bytes, and models the launches on an H100. Without one it runs in CPU mode: CPU timings of the
CPU path on small shapes, exact saved-activation bytes at real sizes (meta tensors), and the
modeled H100 table. Nothing in CPU mode is a GPU time. Both end with the host overhead of one tiny
fused layer (kernels stubbed out) against eager torch.

    fused-lora-bench                      # GPU: --quick; CPU: CPU mode (40 s on a 2-core machine)
    fused-lora-bench --full --out results/
    fused-lora-bench --model-only --shapes 4096x4096 --tokens 8192 --ranks 16 --dtypes bf16   # no kernel timings
    fused-lora-bench --model-only --gpu h200   # the modeled table on the H200 SXM preset (4.8 TB/s)
    fused-lora-bench --host-only          # host time per tiny layer, kernels stubbed, against eager torch
    fused-lora-bench --family dora --model-only   # DoRA: fused_dora, peft_dora, fused_lora; modeled H100 + H200
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import runs, sections
from . import sweep as sw
from .layout import wrap
from .progress import Progress
from .rows import HostOverhead
from .sweep import DTYPES, PROVIDERS, Point

# CPU timing runs on one thread by default. Measured on this project's 2-core machine while another
# process held one core: a 32x64x64 mm took 16 ms with 2 threads (the OpenMP barrier waits for a
# scheduler slice) and 8 us with 1; 256x1024x1024 took 16 ms with 2 threads and 5.9 ms with 1.
CPU_TIMING_THREADS = 1


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class FilterError(ValueError):
    """A command-line filter that cannot be parsed; the message says what was expected."""


def _split(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise FilterError(f"empty list {text!r}")
    return items


def _each(text: str, parse_item) -> tuple:
    """parse_item applied to each comma-separated item of text; it raises FilterError on a bad one."""
    return tuple(parse_item(item) for item in _split(text))


def _shape(item: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\s*(?:x|->)\s*(\d+)", item)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        hint = (" (an unquoted '->' is a shell redirection: the rest of the shape became a file name; "
                "quote it or write 4096x1024)") if item.endswith("-") else ""
        raise FilterError(f"bad shape {item!r}: expected IN x OUT, e.g. 4096x1024 or '4096->1024'{hint}")
    return int(m.group(1)), int(m.group(2))


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'4096x1024,8192->28672' -> ((4096, 1024), (8192, 28672)): in_features x out_features."""
    return _each(text, _shape)


def parse_ints(text: str, what: str, low: int, high: int | None = None) -> tuple[int, ...]:
    def one(item: str) -> int:
        if not re.fullmatch(r"\d+", item) or int(item) < low or (high is not None and int(item) > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise FilterError(f"bad {what} {item!r}: expected an integer {bound}")
        return int(item)

    return _each(text, one)


def _dropout(item: str) -> float:
    try:
        p = float(item)
    except ValueError:
        p = -1.0
    if not 0.0 <= p < 1.0:
        raise FilterError(f"bad dropout {item!r}: expected a probability in [0, 1)")
    return p


def parse_dropouts(text: str) -> tuple[float, ...]:
    return _each(text, _dropout)


def _dtype(item: str) -> str:
    name = _DTYPE_ALIASES.get(item.lower(), item.lower())
    if name not in DTYPES:
        raise FilterError(f"unknown dtype {item!r}: expected one of {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return name


def parse_dtypes(text: str) -> tuple[str, ...]:
    return _each(text, _dtype)


def _provider(item: str) -> str:
    if item not in PROVIDERS:
        raise FilterError(f"unknown provider {item!r}: expected one of {', '.join(PROVIDERS)}")
    return item


def parse_providers(text: str) -> tuple[str, ...]:
    """The named providers in PROVIDERS' order, each once."""
    values = _each(text, _provider)
    return tuple(p for p in PROVIDERS if p in values)


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fused-lora-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the default: a few minutes on one GPU")
    preset.add_argument("--full", action="store_true", help="the whole sweep (shapes x tokens x ranks x "
                        "dropout x bf16/fp16)")
    preset.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests, CI)")
    p.add_argument("--family", default="linear", choices=("linear", "embedding", "dora"),
                   help="linear: the LoRA linear layer (the default); embedding: LoRA on an embedding table "
                        "(vocab 128256, d 4096; fused, peft and nn.Embedding); dora: DoRA linear layers "
                        "(fused_dora, peft_dora, fused_lora; --providers from those)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument("--shapes", help="IN x OUT features, comma-separated: 4096x4096,8192x28672 ('4096->4096' works "
                   "too, quoted: unquoted, the shell reads > as a redirection)")
    p.add_argument("--tokens", help="token counts (rows of x), comma-separated")
    p.add_argument("--ranks", help="LoRA ranks 1..256, comma-separated")
    p.add_argument("--dropout", help="LoRA dropout probabilities, comma-separated: 0,0.1")
    p.add_argument("--dtypes", help="bfloat16, float16, float32 (or bf16, fp16, fp32), comma-separated")
    p.add_argument("--providers", help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--cpu-threads", type=_positive_int, default=CPU_TIMING_THREADS,
                   help="torch threads for CPU-mode timing (default 1: with 2 threads on a busy 2-core "
                   "machine each op waited for a scheduler slice)")
    p.add_argument("--out", default="bench-out", help="directory for points.csv/json, modeled.csv, "
                   "saved_bytes.csv and the PNGs (default: bench-out)")
    p.add_argument("--model-only", action="store_true", help="skip the measured timings: saved bytes, the modeled "
                   "table and the host-overhead part (seconds; --no-host skips it too)")
    p.add_argument("--host-only", action="store_true", help="only the host-overhead part: fused_lora's host time "
                   "per tiny layer, kernels stubbed out, against eager torch (seconds)")
    p.add_argument("--gpu", default="h100", type=str.lower, choices=("h100", "h200"),
                   help="the GPU preset of the modeled table: h100 (H100 SXM, 3.35 TB/s; default) or h200 (H200 SXM, "
                   "4.8 TB/s, the same SMs and peaks)")
    p.add_argument("--no-host", action="store_true", help="skip the host-overhead part (it runs with --model-only "
                   "too: a few seconds, and the modeled tables mark the host-bound points from it)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also print the modeled launch list of the detailed points")
    return p


def parse_filters(args) -> dict:
    parsers = {
        "shapes": parse_shapes,
        "tokens": lambda t: parse_ints(t, "token count", 1),
        "ranks": lambda t: parse_ints(t, "rank", 1, 256),
        "dropouts": parse_dropouts,
        "dtypes": parse_dtypes,
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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FilterError(f"--device {text}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def usable_providers(requested: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """(the requested providers that can run, a note for each skipped one); FilterError when none can."""
    from .providers import available

    usable, notes = [], []
    for provider in requested:
        ok, why = available(provider)
        if ok:
            usable.append(provider)
        else:
            notes.append(f"provider {provider} skipped: {why}")
    if not usable:
        raise FilterError("no provider left to run: " + "; ".join(notes))
    return tuple(usable), notes


def plan_points(preset: str, gpu: bool, filters: dict) -> tuple[list[Point], list[Point], list[Point], list[str]]:
    """(measured, saved-bytes, modeled) points of the preset narrowed by the filters, and notes."""
    from . import roofline

    notes = []
    if gpu:
        measured_sweep = sw.GPU_PRESETS[preset].with_filters(filters)
        model_sweep = measured_sweep
    else:
        # CPU timings stay at the preset's small fp32 sizes (a bf16 8192x4096x4096 mm would take
        # minutes on CPU); --shapes, --tokens and --dtypes select the modeled and saved-bytes points.
        measured_sweep = sw.CPU_PRESETS[preset].with_filters({k: filters[k] for k in ("ranks", "dropouts")})
        model_sweep = sw.MODEL_PRESETS[preset].with_filters(filters)
    model_dtypes = tuple(d for d in model_sweep.dtypes if roofline.modeled_dtype_supported(d))
    if len(model_dtypes) < len(model_sweep.dtypes):
        notes.append("modeled table: float32 not modeled (the model's peaks are the fp16/bf16 tensor-core ones)")
    modeled = replace(model_sweep, dtypes=model_dtypes).points() if model_dtypes else []
    saved = runs.saved_bytes_points(replace(model_sweep, dtypes=model_dtypes or model_sweep.dtypes))
    return measured_sweep.points(), saved, modeled, notes


def run_host(device, warnings: list[str]) -> HostOverhead | None:
    """The host-overhead part (benchmarks.host); a failure is a warning, not the end of the run."""
    from . import host

    try:
        return host.measure_host_overhead(device)
    except Exception as e:
        warnings.append(f"host overhead: {type(e).__name__}: {e}".splitlines()[0][:300])
        return None


def main_host_only(device, out: Path, argv: list[str]) -> int:
    from . import metadata, writers

    meta = metadata.run_metadata(device, "host", argv)
    print(sections.title("host-only", meta))
    print()
    warnings: list[str] = []
    result = run_host(device, warnings)
    sections.print_host(result, "[host]", skipped="failed: see the warning below")
    writers.write_json(out / "host.json", {"metadata": meta,
                                           "host_overhead": result.as_record() if result else None,
                                           "warnings": warnings})
    for w in warnings:
        print(wrap(f"warning: {w}"))
    print(f"wrote host.json to {out}/")
    return 1 if result is None else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        filters = parse_filters(args)
        if args.family == "dora":
            from . import dora
            try:
                dora_providers = dora.parse_providers(args.providers)
            except ValueError as e:
                raise FilterError(str(e)) from None
            return dora.main(args, argv, filters, dora_providers)
        providers, notes = usable_providers(parse_providers(args.providers) if args.providers else PROVIDERS)
        device = resolve_device(args.device)
    except FilterError as e:
        parser.error(str(e))  # exits with status 2 and the message

    import torch

    from . import metadata, plots, roofline, writers

    if args.family == "embedding":
        from . import embedding
        return embedding.main(args, argv)
    started = time.perf_counter()
    gpu = device.type == "cuda"
    preset = "tiny" if args.tiny else "full" if args.full else "quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.host_only:
        return main_host_only(device, out, argv)
    meta = metadata.run_metadata(device, "gpu" if gpu else "cpu", argv)
    meta["cpu_threads"] = args.cpu_threads
    warnings: list[str] = []
    measured_points, saved_points, model_points, point_notes = plan_points(preset, gpu, filters)
    notes += point_notes
    if args.model_only:
        measured_points = []
    sections.print_header(preset, gpu, meta, notes, args.cpu_threads)

    progress = Progress(len(providers) * (len(measured_points) + len(saved_points) + len(model_points)),
                               enabled=not args.quiet)
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(args.cpu_threads)
    try:
        measured = runs.run_measured(measured_points, providers, device, progress, warnings)
    finally:
        torch.set_num_threads(threads)
    saved = runs.run_saved_bytes(saved_points, providers, progress, warnings)
    gpu_model = roofline.GPUS[args.gpu]
    modeled = runs.run_modeled(model_points, providers, progress, warnings, gpu_model)
    progress.close()

    sections.print_measured(measured, gpu, meta, args.model_only)
    sections.print_saved(saved)
    # The host part runs before the modeled part is printed (its tables mark the host-bound points), and
    # with --model-only too: `fused-lora-bench --host-only` took 6 s on this project's 2-core machine,
    # 4 of them imports the run has already paid for.
    host_result = None if args.no_host else run_host(device, warnings)
    runs.attach_host_times(modeled, host_result)
    detail = runs.detail_points(model_points)
    sections.print_modeled(modeled, model_points, detail, out, args.verbose, gpu_model, host_result,
                           "--no-host" if args.no_host else "it failed: see the warning below")
    sections.print_host(host_result, "[4/4]", skipped="skipped: --no-host" if args.no_host else
                        "failed: see the warning below")

    written = writers.write_files(out, meta, measured=measured, saved=saved, modeled=modeled,
                                 detailed=lambda row: row.point in detail,
                                 payload={"modeled_assumptions": roofline.assumptions(gpu_model), "notes": notes,
                                          "host_overhead": host_result.as_record() if host_result else None,
                                          "warnings": warnings})
    if args.no_plots:
        pass
    elif plots.pyplot() is None:
        print("plots skipped: pip install 'fused_lora[plots]'")
    else:
        written += [p.name for p in plots.write_plots(out, gpu, measured, saved, modeled)]

    for w in warnings:
        print(wrap(f"warning: {w}"))
    print(wrap(f"wrote {', '.join(written)} to {out}/ in {time.perf_counter() - started:.0f} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())


