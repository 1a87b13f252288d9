"""fused-lora-bench: the tiny preset end to end, the filters, the model's link to the launchers."""
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from fused_lora.benchmarks import cli, layout, measure, metadata, progress, roofline, sections
from fused_lora.benchmarks.cli import parse_shapes
from fused_lora.benchmarks.providers import BUILDERS, Layer, Params, make_input, torch_backend_for_cpu
from fused_lora.benchmarks.rows import MeasuredRow, Timing
from fused_lora.benchmarks.sweep import HEADLINE, PROVIDERS, Point
from fused_lora.benchmarks.tables import format_table
from fused_lora.kernels import configs, launchers, plans
from spies import spy_on_kernels

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
TAGS = ("mode", "device", "torch", "triton", "git_commit", "date_utc")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["--tiny", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    return out, stdout.getvalue()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_says_cpu_mode_and_prints_four_parts(tiny_run):
    _, text = tiny_run
    assert sections.CPU_MODE_BANNER in text
    for part in ("[1/4] Measured CPU times (not GPU)", "[2/4] Activation bytes saved", "[3/4] MODELED H100",
                 "[4/4] Host overhead, measured"):
        assert part in text


def test_tiny_run_fwd_bwd_is_not_above_fwd_plus_bwd(tiny_run):
    """fwd+bwd does the work of fwd and then of bwd, so its time is not above their sum beyond noise.

    The allowance is the widest relative p20-p80 spread of the row's three timings: a gap smaller than
    that is within the scatter of the very samples the medians come from. Measured on this project's
    2-core machine with other test suites running (load average 3-6, `fused-lora-bench --tiny` run 12
    times, 4 of them next to two extra busy loops): spreads 0.05-0.46; fwd+bwd / (fwd + bwd) - 1 stayed
    between -11% and +5%, inside the allowance on every row, while the earlier round-robin of each
    direction on its own put fwd+bwd up to 19% above fwd + bwd and broke this allowance in 3 of 4 runs.
    """
    out, _ = tiny_run
    for r in _rows(out / "points.csv"):
        med = {d: float(r[f"{d}_ms"]) for d in ("fwd", "bwd", "fwd+bwd")}
        spread = max((float(r[f"{d}_ms_p80"]) - float(r[f"{d}_ms_p20"])) / med[d] for d in med)
        assert med["fwd+bwd"] <= (med["fwd"] + med["bwd"]) * (1 + spread), (r["provider"], r["dropout"], med, spread)


def _long_lines(text):
    return [line for line in text.splitlines() if len(line) > layout.WIDTH]


def test_tiny_run_fits_120_columns(tiny_run):
    _, text = tiny_run
    assert layout.WIDTH == 120
    assert _long_lines(text) == []


def test_model_only_run_fits_120_columns(tmp_path, capsys):
    # The widest shape label and token count, two ranks (so the sweep summary prints), launch lists.
    argv = ["--model-only", "--verbose", "--shapes", "4096x4096,14336x4096", "--tokens", "1,16384", "--ranks",
            "16,128", "--dtypes", "bf16", "--quiet", "--no-plots", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "modeled fwd+bwd us across the sweep" in text and "_lora_bwd_dx_da_db_kernel" in text
    assert _long_lines(text) == []


def _widest_gpu_rows():
    """Measured rows as a GPU run stores them, with labels and numbers wider than any sweep produces."""
    rows = []
    for provider, ms in zip(PROVIDERS, (0.0123, 1.23, 12.3, 123.0, 1234.0)):
        ratios = {ref: 12.34 for ref in ("gemm", "eager", "peft")}
        timings = {d: Timing(ms, ms * 0.99, ms * 1.01, 987.6, ratio_to=ratios) for d in ("fwd", "bwd", "fwd+bwd")}
        rows.append(MeasuredRow("measured-gpu", Point(14336, 28672, 16384, 128, 0.1, "bfloat16"), provider,
                                saved_bytes=123456 * 2**20, peak_mem_bytes=123456 * 2**20, timings=timings))
    return rows


def test_gpu_tables_fit_120_columns(capsys):
    meta = {"device": "NVIDIA H200 NVL with a long marketing name", "cpu_threads": 1}
    sections.print_measured(_widest_gpu_rows(), True, meta, False)
    text = capsys.readouterr().out
    assert "1,234 [1,222-1,246]" in text and "peak MiB" in text
    assert _long_lines(text) == []


def test_format_table_splits_wide_tables_repeating_the_keys():
    rows = [["a", "x" * 50, "y" * 50, 1.5], ["bb", "x", "y", 2.5]]
    text = format_table(["key", "first", "second", "n"], rows, keys=1, width=80)
    tables = text.split("\n\n")
    assert len(tables) == 2
    assert all(t.splitlines()[0].split()[0] == "key" for t in tables)
    assert [t.splitlines()[0].split()[1:] for t in tables] == [["first"], ["second", "n"]]
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "\n\n" not in format_table(["key", "n"], rows[:1] and [["a", 1.0]], keys=1, width=80)


def test_tiny_run_writes_measured_points(tiny_run):
    out, _ = tiny_run
    rows = _rows(out / "points.csv")
    assert {r["provider"] for r in rows} == set(PROVIDERS)
    for r in rows:
        assert r["kind"] == "measured-cpu" and r["mode"] == "cpu"
        assert all(r[t] for t in TAGS)
        assert not r.get("error")
        for d in ("fwd", "bwd", "fwd+bwd"):
            med, p20, p80 = (float(r[f"{d}_ms{s}"]) for s in ("", "_p20", "_p80"))
            assert 0 < p20 <= med <= p80
    by = {(r["provider"], r["dropout"]): r for r in rows}
    fused, gemm = by[("fused", "0.0")], by[("gemm", "0.0")]
    assert float(fused["fwd+bwd_ratio_to_gemm"]) == pytest.approx(float(fused["fwd+bwd_ms"]) / float(gemm["fwd+bwd_ms"]))
    assert float(gemm["fwd+bwd_ratio_to_gemm"]) == 1.0


def test_tiny_run_writes_modeled_rows_labelled_modeled(tiny_run):
    out, _ = tiny_run
    rows = _rows(out / "modeled.csv")
    assert rows and all(r["kind"] == "modeled-h100" for r in rows)
    # measured_host_us: the host-overhead part's measured time per layer, printed beside the model.
    numbers = [k for k in rows[0] if k not in ("kind", "shape", "provider", "direction", "dtype", "bias", *TAGS)
               and k not in ("in_features", "out_features", "tokens", "r", "dropout", "measured_host_us")]
    assert numbers and all(k.startswith("modeled_") for k in numbers)
    at = {(r["provider"], r["direction"], r["dropout"]): r for r in rows
          if (r["shape"], r["tokens"], r["r"], r["dtype"]) == ("4096->4096", "8192", "16", "bfloat16")}
    for d in ("fwd", "bwd", "fwd+bwd"):
        assert float(at[("fused", d, "0.0")]["modeled_hbm_mib"]) < float(at[("eager", d, "0.0")]["modeled_hbm_mib"])
    # The bare GEMM's compulsory bytes are x, W and y once each, in bf16.
    M, K, N = 8192, 4096, 4096
    assert float(at[("gemm", "fwd", "0.0")]["modeled_hbm_mib"]) == pytest.approx((M * K + N * K + M * N) * 2 / 2**20)


def test_tiny_run_writes_json_with_metadata_and_launches(tiny_run):
    out, _ = tiny_run
    data = json.loads((out / "points.json").read_text())
    assert all(data["metadata"][t] for t in TAGS)
    assert data["modeled_assumptions"]["peak_flops_bf16_fp16"] == 989e12
    assert data["modeled_assumptions"]["hbm_bytes_per_s"] == 3.35e12
    fused_fwd = [m for m in data["modeled"] if m["provider"] == "fused" and m["direction"] == "fwd"]
    # The headline point (8192 tokens, bf16): the shrink's shares made inside the forward launch.
    assert [launch[0] for launch in fused_fwd[0]["launches"]] == ["_lora_fwd_kernel"]


def test_tiny_run_saved_bytes(tiny_run):
    out, _ = tiny_run
    rows = {(r["provider"], r["dropout"]): int(r["saved_bytes"]) for r in _rows(out / "saved_bytes.csv")}
    M, K, r = HEADLINE["tokens"], HEADLINE["shape"][0], HEADLINE["r"]
    # fused keeps x and S (bf16); with dropout, PEFT's formula adds the bool mask and keeps dropout(x), not x.
    assert rows[("fused", "0.0")] == rows[("fused", "0.1")] == (M * K + M * r) * 2
    assert rows[("eager", "0.1")] == rows[("peft", "0.1")] == (M * K + M * r) * 2 + M * K
    assert rows[("gemm", "0.0")] == 0


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_tiny_run_writes_plots(tiny_run):
    out, _ = tiny_run
    assert (out / "ratio_to_gemm_4096x4096.png").stat().st_size > 0
    assert (out / "saved_bytes.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--providers", "fused,nope"], "unknown provider 'nope'"),
    (["--shapes", "4096by4096"], "bad shape '4096by4096'"),
    (["--ranks", "0"], "bad rank '0'"),
    (["--ranks", "300"], "bad rank '300'"),
    (["--dropout", "1.0"], "bad dropout '1.0'"),
    (["--dtypes", "int8"], "unknown dtype 'int8'"),
    (["--tokens", "-3"], "bad token count"),
])
def test_bad_filters_exit_with_a_clear_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_device_cuda_without_cuda_is_an_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda", "--out", str(tmp_path)])
    assert "no CUDA device" in capsys.readouterr().err


