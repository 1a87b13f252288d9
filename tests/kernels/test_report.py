"""Ahead-of-time checks of every kernel configuration the launchers can pick (no GPU needed).

Each (kernel, arch, dtype, config) is compiled for sm_80 and sm_90 by fused_lora.kernel_report and
read back with cuobjdump: no spills, shared memory within the per-block opt-in limit, and the
expected matrix instructions (wgmma on sm_90 for fp16/bf16).

All records come from one compile pass shared by the tests (a module-scoped fixture, in parallel
worker processes). The default matrix is every launcher config with 16-aligned arguments plus the
unaligned-rank variant at R = 16 (r = 8 and other ranks below 16 that are not multiples of 16);
FUSED_LORA_AOT_FULL=1 compiles the unaligned-rank variant at every R too (twice the compiles).
Cold, the default pass of 1074 compiles took 788 s on a 2-core machine (about 1.1 s of Triton compile and 0.3 s
of disassembly each): `kr.run_jobs(JOBS, processes=2)` with an empty TRITON_CACHE_DIR and
FUSED_LORA_REPORT_CACHE=0. Warm, the fixture's setup took 4 s (`pytest --durations`).

The conftest runs tests under TRITON_INTERPRET=1; the report compiles in worker processes started
without it, so these tests work either way.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fused_lora.kernels import report as kr

# slow: with empty caches the shared compile pass takes minutes on 2 cores (seconds when warm).
pytestmark = [pytest.mark.aot, pytest.mark.slow]


def _toolchain_missing() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return "triton is not installed"
    bin_dir = os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(bin_dir, tool)):
            return f"triton's NVIDIA backend has no {tool} ({bin_dir})"
    return None


_missing = _toolchain_missing()
if _missing:
    pytest.skip(f"AOT compile unavailable: {_missing}", allow_module_level=True)

FULL = os.environ.get("FUSED_LORA_AOT_FULL", "0") not in ("", "0")


def _jobs() -> list[dict]:
    if FULL:
        return kr.launch_jobs(alignments=("aligned", "rank"))
    return kr.launch_jobs(alignments=("aligned",)) + kr.launch_jobs(alignments=("rank",), ranks=(16,))


JOBS = _jobs()
IDS = [kr.job_id(j) for j in JOBS]
HOPPER_HALF = [i for i, j in zip(IDS, JOBS) if j["arch"] == 90 and j["dtype"] in ("fp16", "bf16")]


@pytest.fixture(scope="module")
def records() -> dict[str, dict]:
    recs = kr.run_jobs(JOBS, processes=os.cpu_count())
    return {kr.job_id(r): r for r in recs}


def _describe(r: dict) -> str:
    keys = ("registers", "spill_bytes", "stack_bytes", "local_bytes", "shared_bytes", "dynamic_shared",
            "static_shared", "shared_limit", "mma", "expected_mma", "sass_counts", "error")
    return json.dumps({k: r.get(k) for k in keys})


# --------------------------------------------------------------------------------------------
# Every record
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", IDS)
def test_compiles(records, rid):
    r = records[rid]
    assert r["error"] is None, f"{rid}: {r['error']}"


@pytest.mark.parametrize("rid", IDS)
def test_no_spills(records, rid):
    r = records[rid]
    assert r["error"] is None, r["error"]
    assert r["spill_bytes"] == 0, f"{rid} spills: {_describe(r)}"
    assert r["sass_counts"]["STL"] == 0, f"{rid} stores to local memory: {_describe(r)}"


@pytest.mark.parametrize("rid", IDS)
def test_shared_memory_fits(records, rid):
    r = records[rid]
    assert r["error"] is None, r["error"]
    assert r["shared_limit"] == kr.SHARED_LIMIT[r["arch"]]
    assert r["shared_bytes"] == r["dynamic_shared"] + r["static_shared"]
    assert r["shared_bytes"] <= kr.SHARED_LIMIT[r["arch"]], f"{rid} needs too much shared memory: {_describe(r)}"


@pytest.mark.parametrize("rid", IDS)
def test_matrix_instructions(records, rid):
    """wgmma (HGMMA) on sm_90 and mma.sync (HMMA) on sm_80 for fp16/bf16; FMA for fp32 without tf32."""
    r = records[rid]
    assert r["error"] is None, r["error"]
    assert r["mma"] == r["expected_mma"], f"{rid}: {r['mma']}, expected {r['expected_mma']}: {_describe(r)}"


# The dB dot of _lora_bwd_dy_kernel is (BLOCK_N x BLOCK_M) @ (BLOCK_M x R): its M is BLOCK_N, and wgmma
# needs M >= 64. Its configs use BLOCK_N = 32 from R = 128 on because 64 spilled (on sm_80, and on
# sm_90 for r % 16 != 0 at R = 256): that dot stays on mma.sync. Strict, so a fix shows up as XPASS.
def _mma_sync_expected(job: dict) -> str | None:
    if job["kernel"] == "_lora_bwd_dy_kernel" and job["config"].get("BLOCK_N", 64) < 64:
        return "dB dot with M = BLOCK_N < 64 cannot use wgmma (BLOCK_N = 64 spills)"
    return None


@pytest.mark.parametrize("rid", [
    pytest.param(i, marks=pytest.mark.xfail(strict=True, reason=_mma_sync_expected(j)))
    if _mma_sync_expected(j) else i
    for i, j in zip(IDS, JOBS) if i in HOPPER_HALF])
def test_no_mma_sync_next_to_wgmma_on_hopper(records, rid):
    r = records[rid]
    assert r["error"] is None, r["error"]
    assert not r["hmma_with_wgmma"], f"{rid}: a dot runs as mma.sync next to wgmma: {_describe(r)}"


@pytest.mark.parametrize("rid", IDS)
def test_pointer_offsets_are_int64(records, rid):
    """No tt.addptr takes an i32 offset: an index times a stride computed in int32 wraps at 2**31."""
    r = records[rid]
    assert r["error"] is None, r["error"]
    assert r["int32_offsets"] == [], f"{rid}: int32 pointer offsets in the TTIR: {r['int32_offsets'][:3]}"


def test_int32_pointer_offsets_finds_them():
    ttir = ("    %5 = tt.addptr %arg0, %4 : tensor<64x32x!tt.ptr<f16>>, tensor<64x32xi32> loc(#loc1)\n"
            "    %6 = tt.addptr %arg1, %3 : !tt.ptr<f32>, i32 loc(#loc2)\n"
            "    %7 = tt.addptr %arg2, %9 : tensor<64x!tt.ptr<bf16>>, tensor<64xi64> loc(#loc3)\n")
    assert [line.split()[0] for line in kr.int32_pointer_offsets(ttir)] == ["%5", "%6"]


_SEED_SPECIALISATION = """
import json, torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from fused_lora.kernels import report as kr

