"""The printed text of each part of a run: the title and notes, then the measured, saved-bytes, modeled and
host-overhead parts."""
from __future__ import annotations

from pathlib import Path

from . import tables
from . import sweep as sw
from .layout import wrap
from .rows import HostOverhead, MeasuredRow, ModeledRow, SavedBytesRow
from .sweep import Point

CPU_MODE_BANNER = "CPU mode: no CUDA device; GPU timings not measured."


def title(mode: str, meta: dict) -> str:
    """The first line of a run: its mode, device, versions, commit and date."""
    return wrap(f"fused-lora-bench ({mode}): {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
                f"commit {meta['git_commit'][:12]}{'+changes' if meta['git_dirty'] else ''} | {meta['date_utc']}")


def print_header(preset: str, gpu: bool, meta: dict, notes: list[str], cpu_threads: int) -> None:
    print(title(preset, meta))
    if not gpu:
        print(CPU_MODE_BANNER)
        interp = meta["triton_interpret_env"]
        print(wrap("fused here = fused_lora.lora_linear's CPU path: its C++ kernels (csrc/cpu), or its torch "
                   "backend where they cannot be built; with dropout both draw the same Philox keep-mask as the CUDA "
                   "kernels (eager draws torch's own mask). These times say nothing about the Triton kernels"
                   + (f"; TRITON_INTERPRET={interp} is ignored for timing" if interp else "") + ".", "  "))
        print(wrap(f"CPU timings: the preset's small fp32 sizes, {cpu_threads} thread(s), every provider and "
                   "direction of a point timed side by side in shuffled rounds; --shapes, --tokens and --dtypes "
                   "select the saved-bytes and modeled points.", "  "))
    for note in notes:
        print(wrap(f"note: {note}", "  "))
    print(flush=True)


def print_measured(measured: list[MeasuredRow], gpu: bool, meta: dict, model_only: bool) -> None:
    from . import measure

    if gpu:
        print(wrap(f"[1/4] Measured on {meta['device']}: do_bench median [p20-p80] ms, synchronised, after "
                   "warm-up, grads set to None before each call; peak memory of one fwd+bwd from a clean state, "
                   "above inputs and parameters."))
    else:
        print(wrap(f"[1/4] Measured CPU times (not GPU): median [p20-p80] ms of the "
                   f"{measure.cpu_clock(meta['cpu_threads'])[1]}, from the quietest of "
                   f"{measure.CPU_BLOCKS} blocks of rounds, {meta['device']}. Saved MiB here is what torch saves "
                   "on CPU (CPU dropout keeps a noise tensor in x's dtype; CUDA keeps a bool mask: see part 2)."))
    print(wrap("bwd = backward of a retained graph with a fixed dY (grads of x, A, B; W frozen); "
               "x gemm / x eager / x peft: fwd+bwd time ratios at the same point.", "  "))
    if not measured:
        print("  (skipped: --model-only)" if model_only else "  (no points)")
        print()
        return
    print(tables.measured_times_table(measured))
    print()
    print("  The same points: fwd+bwd rates, time ratios and memory.")
    print(tables.measured_ratios_table(measured, gpu))
    if not gpu:
        from .providers import fused_cpu_backend

        if fused_cpu_backend() == "cpp":
            print(wrap("fused on CPU: the C++ kernels (csrc/cpu), which draw the Philox keep-mask per row block in "
                       "C++, as the CUDA kernels draw it in registers inside the GEMM tiles "
                       "(FUSED_LORA_BACKEND=torch fused-lora-bench times the torch path instead).", "  "))
        else:
            dropout_points = [r.point for r in measured if r.point.dropout > 0.0]
            print(wrap("fused on CPU: the torch path (FUSED_LORA_BACKEND=torch, or the C++ kernels could not be "
                       "built here).", "  "))
            if dropout_points:
                big = max(dropout_points, key=lambda p: p.tokens * p.in_features)
                ms = measure.time_cpu_dropout_mask(big.tokens, big.in_features, big.dropout)
                print(wrap(f"With dropout, the torch path draws its Philox keep-mask in numpy: measured {ms:.3g} ms "
                           f"for a {big.tokens}x{big.in_features} mask here "
                           f"({ms * 1e6 / (big.tokens * big.in_features):.0f} ns per element), once in forward and "
                           "once in backward.", "  "))
    print()


def print_saved(saved: list[SavedBytesRow]) -> None:
    print(wrap("[2/4] Activation bytes saved for backward per layer: measured, exact "
               "(torch.autograd.graph.saved_tensors_hooks; storages counted once, parameters excluded), "
               "on meta tensors at real size, dropout dispatched as on CUDA (native_dropout, bool mask)."))
    print(tables.saved_table(saved) if saved else "  (no points)")
    print()