def test_parse_shapes_accepts_both_spellings():
    assert parse_shapes("4096x1024, 8192->28672") == ((4096, 1024), (8192, 28672))


# --- the fused model follows the launchers -------------------------------------------------------

def _fused_kernel_launches(point, **kw):
    launches = roofline.fused_launches(point, "fwd", **kw) + roofline.fused_launches(point, "bwd", **kw)
    return [launch.name for launch in launches]


def test_fused_model_follows_the_token_regime(monkeypatch):
    point = Point(4096, 4096, 64, 16, 0.0, "bfloat16")
    assert _fused_kernel_launches(point) == ["_lora_fwd_kernel", "_lora_bwd_dx_da_db_kernel"]  # few tokens
    monkeypatch.setattr(configs, "FEW_TOKENS", 32)
    monkeypatch.setattr(configs, "MID_TOKENS", 32)  # 64 tokens are now many: no one-launch backward tiles
    # fp16 / bf16: the shrink's shares in the forward launch, the dS / dB jobs in the dX launch; in deterministic
    # mode the backward's three launches (fixed-order sums).
    assert _fused_kernel_launches(point) == ["_lora_fwd_kernel", "_lora_bwd_dx_kernel"]
    assert _fused_kernel_launches(point, deterministic=True) == ["_lora_fwd_kernel", "_lora_bwd_dy_kernel",
                                                                 "_lora_bwd_dx_kernel", "_lora_bwd_da_kernel"]