backend = make_backend(GPUTarget("cuda", 90, 32))
seeds = torch.zeros(3, dtype=torch.int64)  # seeds[1]: 8-byte aligned only
out = {}
for name in kr.KERNELS:
    kernel = kr._kernel_fn(name)
    if "seed_ptr" not in kernel.arg_names:
        continue
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    i = kernel.arg_names.index("seed_ptr")
    args = [torch.zeros(1) if n.endswith("_ptr") else (1.0 if n in kr.FLOAT_SCALARS else 16)
            for n in kernel.arg_names if not kernel.params[kernel.arg_names.index(n)].is_constexpr]
    keys = []
    for seed in (seeds[0], seeds[1]):
        args[i] = seed
        _, spec, _ = binder(*args, **{p.name: 16 for p in kernel.params if p.is_constexpr})
        keys.append(list(spec[i]))
    out[name] = keys
print(json.dumps(out))
"""


def test_seed_is_not_specialised():
    """The dropout seed is a pointer declared do_not_specialize: seeds at any address share one compiled
    variant, and its value is not part of the specialisation key (it is read on the device)."""
    env = kr._worker_env()
    out = subprocess.run([sys.executable, "-c", _SEED_SPECIALISATION], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(keys) == {"_lora_shrink_kernel", "_lora_fwd_kernel", "_lora_bwd_dx_kernel", "_lora_bwd_da_kernel",
                         "_lora_bwd_dx_da_db_kernel"}
    for name, (aligned, unaligned) in keys.items():
        assert aligned == unaligned == ["*i64", None], (name, aligned, unaligned)


def test_matrix_covers_every_launch_choice():
    by = {}
    for j in JOBS:
        by.setdefault((j["arch"], j["dtype"]), set()).add((j["kernel"], j["config"].get("R")))
    assert set(by) == {(a, d) for a in kr.ARCHS for d in kr.DTYPES}
    rank_free = {"_dora_magnitude_grad_kernel"}  # loops over r at run time: one config for every rank
    one_launch = "_lora_bwd_dx_da_db_kernel"  # configs.bwd_one_launch_config: R <= 64, in fp32 R <= 32
    for (_, dtype), combos in by.items():
        assert combos == {(k, R) for k in set(kr.KERNELS) - rank_free - {one_launch} for R in (16, 32, 64, 128, 256)} \
            | {(k, None) for k in rank_free} | {(one_launch, R) for R in ((16, 32) if dtype == "fp32" else (16, 32, 64))}
    assert len(set(IDS)) == len(IDS)


def _random_plans(rng, dtype) -> list:
    """Every plan's launches at one random size, rank, SM count and set of flags.

    Calls the plans itself rather than kr.plan_launches, so an argument that helper fails to vary shows.
    """
    from fused_lora.kernels import configs, lora_embedding, plans

    M, N, K = (int(2 ** rng.uniform(0, 14)) for _ in range(3))  # log-uniform: both token regimes
    r = rng.randint(1, configs.MAX_RANK)
    dropout, bias, deterministic = (rng.random() < 0.5 for _ in range(3))
    return [*plans.plan_lora_shrink(M, K, r, dtype, dropout=dropout),
            *plans.plan_lora_fwd(M, N, K, r, dtype, dropout=dropout, bias=bias),
            *plans.plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic),
            *plans.plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout),
            *plans.plan_lora_bwd_da(M, K, r, dtype, dropout=dropout, deterministic=deterministic,
                                    num_sms=rng.randint(1, 200)),
            *plans.plan_lora_bwd(M, N, K, r, dtype, dropout=dropout, deterministic=deterministic,
                                 num_sms=rng.randint(1, 200)),
            *plans.plan_dora_weight_norm(N, K, r, dtype),
            *plans.plan_lora_fwd(M, N, K, r, dtype, dropout=dropout, bias=bias, dora=True),
            *plans.plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic, dora=True, bias=bias, dropout=dropout),
            *plans.plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout, dora=True),
            *plans.plan_dora_magnitude_grad(M, N, r, dtype, dropout=dropout),
            *lora_embedding.plan_lora_embedding_fwd(M, K, N, r, dtype),
            *lora_embedding.plan_lora_embedding_bwd(M, K, N, r, dtype, deterministic=deterministic,
                                                    scale_grad_by_freq=dropout)]


def test_every_planned_launch_has_a_job():
    """A Triton launch of any plan at any size is a compiled config, so a new plan choice cannot escape the
    report (its jobs come from the plans at a few representative sizes)."""
    import random

    import torch

    rng = random.Random(0)
    for dtype in kr.DTYPES:
        jobs = {(j["kernel"], json.dumps(j["config"], sort_keys=True))
                for j in kr.launch_jobs(archs=(90,), dtypes=(dtype,), alignments=("aligned",))}
        kernels = set()
        for _ in range(40):
            for launch in _random_plans(rng, getattr(torch, kr._TORCH_DTYPE[dtype])):
                if launch.is_triton:
                    kernels.add(launch.kernel)
                    key = (launch.kernel, json.dumps(kr.launch_config(launch), sort_keys=True))
                    assert key in jobs, f"{dtype}: {key} has no job"
        assert kernels == set(kr.KERNELS), dtype


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

REQUIRED_KEYS = {"kernel", "arch", "dtype", "config", "registers", "spill_bytes", "shared_bytes", "mma"}


def test_cli_json_under_interpreter(records):
    """`python -m fused_lora.kernel_report --json` prints the records, even with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "fused_lora.kernel_report", "--json", "--arch", "90", "--dtype", "bf16",
           "--kernel", "_lora_shrink_kernel", "--align", "aligned"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert isinstance(data, list) and len(data) == 5  # one per padded rank
    for r in data:
        assert REQUIRED_KEYS <= set(r)
        assert (r["kernel"], r["arch"], r["dtype"]) == ("_lora_shrink_kernel", 90, "bf16")
        assert {"R", "BLOCK_M", "BLOCK_K", "num_warps", "num_stages"} <= set(r["config"])
        same = records[kr.job_id(r)]  # the same compile as the shared pass
        assert {k: r[k] for k in REQUIRED_KEYS} == {k: same[k] for k in REQUIRED_KEYS}
    assert sorted(r["config"]["R"] for r in data) == [16, 32, 64, 128, 256]