def print_modeled(modeled: list[ModeledRow], model_points: list[Point], detail: list[Point], out: Path,
                  verbose: bool, gpu=None, host: HostOverhead | None = None, host_note: str = "") -> None:
    """The modeled part on the ``gpu`` preset; host: the host-overhead part's result, whose host times per
    layer the sweep tables mark against (None: host_note says why there is none)."""
    from . import roofline

    gpu = gpu or roofline.DEFAULT_GPU
    print(wrap(f"[3/4] MODELED {gpu.name} (not measured): per launch max(FLOPs / "
               f"{gpu.peak_flops['bfloat16'] / 1e12:g} TFLOP/s, compulsory bytes / {gpu.hbm_bytes_per_s / 1e12:g} "
               f"TB/s) x wave factor + fp32 atomic bytes / {roofline.ATOMIC_BYTES_PER_S / 1e12:g} TB/s (assumed) "
               f"+ tail bytes / ({gpu.hbm_bytes_per_s / 1e12:g} TB/s / {gpu.num_sms} SMs) (assumed) "
               f"+ {roofline.LAUNCH_OVERHEAD_S * 1e6:g} us assumed GPU-side launch overhead, summed over launches. "
               f"Wave factor of a Triton launch of G programs: ceil(G / {gpu.num_sms * roofline.PROGRAMS_PER_SM}) "
               f"waves x {gpu.num_sms * roofline.PROGRAMS_PER_SM} / G ({roofline.PROGRAMS_PER_SM} program per SM "
               f"assumed; below one wave: {gpu.num_sms} / G); 1 for a torch op. A launch with producer jobs in it "
               f"(the forward's shrink shares, the dX launch's dS, dB and dA jobs) is timed instead by its schedule: "
               f"its programs in the kernel's ticket order on the first free slot, a job streaming at one SM's share "
               f"of the bandwidth times spread / memory (its FLOPs at one SM's share of the peak where longer), "
               f"the tiles no faster than their own FLOPs at one SM's share of the peak, each waiting for its "
               f"producers as the kernel makes it (assumed)."))
    print(wrap("fused: launches from the launchers' plans (grids, tiles, passes; FLOPs of whole tiles and the padded "
               "rank; the sums across programs finished in the kernels: fp32 atomics (m_blocks x N x r x 4 bytes into "
               "dB, splits x M x R x 4 into dS, SPLIT_M x r x K x 4 into dA) or partials written and read back, and "
               "the tail: what the last program to arrive moves alone; the producer jobs inside a launch its tiles "
               "wait for: the forward's shrink shares, the dX launch's dS jobs); others: aten ops traced on meta "
               "tensors (FLOPs of the real rank).", "  "))
    for point in detail:
        sel = [r for r in modeled if r.point == point]
        print(f"  modeled at {point.shape}, {point.tokens} tokens, r={point.r}, dropout {point.dropout}, "
              f"{point.dtype}:")
        print(tables.modeled_detail_table(sel))
        if verbose:
            print(tables.launch_lines(sel))
        print()
    if len(model_points) > len(detail):
        first = model_points[0]
        r_ = sw.HEADLINE["r"] if any(p.r == sw.HEADLINE["r"] for p in model_points) else first.r
        dropout = 0.0 if any(p.dropout == 0.0 for p in model_points) else first.dropout
        where = f"r={r_}, dropout {dropout}, {first.dtype}, {gpu.name}"
        print(wrap(f"modeled fwd+bwd us across the sweep, and fused's modeled ratios ({where}; every point in "
                   f"{out / 'modeled.csv'}). IDEAL: every main loop at the peaks (Triton efficiency 1.0); the "
                   "targets refer to this table:", "  "))
        print(tables.modeled_summary_table(modeled, r_, dropout, first.dtype))
        print()
        e = roofline.TRITON_GEMM_EFFICIENCY
        print(wrap(f"The same with a Triton GEMM efficiency of {e:g} against cuBLAS on the FLOP rate of every Triton "
                   f"launch (assumed: median Triton / cuBLAS TFLOP/s of tutorial 03 on an H100 at 2432-3072 cubed, "
                   f"triton-lang/triton#3672); torch ops unchanged ({where}):", "  "))
        print(tables.modeled_summary_table(modeled, r_, dropout, first.dtype, at_efficiency=True))
        print()
        print(wrap(_host_line(host, dropout, host_note), "  "))
        print()


def _host_line(host: HostOverhead | None, dropout: float, note: str) -> str:
    """The note under the sweep tables: the measured host time per layer the * marks compare with."""
    if host is None:
        return (f"Host-bound time not shown: the host-overhead part did not run ({note}); no time is marked *. "
                "The modeled times are GPU-side only.")
    row = next((r for r in host.rows if (r.dropout > 0.0) == (dropout > 0.0)), None)
    if row is None:
        return "Host-bound time not shown: the host-overhead part measured no row at this dropout."
    return (f"* host-bound: the provider's measured host time per layer fwd+bwd exceeds its modeled GPU time. "
            f"Measured in part [4/4] on {host.device} ({host.clock}, 1 thread, kernels stubbed; a tiny layer, "
            f"taken to stand for every size): fused {row.fused_us:.0f} us, eager {row.eager_us:.0f} us at "
            f"dropout {row.dropout:g}; peft, addmm and gemm not measured. Without CUDA graphs a layer runs no "
            f"faster than its host time.")


def print_host(result: HostOverhead | None, part: str, *, skipped: str | None = None) -> None:
    print(wrap(f"{part} Host overhead, measured: {result.clock if result else 'CPU time'} of one tiny "
               "fused_lora.lora_linear forward+backward with its Triton kernels stubbed out (no-op launches), "
               "against PEFT's formula in eager torch (the eager provider) on the same tensors; 1 thread, side "
               "by side in shuffled rounds, minimum over rounds."))
    if result is None:
        print(f"  ({skipped})")
        print()
        return
    print(wrap(f"{result.shape}, on {result.device}; fused/eager below 1: fused_lora's host work per layer "
               f"is less than eager's. Command: {result.command}", "  "))
    print(tables.host_table(result))
    print()
