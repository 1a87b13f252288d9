"""fwd+bwd time of the C++ CPU backend against the torch CPU path and PEFT-style eager autograd.

    python benchmarks/cpp_vs_eager.py            # the whole grid (tens of minutes on 2 cores: bf16 eager
                                                 # GEMMs run at ~8 GFLOP/s on AVX2, 4096^3 takes ~40 s)
    python benchmarks/cpp_vs_eager.py --quick    # tokens 64 and 1024, r 16

Providers, each computing y and the grads of x, A and B (W and b frozen):
  cpp    fused_lora.ops.cpp_backend.forward / backward (what the eager Function calls on CPU)
  torch  the torch CPU path, forward / backward (fused_lora.ops.torch_backend)
  eager  y = F.linear(x, W, b) + s * F.linear(F.linear(F.dropout(x, p), A), B), then y.backward(dy)
Each configuration times one call per provider in turn (interleaved), repeated until a time budget is
spent (at least 4 after a warm-up round; calls of over a second: 1-3 and no warm-up), and reports medians.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fused_lora.ops import cpp_backend as _cpp_backend  # noqa: E402

from fused_lora.ops import torch_backend  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(M, K, N, r, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    a = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    bb = (torch.randn(N, r, generator=g) / r**0.5).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    return x, w, b, a, bb, dy


def providers(x, w, b, a, bb, dy, scaling, p):
    seed = torch.tensor(1234, dtype=torch.int64)

    def fused(module):
        def run():
            y, s = module.forward(x, w, b, a, bb, scaling, p, seed)
            return module.backward(dy, x, w, a, bb, s, scaling, p, seed, True, True, True)
        return run

    xe, ae, be = (t.detach().clone().requires_grad_(True) for t in (x, a, bb))

    def eager():
        xe.grad = ae.grad = be.grad = None
        y = F.linear(xe, w, b) + scaling * F.linear(F.linear(F.dropout(xe, p, training=True), ae), be)
        y.backward(dy)
        return xe.grad, ae.grad, be.grad

    return {"cpp": fused(_cpp_backend), "torch": fused(torch_backend), "eager": eager}


def _round(fns, times):
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    return sum(ts[-1] for ts in times.values())


def measure(fns, budget_s):
    """(median seconds per call of each fn, repeats): one call of each in turn per round, rounds repeated."""
    first = {name: [] for name in fns}
    if _round(fns, first) > 1.0:  # calls of seconds: the first round's one-time costs are negligible
        times = first
        rounds = max(0, min(2, int(budget_s / sum(ts[0] for ts in first.values())) - 1))
    else:  # the first round was the warm-up; the second estimates the rounds the budget allows
        times = {name: [] for name in fns}
        per_round = _round(fns, times)
        rounds = max(4, min(25, int(budget_s / per_round))) - 1
    for _ in range(rounds):
        _round(fns, times)
    return {name: statistics.median(ts) for name, ts in times.items()}, len(times["cpp"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tokens 64 and 1024, r 16 only")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--shapes", type=int, nargs="+", default=[1024, 4096], help="K = N")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timing per configuration")
    ap.add_argument("--no-torch", action="store_true", help="leave out the torch CPU path")
    ap.add_argument("--max-call", type=float, default=15.0,
                    help="seconds: skip torch and eager where their fwd+bwd, predicted from the GFLOP/s they "
                         "reached at fewer tokens, would take longer (bf16 GEMMs without bf16 units)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.ranks, args.budget = [64, 1024], [16], min(args.budget, 1.0)
    if not _cpp_backend.available():
        sys.exit("the C++ backend is unavailable (see the warning above)")
    t0 = time.perf_counter()
    _cpp_backend.load()
    print(f"C++ extension loaded in {time.perf_counter() - t0:.1f} s from {_cpp_backend.build_dir()}")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"scaling 2.0, median of interleaved repeats; ms per fwd+bwd")
    header = f"{'thr':>3} {'dtype':>5} {'K=N':>5} {'r':>3} {'p':>4} {'tokens':>6} | {'cpp':>9} {'torch':>9} " \
             f"{'eager':>9} | {'cpp/eager':>9} {'target':>6} {'reps':>4}"
    print(header)
    print("-" * len(header))
    misses = skipped = 0
    rate = {}  # (dtype, K=N, threads, provider) -> fwd+bwd GEMM flop/s measured so far
    start = time.perf_counter()
    for threads, dt, KN, r, p, M in itertools.product(args.threads, args.dtypes, args.shapes, args.ranks,
                                                       args.dropout, args.tokens):
        torch.set_num_threads(threads)
        x, w, b, a, bb, dy = make(M, KN, KN, r, DTYPES[dt])
        fns = providers(x, w, b, a, bb, dy, 2.0, p)
        if args.no_torch:
            del fns["torch"]
        flop = 4.0 * M * KN * KN  # the two M x K x N GEMMs of fwd+bwd
        for name in ("torch", "eager"):
            known = rate.get((dt, KN, threads, name))
            if name in fns and known and flop / known > args.max_call:
                del fns[name]
        med, reps = measure(fns, args.budget)
        for name, seconds in med.items():
            rate[(dt, KN, threads, name)] = flop / seconds
        cell = lambda name: f"{med[name] * 1e3:9.2f}" if name in med else f"{'skip':>9}"
        if "eager" in med:
            ratio = med["cpp"] / med["eager"]
            target = 0.8 if p > 0 else 1.0
            ok = ratio <= target
            misses += not ok
            verdict = f"{ratio:9.2f} {('<=' if ok else '> ') + str(target):>6}"
        else:
            skipped += 1
            est = flop / rate[(dt, KN, threads, "eager")]
            verdict = f"{'~' + format(med['cpp'] / est, '.2f'):>9} {'est':>6}"
        print(f"{threads:>3} {dt:>5} {KN:>5} {r:>3} {p:>4} {M:>6} | {cell('cpp')} {cell('torch')} "
              f"{cell('eager')} | {verdict} {reps:>4}", flush=True)
    print(f"{misses} configuration(s) over target, {skipped} with eager skipped (its time estimated from its "
          f"GFLOP/s at fewer tokens: 'est'); total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
