"""Host overhead: the Python-side cost of one tiny fused LoRA layer, forward and backward.

fused_lora.lora_linear runs with its five Triton kernels replaced by no-op launches, so what is left is
everything the host does around them (input checks, backend choice, autograd, plans, buffers, launch
arguments); it is timed side by side with PEFT's formula in eager torch (the benchmark's ``eager``
provider) on the same tensors. At this size both are pure overhead: on a GPU, a layer whose host time
exceeds its kernels' leaves the GPU idle.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import replace

from .rows import HostOverhead, HostRow
from .sweep import Point

# x (4, 32), W (32, 32) frozen, A (4, 32) and B (32, 4) trainable: small enough that no kernel or
# GEMM time matters, only the host's per-call work.
HOST_POINT = Point(32, 32, 4, 4, 0.0, "float32")
HOST_DROPOUTS = (0.0, 0.1)
HOST_COMMAND = "fused-lora-bench --host-only"
# Rounds of one call of each of the 4 callables (fused and eager, two dropouts), until each has
# HOST_BUDGET_S of samples: about 600 rounds and 1.5 s on this project's 2-core CPU
# (`fused-lora-bench --host-only`). The minimum over rounds is the host's cost when nothing else
# interferes; min and median gave the same fused/eager ratio within 0.05 there.
HOST_MIN_ROUNDS = 300
HOST_MAX_ROUNDS = 3000
HOST_BUDGET_S = 0.15


class _NoOpKernel:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` counts the launch, runs nothing."""

    def __init__(self, name: str, launches: Counter):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches[self.name] += 1


@contextlib.contextmanager
def stubbed_kernels():
    """Replace the kernels the launchers call (in fused_lora.kernels.launchers and .lora_embedding) by no-ops; yields a Counter of
    launches per kernel name. The real kernels are back afterwards, whatever happens inside."""
    import importlib

    from fused_lora.kernel_report import KERNELS, LAUNCHER_MODULES

    modules = {name: importlib.import_module(LAUNCHER_MODULES[name]) for name in KERNELS}
    originals = {name: getattr(modules[name], name) for name in KERNELS}
    launches: Counter = Counter()
    try:
        for name in KERNELS:
            setattr(modules[name], name, _NoOpKernel(name, launches))
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(modules[name], name, kernel)


@contextlib.contextmanager
def _environ(**values):
    """Set (a str) or unset (None) environment variables; restore the previous values afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def triton_path_env(device):
    """The environment under which fused_lora.lora_linear takes its Triton path on ``device``: CPU
    tensors get it only with TRITON_INTERPRET=1 (fused_lora.functional.select_backend); no
    FUSED_LORA_BACKEND override either way."""
    import torch

    if torch.device(device).type == "cpu":
        return _environ(TRITON_INTERPRET="1", FUSED_LORA_BACKEND=None)
    return _environ(FUSED_LORA_BACKEND=None)


def _callables(device) -> tuple[dict, dict]:
    """{(provider, dropout): one forward+backward} and {same key: tensors whose grads are cleared}."""
    from .providers import BUILDERS, Params, make_input

    fns, grads = {}, {}
    for p in HOST_DROPOUTS:
        point = replace(HOST_POINT, dropout=p)
        params = Params.make(point, device)
        x, dy = make_input(point, device)
        for provider in ("fused", "eager"):
            layer = BUILDERS[provider](params)
            fns[provider, p] = (lambda layer=layer, x=x, dy=dy: layer.forward(x).backward(dy))
            grads[provider, p] = layer.trainable + [x]
    return fns, grads


def measure_host_overhead(device="cpu", *, min_rounds: int | None = None, max_rounds: int | None = None,
                          budget_s: float | None = None) -> HostOverhead:
    """Host time of fused (kernels stubbed) and eager forward+backward, dropout 0 and 0.1, in one run.

    One HostRow per dropout. Times are the minimum over rounds of the calling thread's CPU time (on
    CUDA: host work only, nothing is synchronised), on one torch thread.
    """
    import torch

    from fused_lora.functional import select_backend

    from . import measure

    device = torch.device(device)
    min_rounds = HOST_MIN_ROUNDS if min_rounds is None else min_rounds
    max_rounds = HOST_MAX_ROUNDS if max_rounds is None else max_rounds
    budget_s = HOST_BUDGET_S if budget_s is None else budget_s
    clock, clock_name = measure.cpu_clock(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with triton_path_env(device), stubbed_kernels() as launches:
            fns, grads = _callables(device)
            probe = torch.empty(1, device=device)
            if select_backend(probe) != "triton":
                raise RuntimeError(f"fused_lora picks its {select_backend(probe)} backend for {device} tensors "
                                   "here, not the Triton path")
            launches_per_call = {}
            for p in HOST_DROPOUTS:  # one call each, counted: it proves the stubs are on the measured path
                before = sum(launches.values())
                fns["fused", p]()
                launches_per_call[p] = sum(launches.values()) - before
                measure.clear_grads(grads["fused", p])
            samples = measure.interleaved_samples(fns, grads, warmup=3, min_rounds=min_rounds,
                                                  max_rounds=max_rounds, budget_s=budget_s, clock=clock)
    finally:
        torch.set_num_threads(threads)
    if not all(launches_per_call.values()):
        raise RuntimeError(f"a fused call launched no kernel ({launches_per_call} per dropout): the measured "
                           "path did not reach the stubbed kernels")
    rows = []
    for p in HOST_DROPOUTS:
        fused, eager = samples["fused", p], samples["eager", p]
        rows.append(HostRow(dropout=p, fused_us=min(fused) * 1e6, eager_us=min(eager) * 1e6,
                            ratio=min(fused) / min(eager), fused_median_us=measure.quantiles(fused)[0] * 1e6,
                            eager_median_us=measure.quantiles(eager)[0] * 1e6,
                            launches_per_call=launches_per_call[p], rounds=len(fused)))
    command = HOST_COMMAND + ("" if device.type == "cpu" else f" --device {device}")
    K, N, M, r = HOST_POINT.in_features, HOST_POINT.out_features, HOST_POINT.tokens, HOST_POINT.r
    return HostOverhead(device=str(device), clock=clock_name, threads=1, command=command,
                        shape=f"x ({M}, {K}), W ({N}, {K}) frozen, A ({r}, {K}), B ({N}, {r}), {HOST_POINT.dtype}",
                        rows=rows)
