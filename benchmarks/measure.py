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


def _clear(tensors):
    for t in tensors:
        t.grad = None


def direction_fns(layer: Layer, x: torch.Tensor, dy: torch.Tensor):
    """{direction: callable} for fwd, bwd (on a retained graph, fixed dY) and fwd+bwd."""
    y = layer.forward(x)

    def fwd():
        layer.forward(x)

    def bwd():
        y.backward(dy, retain_graph=True)

    def fwd_bwd():
        layer.forward(x).backward(dy)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def time_cpu(fn, grads, *, warmup: int = 1, min_reps: int = 3, max_reps: int = 25, budget_s: float = 0.3):
    """(median, p20, p80) in ms of wall time; repeats until budget_s of samples (min_reps..max_reps)."""
    for _ in range(warmup):
        _clear(grads)
        fn()
    samples = []
    while len(samples) < min_reps or (len(samples) < max_reps and sum(samples) < budget_s):
        _clear(grads)
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return tuple(v * 1e3 for v in quantiles(samples)), len(samples)


def time_gpu(fn, grads, *, warmup_ms: int = 25, rep_ms: int = 100):
    """(median, p20, p80) in ms from triton.testing.do_bench: synchronised, after warm-up, L2 flushed."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8],
                                            grad_to_none=grads)
    return (med, p20, p80), None


def peak_memory_gpu(layer: Layer, x: torch.Tensor, dy: torch.Tensor) -> int:
    """Peak bytes allocated during one fwd+bwd, above what was allocated before (inputs, params)."""
    _clear(layer.trainable + [x])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    layer.forward(x).backward(dy)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def tflops(flops: int, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")