def test_table(records):
    table = kr.format_table(list(records.values()))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["kernel", "sm", "dtype"] and "limit" in lines[0]
    assert len(lines) == len(records) + 2


def test_import_is_cheap():
    code = ("import sys, fused_lora; before = set(sys.modules); import fused_lora.kernel_report; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('triton', 'torch') "
            "or m.startswith('fused_lora.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_report_module_is_cheap_to_import():
    """The report itself (fused_lora.kernels.report) adds no triton and no kernel module to what
    importing fused_lora imports."""
    code = ("import sys, fused_lora; before = set(sys.modules); import fused_lora.kernels.report; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] == 'triton' "
            "or m.startswith('fused_lora.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['fused_lora.kernels.report']", out.stdout


def test_alias_names_are_the_reports():
    import fused_lora.kernel_report as alias

    assert alias.main is kr.main and alias.KERNELS is kr.KERNELS


# --------------------------------------------------------------------------------------------
# Pieces, without compiling
# --------------------------------------------------------------------------------------------

class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _FakeKernel:
    __name__ = "_fake_kernel"

    def __init__(self, args, constexprs):
        self.arg_names = list(args) + list(constexprs)
        self.params = [_Param(a, False) for a in args] + [_Param(c, True) for c in constexprs]


def test_build_signature():
    k = _FakeKernel(["x_ptr", "db_work_ptr", "seed_ptr", "M", "r", "stride_xm", "stride_xk", "stride_bias_n",
                     "stride_sm", "stride_sr", "drop_threshold", "scaling"], ["R", "BLOCK_M"])
    sig, cx, attrs = kr.build_signature(k, "bf16", {"R": 16, "BLOCK_M": 64}, "aligned")
    assert sig == {"x_ptr": "*bf16", "db_work_ptr": "*fp32", "seed_ptr": "*i64", "M": "i32", "r": "i32",
                   "stride_xm": "i32", "stride_xk": "constexpr", "stride_bias_n": "constexpr", "stride_sm": "i32",
                   "stride_sr": "constexpr", "drop_threshold": "i32", "scaling": "fp32", "R": "constexpr",
                   "BLOCK_M": "constexpr"}
    assert cx == {"R": 16, "BLOCK_M": 64, "stride_xk": 1, "stride_bias_n": 1, "stride_sr": 1}
    hinted = {k.arg_names[i[0]] for i in attrs}
    assert hinted == {"x_ptr", "db_work_ptr", "M", "r", "stride_xm", "stride_sm"}
    _, _, attrs = kr.build_signature(k, "bf16", {"R": 16, "BLOCK_M": 64}, "rank")
    assert {k.arg_names[i[0]] for i in attrs} == {"x_ptr", "db_work_ptr", "M", "stride_xm"}
    _, _, attrs = kr.build_signature(k, "bf16", {"R": 16, "BLOCK_M": 64}, "none")
    assert attrs == {}
    with pytest.raises(ValueError, match="BLOCK_M"):
        kr.build_signature(k, "bf16", {"R": 16}, "aligned")
    with pytest.raises(ValueError, match="GROUP_M"):
        kr.build_signature(k, "bf16", {"R": 16, "BLOCK_M": 64, "GROUP_M": 8}, "aligned")


def test_parse_res_usage_and_sass():
    usage = kr.parse_res_usage("\nResource usage:\n Common:\n  GLOBAL:0\n Function _k:\n"
                               "  REG:187 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:664 TEXTURE:0\n")
    assert (usage["REG"], usage["STACK"], usage["SHARED"], usage["LOCAL"]) == (187, 16, 1024, 0)
    sass = ("        /*0100*/   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspB, R24 ;\n"
            "        /*0110*/   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n"
            "        /*0120*/   FFMA R1, R2, R3, R4 ;\n")
    k = kr.classify_sass(sass)
    assert k["mma"] == "wgmma" and k["hmma_with_wgmma"]
    assert kr.classify_sass(sass.split("\n", 1)[1])["mma"] == "mma"
    assert kr.classify_sass("  FFMA R1, R2, R3, R4 ;\n")["mma"] == "fma"
    assert kr.classify_sass("  IADD3 R1, R2, R3, RZ ;\n")["mma"] == "none"
    spills = sass + "  STL.64 [R1+0x8], R2 ;\n  STL [R1], R5 ;\n  LDL R3, [R1] ;\n  HGMMA.64x64x16.F32 R0, gdesc[UR4], RZ ;\n"
    assert kr.classify_sass(spills)["sass_counts"] == {"HGMMA": 2, "HMMA": 1, "FFMA": 1, "STL": 2, "LDL": 1}
    assert kr.SHARED_LIMIT == {80: 166912, 90: 232448}
    assert kr.expected_mma(90, "bf16") == "wgmma" and kr.expected_mma(80, "fp16") == "mma"
    assert kr.expected_mma(90, "fp32", "ieee") == "fma" and kr.expected_mma(90, "fp32", "tf32") == "wgmma"
