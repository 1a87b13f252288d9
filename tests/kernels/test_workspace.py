"""The launchers' zero-at-rest workspaces (kernels/launchers.py: _workspace), outside and inside CUDA graph capture.

CPU tensors stand in for a stream's: _capturing is faked where a capture is meant (tests/test_gpu.py captures one)."""
import torch

from fused_lora.kernels import launchers

CPU = torch.device("cpu")


def test_one_workspace_per_stream_reused_and_grown(monkeypatch):
    monkeypatch.setattr(launchers, "_workspaces", {})
    first = launchers._workspace(CPU, 3, 5)
    assert launchers._workspace(CPU, 2, 4) is first
    grown = launchers._workspace(CPU, 4, 2)
    assert (grown.counters.numel(), grown.accumulator.numel()) == (4, 5)
    assert launchers._workspaces == {(CPU, 0): grown}


def test_a_graph_capture_gets_its_own_zeroed_workspace_at_every_call(monkeypatch):
    """Never the stream's cached one: an eager call that grew it later would free it under the graph."""
    monkeypatch.setattr(launchers, "_workspaces", {})
    cached = launchers._workspace(CPU, 64, 64)
    monkeypatch.setattr(launchers, "_capturing", lambda device: True)
    made = [launchers._workspace(CPU, 3, 5) for _ in range(2)]
    for workspace in made:
        assert (workspace.counters.numel(), workspace.accumulator.numel()) == (3, 5)
        assert not workspace.counters.any() and not workspace.accumulator.any()
        assert workspace.counters.data_ptr() != cached.counters.data_ptr()
        assert workspace.accumulator.data_ptr() != cached.accumulator.data_ptr()
    assert made[0].counters.data_ptr() != made[1].counters.data_ptr()
    assert launchers._workspaces == {(CPU, 0): cached}  # the cache neither used nor changed


def test_no_capture_on_cpu():
    assert not launchers._capturing(CPU)