def test_fused_model_follows_the_tile_config(monkeypatch):
    point = Point(4096, 4096, 8192, 16, 0.0, "bfloat16")
    before = {l.name: l for l in roofline.fused_launches(point, "fwd")}["_lora_fwd_kernel"]
    original = configs.fwd_choices

    def wider(*args, **kwargs):
        return tuple((configs.TileConfig(BLOCK_M=cfg.BLOCK_M, BLOCK_N=256, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M),
                      fuse) for cfg, fuse in original(*args, **kwargs))

    monkeypatch.setattr(configs, "fwd_choices", wider)
    after = {l.name: l for l in roofline.fused_launches(point, "fwd")}["_lora_fwd_kernel"]
    # 64 row blocks x (32 column tiles + the share jobs) -> x (16 + the share jobs): 8 or 16 of them per row block,
    # as the plan weighs them (configs.IN_LAUNCH_SHARE_TILES)
    assert (before.schedule.tiles, after.schedule.tiles) == (32, 16)
    for launch in (before, after):
        shares = launch.schedule.parts
        assert shares in (8, 16) and f"grid=({64 * (launch.schedule.tiles + shares)},)" in launch.detail


def test_fused_model_follows_determinism():
    point = Point(4096, 4096, 8192, 16, 0.0, "bfloat16")
    atomics = roofline.fused_launches(point, "bwd")
    partials = roofline.fused_launches(point, "bwd", deterministic=True)
    # Both finish their sums in the kernels, no memset, sum or cast: one launch with the dS / dB jobs inside (fp32
    # atomics), or three (fixed-order partials).
    assert [l.name for l in atomics] == ["_lora_bwd_dx_kernel"] and atomics[0].atomic_bytes > 0
    assert [l.name for l in partials] == ["_lora_bwd_dy_kernel", "_lora_bwd_dx_kernel", "_lora_bwd_da_kernel"]
    assert all(l.atomic_bytes == 0 for l in partials) and "dB_partials" in partials[0].detail


