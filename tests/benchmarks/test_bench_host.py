"""The benchmark's host-overhead part: fused_lora with its kernels stubbed out against eager torch."""
import contextlib
import json
import os

import pytest

from fused_lora.benchmarks import cli, host, layout
from fused_lora.kernels.report import KERNELS

FEW_ROUNDS = dict(min_rounds=20, max_rounds=20)


def _kernels():
    import importlib

    from fused_lora.kernels.report import LAUNCHER_MODULES

    return {name: getattr(importlib.import_module(LAUNCHER_MODULES[name]), name) for name in KERNELS}


def test_host_part_reports_positive_times_per_dropout():
    result = host.measure_host_overhead("cpu", **FEW_ROUNDS)
    assert [row.dropout for row in result.rows] == list(host.HOST_DROPOUTS)
    for row in result.rows:
        assert row.fused_us > 0 and row.eager_us > 0
        assert row.fused_us <= row.fused_median_us and row.eager_us <= row.eager_median_us
        assert row.ratio == pytest.approx(row.fused_us / row.eager_us)
        assert row.launches_per_call >= 1 and row.rounds == 20
    assert result.command == "fused-lora-bench --host-only"


def test_stubs_are_removed_afterwards_even_after_an_error():
    real = _kernels()
    with pytest.raises(ZeroDivisionError):
        with host.stubbed_kernels() as launches:
            assert all(k is not real[name] for name, k in _kernels().items())
            _kernels()["_lora_fwd_kernel"][(1,)](1, 2, BLOCK=3)
            assert launches == {"_lora_fwd_kernel": 1}
            1 / 0
    assert _kernels() == real
    host.measure_host_overhead("cpu", **FEW_ROUNDS)
    after = _kernels()
    assert all(after[name] is real[name] for name in KERNELS)


@pytest.mark.parametrize("interpret", [None, "1", "0"])
def test_environment_is_restored(monkeypatch, interpret):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")  # the host part must not measure the torch backend
    result = host.measure_host_overhead("cpu", **FEW_ROUNDS)
    assert all(row.launches_per_call >= 1 for row in result.rows)
    assert os.environ.get("TRITON_INTERPRET") == interpret
    assert os.environ["FUSED_LORA_BACKEND"] == "torch"


def test_a_path_that_misses_the_kernels_is_an_error(monkeypatch):
    monkeypatch.setattr(host, "triton_path_env", lambda device: contextlib.nullcontext())
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    with pytest.raises(RuntimeError, match="torch backend"):
        host.measure_host_overhead("cpu", **FEW_ROUNDS)
    assert _kernels()["_lora_fwd_kernel"].__class__.__name__ != "_NoOpKernel"


def test_host_only_prints_the_part_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(host, "HOST_MIN_ROUNDS", 20)
    monkeypatch.setattr(host, "HOST_MAX_ROUNDS", 20)
    assert cli.main(["--host-only", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "Host overhead, measured" in text and "fused/eager" in text and "fused-lora-bench --host-only" in text
    assert "[1/4]" not in text  # nothing else runs
    assert all(len(line) <= layout.WIDTH for line in text.splitlines())
    data = json.loads((tmp_path / "host.json").read_text())
    assert data["metadata"]["git_commit"] and data["metadata"]["date_utc"]
    assert len(data["host_overhead"]["rows"]) == len(host.HOST_DROPOUTS)
