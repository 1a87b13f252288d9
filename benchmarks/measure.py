"""Measurements: saved-activation bytes (exact, any device), CPU times, GPU times and peak memory."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from .providers import Layer

# CPU-mode rounds per point (each round runs every provider and direction once): until each callable
# has CPU_BUDGET_S of samples on average, at least 3 blocks of 8 rounds, at most 400 rounds. Measured
# on this project's 2-core machine: the default run's 4 points take about 16 s of timing (of its
# ~40 s), the tiny preset's 2 points 400 rounds in about 3 s.
CPU_MIN_ROUNDS = 24
CPU_MAX_ROUNDS = 400
CPU_BUDGET_S = 0.2
CPU_BLOCKS = 3


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


def interleaved_samples(fns: dict, grads: dict, *, warmup: int = 1, min_rounds: int = 3, max_rounds: int = 25,
                        budget_s: float = 0.3, seed: int = 0, clock=time.perf_counter) -> dict:
    """{name: [seconds of each round]}: every round calls each callable once, in a fresh random order.

    Rounds repeat until the callables have budget_s of samples each on average, read on ``clock``
    (min_rounds..max_rounds rounds). grads: {name: tensors whose .grad is cleared before each call}.

    Side by side, so a background load that comes and goes lands on all callables alike: on this
    project's shared 2-core machine, timing one provider after another once gave gemm's fwd+bwd
    24.8 ms against 6.1 + 10.5 ms for its fwd and bwd, and fused "0.56x gemm". Shuffled (seeded),
    because what ran just before a call changes its time: on `fused-lora-bench --tiny`
    (fwd+bwd_ms against fwd_ms + bwd_ms in points.csv, nothing else running) a fixed order with each
    direction in its own round-robin put fwd+bwd 4-11% above fwd + bwd for every provider, one fixed
    order over all directions 2-13% below, shuffled rounds within 3% either way.
    """
    rng = random.Random(seed)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            clear_grads(grads.get(name, ()))
            fns[name]()
    samples: dict = {name: [] for name in names}
    rounds = 0
    while names:
        order = names[:]
        rng.shuffle(order)
        for name in order:
            clear_grads(grads.get(name, ()))
            start = clock()
            fns[name]()
            samples[name].append(clock() - start)
        rounds += 1
        spent = sum(sum(v) for v in samples.values())
        if rounds >= max_rounds or (rounds >= min_rounds and spent >= budget_s * len(names)):
            break
    return samples


def quietest_block(samples: dict, blocks: int) -> slice:
    """The run of consecutive rounds (one of ``blocks`` equal ones) with the least load on all callables.

    A block's score is the sum over callables of log(block median / median of all rounds): the same
    block for every callable, so the fwd, bwd and fwd+bwd of a point (and the providers' ratios) come
    from one stretch of time. Taking each callable's own minimum block instead would bias fwd+bwd up
    against fwd + bwd: a sum of two minima is below the minimum of the sums.
    """
    rounds = min((len(v) for v in samples.values()), default=0)
    blocks = max(1, min(blocks, rounds))
    edges = [rounds * i // blocks for i in range(blocks + 1)]
    if blocks == 1:
        return slice(0, rounds)
    overall = {name: quantiles(xs)[0] for name, xs in samples.items()}

    def score(i):
        lo, hi = edges[i], edges[i + 1]
        return sum(math.log(max(quantiles(xs[lo:hi])[0], 1e-12) / max(overall[name], 1e-12))
                   for name, xs in samples.items())

    best = min(range(blocks), key=score)
    return slice(edges[best], edges[best + 1])


def cpu_clock(threads: int):
    """(clock, name) for CPU timing at ``threads`` torch threads.

    One thread: time.thread_time, the CPU time of the calling thread, which is also where CPU
    autograd runs backward. It leaves out the time other processes hold the core: on this project's
    2-core machine under a load average of 3 (other test suites), 20 calls of eager's bwd at
    1024->1024, 256 tokens, p=0.1 read 13.9 ms [9.2-18.8] on perf_counter and 9.4 ms [9.2-10.1] on
    thread_time, both clocks around the same calls; for the tiny preset's 0.1-0.9 ms calls, which
    are rarely preempted, the two agreed within 1%. More threads: wall time (perf_counter), as the
    intra-op threads' work is not the calling thread's.
    """
    if threads == 1:
        return time.thread_time, "CPU time of the timing thread (time.thread_time)"
    return time.perf_counter, "wall time (time.perf_counter)"


def time_cpu_interleaved(fns: dict, grads: dict, *, warmup: int = 1, min_rounds: int = CPU_MIN_ROUNDS,
                         max_rounds: int = CPU_MAX_ROUNDS, budget_s: float = CPU_BUDGET_S,
                         blocks: int = CPU_BLOCKS, seed: int = 0, clock=time.perf_counter) -> dict:
    """{name: ((median, p20, p80) ms on ``clock``, samples)} of each callable, timed side by side.

    All callables of a point (every provider and direction) run in shuffled rounds
    (interleaved_samples), so a background load that comes and goes lands on all of them alike; the
    statistics come from the quietest block of rounds (quietest_block): a burst of load from another
    process that covers part of the run is left out for all callables at once.
    """
    samples = interleaved_samples(fns, grads, warmup=warmup, min_rounds=min_rounds, max_rounds=max_rounds,
                                  budget_s=budget_s, seed=seed, clock=clock)
    block = quietest_block(samples, blocks)
    return {name: (tuple(v * 1e3 for v in quantiles(xs[block])), len(xs[block])) for name, xs in samples.items()}


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