@pytest.mark.parametrize("M, r, p", [(70, 5, 0.1), (300, 40, 0.0), (5, 7, 0.1), (20, 48, 0.0)])
def test_launchers_launch_the_plan_the_model_reports(monkeypatch, M, r, p):
    """Under TRITON_INTERPRET=1: every kernel launch of one fwd+bwd equals the modeled plan."""
    from fused_lora.functional import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    launches = []
    spy_on_kernels(monkeypatch, log=launches)
    point = Point(40, 24, M, r, p, "float16")
    params = Params.make(point, "cpu")
    x, dy = make_input(point, "cpu")
    BUILDERS["fused"](params).forward(x).backward(dy)

    planned = [l for l in plans.plan_lora_fwd(M, 24, 40, r, torch.float16, dropout=p > 0, bias=False,
                                              num_sms=launchers._INTERPRETER_SMS)
               + plans.plan_lora_bwd(M, 24, 40, r, torch.float16, dropout=p > 0, deterministic=False,
                                     num_sms=launchers._INTERPRETER_SMS) if l.is_triton]
    expected = [(l.kernel, l.grid, l.constexprs, l.config.num_warps, l.config.num_stages) for l in planned]
    log = [(l.kernel, l.grid, l.constexprs, l.kwargs["num_warps"], l.kwargs["num_stages"]) for l in launches]
    assert log == expected
    modeled = [l.name for l in roofline.fused_launches(point, "fwd+bwd", num_sms=launchers._INTERPRETER_SMS)
               if l.name.startswith("_lora")]
    assert modeled == [e[0] for e in expected]


# --- measurement helpers ------------------------------------------------------------------------

def test_saved_bytes_on_meta_equal_saved_bytes_on_cpu():
    point = Point(48, 40, 33, 8, 0.0, "float32")
    counts = {}
    for device in ("cpu", "meta"):
        with torch_backend_for_cpu():
            for provider in ("fused", "eager", "addmm", "gemm"):
                layer = BUILDERS[provider](Params.make(point, device))
                counts[device, provider] = measure.saved_activation_bytes(layer, make_input(point, device)[0])
    for provider in ("fused", "eager", "addmm", "gemm"):
        assert counts["cpu", provider].activation_bytes == counts["meta", provider].activation_bytes
    assert counts["cpu", "fused"].activation_bytes == (33 * 48 + 33 * 8) * 4


def test_tflops_and_quantiles():
    assert measure.tflops(2 * 10**12, 1000.0) == pytest.approx(2.0)
    assert measure.quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    point = Point(4096, 4096, 8192, 16, 0.0, "bfloat16")
    assert point.useful_flops("gemm", "fwd") == 2 * 8192 * 4096 * 4096
    assert point.useful_flops("fused", "bwd") == 2 * 8192 * 4096 * 4096 + 4 * 8192 * 16 * 8192


def test_time_gpu_uses_do_bench_quantiles(monkeypatch):
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles, grad_to_none):
        seen.update(quantiles=quantiles, grads=grad_to_none)
        return [1.0, 0.9, 1.2]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    grads = [torch.zeros(1)]
    assert measure.time_gpu(lambda: None, grads) == ((1.0, 0.9, 1.2), None)
    assert seen == {"quantiles": [0.5, 0.2, 0.8], "grads": grads}


def test_cpu_timing_is_round_robin_with_fresh_grads():
    calls = []
    leaf = torch.zeros(1, requires_grad=True)
    names = ("a", "b", "c")

    def fn(name):
        def run():
            assert leaf.grad is None  # cleared before every call, warm-up included
            calls.append(name)
            leaf.grad = torch.ones(1)
        return run

    timed = measure.time_cpu_interleaved({n: fn(n) for n in names}, {n: [leaf] for n in names},
                                         warmup=1, min_rounds=12, max_rounds=12, blocks=3)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 13  # one warm-up round, then 12 rounds
    assert all(sorted(r) == list(names) for r in rounds)  # each callable once per round
    assert len({tuple(r) for r in rounds[1:]}) > 1  # in a shuffled order
    assert {name: reps for name, (_, reps) in timed.items()} == {n: 4 for n in names}  # one block of 3
    med, p20, p80 = timed["a"][0]
    assert 0 <= p20 <= med <= p80


