"""Shared by every test below tests/ (tests/benchmarks/cases included): the interpreter switch and the
`cuda` fixture. The kernel spy is in tests/spies.py and the tiny models in tests/peft_parity.py (helper
modules on sys.path through `pythonpath` in pyproject.toml's pytest section).

Runs the Triton kernels through the interpreter on CPU, unless the run is `pytest -m gpu`.
TRITON_INTERPRET must be set before triton is imported; nothing here imports triton, torch or fused_lora
at import, or touches CUDA.
"""
import os
import signal

import pytest


def pytest_configure(config):
    """TRITON_INTERPRET=1 unless the run is `pytest -m gpu`, so the kernels run in triton's interpreter
    on CPU tensors; an explicit TRITON_INTERPRET in the environment wins."""
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.pop("FUSED_LORA_BACKEND", None)


@pytest.fixture
def cuda():
    """The CUDA device, or a skip at run time (collection must work on a machine without CUDA)."""
    import torch

    from fused_lora.functional import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET=1: run `pytest -m gpu` to test the compiled kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


# Sentinels past the end of every launcher workspace made under `guarded_workspaces`, and its time limit (the
# slowest test using it takes about 20 s on 2 cores).
_GUARD, _SENTINEL, _TIMEOUT_S = 256, 7, 300


@pytest.fixture
def guarded_workspaces(monkeypatch):
    """Every zero-at-rest workspace the launchers make during the test (kernels/launchers.py: _workspace) is a view
    in front of a band of sentinels, checked at the end: a kernel that counts or adds past the counters or the
    accumulator its launcher sized fails the test. The interpreter does not fault there, and the launchers' shared
    workspace, grown by earlier launches, hid such a miscount."""
    import torch

    from fused_lora.kernels import launchers

    made = []

    def workspace(device, counters, accumulator):
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        found = launchers._workspaces.get((device, stream))
        if found is not None and found.counters.numel() >= counters and found.accumulator.numel() >= accumulator:
            return found
        n, m = max(counters, 1), max(accumulator, 1)
        c = torch.full((n + _GUARD,), _SENTINEL, device=device, dtype=torch.int32)
        a = torch.full((m + _GUARD,), float(_SENTINEL), device=device, dtype=torch.float32)
        c[:n], a[:m] = 0, 0.0
        made.append((c, n, a, m))
        launchers._workspaces[(device, stream)] = launchers._Workspace(c[:n], a[:m])
        return launchers._workspaces[(device, stream)]

    monkeypatch.setattr(launchers, "_workspaces", {})
    monkeypatch.setattr(launchers, "_workspace", workspace)
    # A counter read past the sized ones holds a sentinel, so a program may spin forever on it (_common._wait_for);
    # the interpreter runs that spin in Python, where the alarm turns the hang into a failure.
    def timed_out(signum, frame):
        raise TimeoutError(f"still running after {_TIMEOUT_S} s: a kernel spins on a counter no program fills")
    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    for c, n, a, m in made:
        assert (c[n:] == _SENTINEL).all(), f"a kernel wrote past the {n} counters its launcher sized"
        assert (a[m:] == _SENTINEL).all(), f"a kernel wrote past the {m} accumulator elements its launcher sized"
