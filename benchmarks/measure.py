"""Measurements: saved-activation bytes (exact, any device), CPU wall times, GPU times and peak memory."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .providers import Layer


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage; works on meta tensors too (their data_ptr is 0)."""
    return t.untyped_storage()._cdata


@dataclass
class SavedBytes:
    activation_bytes: int  # storages autograd keeps for backward, parameters excluded, each counted once
    tensors: list[str] = field(default_factory=list)  # "dtype(shape)" of each counted storage's saved view


def saved_activation_bytes(layer: Layer, x: torch.Tensor) -> SavedBytes:
    """Bytes autograd saves in one forward, via torch.autograd.graph.saved_tensors_hooks.

    Counted by storage (a view of x and x itself are one storage), whole storage, once each;
    storages of the layer's parameters (W, b, A, B) are excluded. Exact on any device, meta included.
    """
    params = {storage_key(t) for t in layer.parameters if t is not None}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        key = storage_key(t)
        if key not in params and key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), f"{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.forward(x)
    return SavedBytes(sum(n for n, _ in seen.values()), [desc for _, desc in seen.values()])


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80), linear interpolation between order statistics."""
    xs = sorted(samples)

    def q(f):
        pos = f * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def clear_grads(tensors) -> None:
    """Fresh grads, as after optimizer.zero_grad(): backward then stores each grad instead of adding
    it into an old one (an extra add launch per leaf that a training step does not make)."""
    for t in tensors:
        t.grad = None


def direction_fns(layer: Layer, x: torch.Tensor, dy: torch.Tensor):
    """{direction: callable} for fwd, bwd (on a retained graph, fixed dY) and fwd+bwd.

    The caller clears the grads before every timed call (time_cpu_interleaved, do_bench's
    grad_to_none). The bwd graph is built here and lives as long as the returned callables.
    """
    y = layer.forward(x)

    def fwd():
        layer.forward(x)

    def bwd():
        y.backward(dy, retain_graph=True)

    def fwd_bwd():
        layer.forward(x).backward(dy)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def time_cpu_interleaved(fns: dict, grads: dict, *, warmup: int = 1, min_reps: int = 3, max_reps: int = 25,
                         budget_s: float = 0.3) -> dict:
    """{name: ((median, p20, p80) ms of wall time, reps)} of each callable, timed round-robin.

    One rep of every callable per round, so a background load that comes and goes lands on all of
    them alike and their ratios stay meaningful: on this project's shared 2-core machine, timing one
    provider after another once gave gemm's fwd+bwd 24.8 ms against 6.1 + 10.5 ms for its fwd and
    bwd, and fused "0.56x gemm". Rounds repeat until each callable has budget_s of samples on average
    (min_reps..max_reps rounds). grads: {name: tensors whose .grad is cleared before each call}.
    """
    for _ in range(warmup):
        for name, fn in fns.items():
            clear_grads(grads.get(name, ()))
            fn()
    samples: dict = {name: [] for name in fns}
    while True:
        for name, fn in fns.items():
            clear_grads(grads.get(name, ()))
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
        rounds = len(next(iter(samples.values()))) if samples else max_reps
        spent = sum(sum(v) for v in samples.values())
        if rounds >= max_reps or (rounds >= min_reps and spent >= budget_s * len(fns)):
            break
    return {name: (tuple(v * 1e3 for v in quantiles(xs)), len(xs)) for name, xs in samples.items()}


def time_gpu(fn, grads, *, warmup_ms: int = 25, rep_ms: int = 100):
    """(median, p20, p80) in ms from triton.testing.do_bench: synchronised, after warm-up, L2 flushed.

    do_bench sets each of grads' .grad to None before every timed call (its first call, runtime
    estimate and warm-up accumulate into them; those are not timed).
    """
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8],
                                            grad_to_none=grads)
    return (med, p20, p80), None


def peak_memory(layer: Layer, x: torch.Tensor, dy: torch.Tensor, grads, *, cuda=None) -> int:
    """Peak bytes allocated during one fwd+bwd from a clean state, above what was allocated before.

    Call it before building the retained graph of direction_fns (nothing of an earlier forward may
    be alive). One untimed fwd+bwd first: the first cuBLAS call allocates its workspace through the
    caching allocator, and that one-off allocation would land in the first provider's peak. Grads
    are cleared before the measured step, so it allocates them as a training step does after
    zero_grad(). ``cuda`` is torch.cuda (injectable for tests).
    """
    cuda = torch.cuda if cuda is None else cuda
    clear_grads(grads)
    layer.forward(x).backward(dy)
    clear_grads(grads)
    cuda.synchronize()
    before = cuda.memory_allocated()
    cuda.reset_peak_memory_stats()
    layer.forward(x).backward(dy)
    cuda.synchronize()
    peak = cuda.max_memory_allocated() - before
    clear_grads(grads)
    return peak


def tflops(flops: int, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def time_cpu_dropout_mask(rows: int, cols: int, p: float, *, reps: int = 5) -> float:
    """Median ms of one keep-mask of fused_lora's CPU path (numpy Philox, the kernels' bits)."""
    from fused_lora.dropout import dropout_keep_mask

    samples = []
    for seed in range(reps):
        start = time.perf_counter()
        dropout_keep_mask(seed, rows, cols, p)
        samples.append(time.perf_counter() - start)
    return quantiles(samples)[0] * 1e3