def test_quietest_block_is_one_block_for_all_callables():
    # Three blocks of 4 rounds; a burst of load doubles every time in the first and the last.
    fwd = [2.0] * 4 + [1.0, 1.1, 0.9, 1.0] + [2.0] * 4
    bwd = [4.0] * 4 + [2.0, 2.1, 1.9, 2.0] + [4.0] * 4
    assert measure.quietest_block({"fwd": fwd, "bwd": bwd}, 3) == slice(4, 8)
    few = measure.quietest_block({"fwd": fwd[:2]}, 3)  # fewer rounds than blocks: blocks of one round
    assert few.stop - few.start == 1
    assert measure.quietest_block({"fwd": fwd}, 1) == slice(0, 12)


def test_cpu_clock_is_the_thread_clock_on_one_thread():
    import time

    assert measure.cpu_clock(1)[0] is time.thread_time
    assert measure.cpu_clock(2)[0] is time.perf_counter


class _FakeCuda:
    """torch.cuda's memory counters over a fake allocator driven by the layer under test."""

    def __init__(self):
        self.allocated = self.peak = 0
        self.events = []

    def synchronize(self):
        pass

    def memory_allocated(self):
        return self.allocated

    def max_memory_allocated(self):
        return self.peak

    def reset_peak_memory_stats(self):
        self.events.append("reset")
        self.peak = self.allocated

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)


def test_peak_memory_warms_up_then_measures_one_fresh_step():
    cuda = _FakeCuda()
    cuda.alloc(1000)  # inputs and parameters
    leaf = torch.zeros(2, requires_grad=True)
    workspace = {"allocated": False}

    class FakeOut:
        def backward(self, dy):
            cuda.events.append(f"step grad={'old' if leaf.grad is not None else 'fresh'}")
            if not workspace["allocated"]:  # cuBLAS's one-off workspace, kept by the allocator
                workspace["allocated"] = True
                cuda.alloc(500)
            cuda.alloc(70)  # saved activations and temporaries, freed at the end of the step
            cuda.allocated -= 70
            leaf.grad = torch.ones(2)

    layer = Layer(lambda x: FakeOut(), [leaf], [])
    leaf.grad = torch.ones(2)  # left over from an earlier timing
    assert measure.peak_memory(layer, None, None, [leaf], cuda=cuda) == 70
    assert cuda.events == ["step grad=fresh", "reset", "step grad=fresh"]
    assert leaf.grad is None


def test_format_table_aligns_columns():
    text = format_table(["name", "ms"], [["fused", 1.5], ["gemm", 12.25]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].endswith("1.5") and lines[3].endswith("12.2")


def test_progress_is_silent_off_a_terminal(capsys):
    bar = progress.Progress(3)
    bar.step("x")
    bar.close()
    assert capsys.readouterr().err == ""


def test_plans_import_no_triton():
    check = ("import sys\nimport fused_lora.kernels.plans as plans\n"
             "assert 'triton' not in sys.modules, 'importing fused_lora.kernels.plans imported triton'\n"
             "import torch\nplans.plan_lora_fwd(64, 64, 64, 8, torch.bfloat16, dropout=False, bias=False)\n"
             "assert 'triton' not in sys.modules\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr


def test_plans_module_itself_imports_neither_triton_nor_the_launchers():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(plans.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "dataclasses", "torch", ""}, imported  # "" is `from . import configs`


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_addmm_provider_grads_match_autograd(p):
    """The addmm provider's fp32 grads against autograd of the plain formula, by tests/numerics.py's rule:
    error vs fp64 at most twice plain torch's fp32 error plus half an ulp. Not exact: the provider puts
    the scaling on the GEMMs' alpha and the mask into an addcmul_, so it rounds in another order."""
    from numerics import assert_within_torch_error

    from fused_lora.benchmarks.providers import _AddmmLoRA

    g = torch.Generator().manual_seed(0)
    x, W, A, B, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((9, 7), (5, 7), (3, 7), (5, 3),
                                                                                   (9, 5)))
    leaves = [t.float().requires_grad_(True) for t in (x, A, B)]
    torch.manual_seed(1)
    _AddmmLoRA.apply(leaves[0], W.float(), None, leaves[1], leaves[2], 2.0, p).backward(dy.float())
    torch.manual_seed(1)  # the provider's native_dropout draw, for the references at both precisions
    mask = torch.native_dropout(x.float(), p, True)[1] if p else None

    def autograd_grads(dtype):
        ref = [t.to(dtype).requires_grad_(True) for t in (x, A, B)]
        x_lora = ref[0] * mask.to(dtype) / (1 - p) if p else ref[0]
        (ref[0] @ W.to(dtype).t() + 2.0 * (x_lora @ ref[1].t()) @ ref[2].t()).backward(dy.to(dtype))
        return [t.grad for t in ref]

    for name, got, plain, ref64 in zip(("dx", "dA", "dB"), leaves, autograd_grads(torch.float32),
                                       autograd_grads(torch.float64)):
        assert_within_torch_error(name, got.grad, plain, ref64, torch.float32)


def test_modeled_bytes_count_a_broadcast_once():
    t = torch.empty(64, device="meta", dtype=torch.bfloat16)
    assert roofline._addressed_bytes(t.expand(1024, 64)) == 64 * 2
    assert roofline._addressed_bytes(torch.empty(8, 4, device="meta").t()) == 8 * 4 * 4
    point = Point(256, 128, 512, 16, 0.0, "bfloat16", bias=True)
    (launch,) = roofline.traced_launches("gemm", point)["fwd"]
    assert launch.name == "aten.addmm"
    assert launch.bytes == (512 * 256 + 128 * 256 + 128 + 512 * 128) * 2  # x, W, b, y once each


def test_fused_grad_casts_follow_the_plan(monkeypatch):
    """The plans leave dA and dB in the parameters' dtype (no cast); one that left dB in fp32 is modeled with its
    cast launch."""
    point = Point(4096, 4096, 8192, 16, 0.0, "bfloat16")
    assert [l.name for l in roofline.fused_launches(point, "bwd")].count("to(bfloat16)") == 0
    original = plans.plan_lora_bwd_dy

    def db_in_fp32(M, N, r, dtype, **kw):  # as if the kernel left dB in fp32
        return [replace(l, writes=tuple(replace(op, dtype=torch.float32) if op.name == "dB" else op
                                        for op in l.writes)) for l in original(M, N, r, dtype, **kw)]

    monkeypatch.setattr(plans, "plan_lora_bwd_dy", db_in_fp32)
    # Deterministic: the three launches, whose dS / dB one plan_lora_bwd_dy plans.
    casts = [l for l in roofline.fused_launches(point, "bwd", deterministic=True) if l.name == "to(bfloat16)"]
    assert len(casts) == 1 and casts[0].detail.startswith("r:dB_float32")


def test_git_commit_of_an_untracked_copy_is_unknown(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    copy = tmp_path / "metadata.py"
    copy.write_text("# an installed copy inside someone else's repository\n")
    assert metadata.git_commit(copy) == ("unknown", None)
    assert metadata.git_commit()[0] != "unknown" or shutil.which("git") is None


def test_peft_missing_is_a_note_or_an_error(monkeypatch, capsys, tmp_path):
    from fused_lora.benchmarks import providers

    monkeypatch.setattr(providers, "peft_available", lambda: False)
    assert cli.usable_providers(("fused", "peft")) == (("fused",), ["provider peft skipped: peft is not installed "
                                                                    "(pip install 'fused_lora[peft]')"])
    with pytest.raises(SystemExit) as exc:
        cli.main(["--providers", "peft", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "no provider left to run: provider peft skipped: peft is not installed" in capsys.readouterr().err


def test_unquoted_arrow_gets_a_hint(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--shapes", "4096-", "--out", str(tmp_path)])  # what bash passes for --shapes 4096->4096
    assert "shell redirection" in capsys.readouterr().err


def test_modeled_occupancy_charges_small_grids():
    """A Triton launch with fewer programs than SMs gets that fraction of the peaks; torch ops fill the GPU."""

    full = roofline.ModeledLaunch("k", flops=0, bytes=10**9, programs=roofline.NUM_SMS)
    quarter = roofline.ModeledLaunch("k", flops=0, bytes=10**9, programs=roofline.NUM_SMS // 4)
    torch_op = roofline.ModeledLaunch("aten.mm", flops=0, bytes=10**9)
    body = full.seconds(1e15) - roofline.LAUNCH_OVERHEAD_S
    assert torch_op.seconds(1e15) == full.seconds(1e15)
    assert quarter.seconds(1e15) - roofline.LAUNCH_OVERHEAD_S == pytest.approx(4 * body)
