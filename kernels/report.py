"""Ahead-of-time resource report of every kernel configuration the launchers can pick.

    python -m fused_lora.kernels.report [--json] [--arch 80 90] [--dtype fp32 fp16 bf16]
                                       [--kernel NAME ...] [--rank 16 ...] [--align aligned rank none]
                                       [--fp32-precision ieee|tf32] [--jobs N] [--check]

No GPU is needed and nothing here touches CUDA. The jobs are the Triton launches of the plans
(``fused_lora.kernels.plans``, which the launchers execute exactly) at sizes that reach every choice
the launchers make: both token regimes, one row block and several, every padded rank. Each
(kernel, arch, dtype, config) is compiled with ``triton.compile`` for an explicit
``GPUTarget('cuda', arch, 32)``, and the cubin is read back with the ``cuobjdump`` shipped in Triton's
wheel:

* registers and spills: ``cuobjdump -res-usage`` (REG; STACK and LOCAL are local-memory bytes,
  i.e. spills for these kernels; the number of STL instructions in the SASS is recorded too);
* shared memory: Triton's dynamic shared memory (``metadata.shared``) plus the static shared memory
  of the cubin (sm_90 cubins carry 1 KiB). Triton's launcher allows ``opt-in limit - static`` bytes
  of dynamic shared memory, so the sum must fit the per-block opt-in limit of the arch;
* the matrix instructions: ``cuobjdump -sass`` shows HGMMA for Hopper warpgroup MMA (wgmma),
  HMMA for mma.sync, FFMA for the CUDA-core fallback.

A record (one per kernel, arch, dtype, config and alignment) has at least: kernel, arch, dtype,
config (R, the other constexprs, num_warps, num_stages), registers, spill_bytes, shared_bytes,
shared_limit, mma ('wgmma' | 'mma' | 'fma' | 'none'), hmma_with_wgmma, expected_mma, ok (compiled,
no spills, shared memory fits, mma as expected and no HMMA next to HGMMA) and error.

Every compile is the register worst case of the constexpr flags the launchers pass: dropout on,
bias on, atomics on (``WORST_CASE_FLAGS`` replaces the plans' values in each job's config). fp32 uses
``input_precision='ieee'`` (torch's default ``allow_tf32=False``; ``--fp32-precision tf32`` shows the
other choice), fp16/bf16 use 'tf32' (ignored for them).

Argument specialisation. Triton specialises a launch on its arguments: an integer equal to 1
becomes a compile-time constant and pointers / integers divisible by 16 get a divisibility hint,
which is what lets loads vectorise and be pipelined through shared memory (cp.async / TMA). The
report assumes contiguous tensors (every innermost stride is the constant 1) and, with
``--align``, compiles one or more of:

* ``aligned``: every pointer, size and stride divisible by 16 (rank r a multiple of 16): the
  pipelined kernels, i.e. the most shared memory;
* ``rank``: as ``aligned`` but r, and the leading strides of the (M, r) / (N, r) tensors that
  equal r, are not multiples of 16 (r = 8, say);
* ``none``: no divisibility anywhere (K or N not a multiple of 16, views at odd offsets): scalar
  loads, no cp.async pipelining, the most registers. Not compiled by default: the launchers' tile
  choices assume 16-element alignment, and these kernels spill (see ``--align none``).

The default is ``aligned`` and ``rank`` (r = 8, PEFT's default, takes the ``rank`` path).

``python -m fused_lora.kernel_report`` is the same command (an alias). Importing this module adds
nothing beyond the standard library, fused_lora and kernels/_interpreter.py; triton, torch and the
kernels are imported by the functions that need them. Compiles run in worker processes (``python -c``, fed one job at a
time) whose environment has TRITON_INTERPRET removed, so the report also works from a process
(e.g. the test suite) running under the Triton interpreter, where ``@triton.jit`` yields interpreted
functions. Compiled kernels land in Triton's cache and cuobjdump's findings in
FUSED_LORA_REPORT_CACHE (default ~/.cache/fused_lora/kernel_report; '0' disables), so a second run
takes seconds. Timing, 2 cores: the test suite's matrix (1074 compiles, every config aligned plus r = 16
unaligned) 788 s cold (``run_jobs(jobs, processes=2)``, empty caches; tests/kernels/test_report.py), seconds warm.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Iterator

from ._interpreter import interpreting

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
ALIGNMENTS = ("aligned", "rank", "none")
DEFAULT_ALIGNMENTS = ("aligned", "rank")
# Per-block opt-in shared-memory limits (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
KERNEL_MODULES = {
    "_lora_shrink_kernel": "fused_lora.kernels._lora_fwd",
    "_lora_fwd_kernel": "fused_lora.kernels._lora_fwd",
    "_lora_bwd_dy_kernel": "fused_lora.kernels._lora_bwd",
    "_lora_bwd_dx_kernel": "fused_lora.kernels._lora_bwd",
    "_lora_bwd_da_kernel": "fused_lora.kernels._lora_bwd",
    "_lora_bwd_dx_da_db_kernel": "fused_lora.kernels._lora_bwd",
    "_dora_weight_norm_kernel": "fused_lora.kernels._dora",
    "_dora_magnitude_grad_kernel": "fused_lora.kernels._dora",
    "_lora_embedding_fwd_kernel": "fused_lora.kernels.lora_embedding",
    "_lora_embedding_bwd_da_kernel": "fused_lora.kernels.lora_embedding",
}
KERNELS = tuple(KERNEL_MODULES)
# The module whose launchers call each kernel by its global name (what a stub must replace).
LAUNCHER_MODULES = {name: ("fused_lora.kernels.lora_embedding" if module.endswith("lora_embedding")
                           else "fused_lora.kernels.launchers") for name, module in KERNEL_MODULES.items()}

# Register worst case of the flags the launchers choose at run time.
# SPLIT_N, SPLIT_K, SPLIT_K_PARTIALS and REDUCE: the sums across programs finished in the kernel (a stored result
# alone is the lesser code; a plan has SPLIT_K_PARTIALS only at sizes whose configs may split the forward's K);
# COMPUTE_DX: the one-launch backward with dX (without it, the same kernel less W's loop). SUM_PARTS: the shrink
# launch's sum of its K splits (without it, the forward GEMM sums them); S_FROM_PARTS: that sum in the forward GEMM;
# SHRINK_IN_LAUNCH: the shares made by jobs of the forward launch itself (the tiles' code plus the share jobs').
WORST_CASE_FLAGS = {"HAS_BIAS": True, "APPLY_DROPOUT": True, "USE_ATOMICS": True, "SCALE_GRAD_BY_FREQ": True,
                    "SPLIT_N": True, "SPLIT_K": True, "SPLIT_K_PARTIALS": True, "REDUCE": True, "COMPUTE_DX": True,
                    "SUM_PARTS": True, "S_FROM_PARTS": True, "SHRINK_IN_LAUNCH": True}
# Pointer arguments that are fp32 whatever the input dtype (accumulators, partials, the DoRA norm).
FP32_POINTERS = frozenset({"norm_ptr", "dm_parts_ptr", "ds_parts_ptr", "db_work_ptr", "da_work_ptr", "s_parts_ptr",
                           "y_parts_ptr", "work_ptr"})
# The int32 arrival counters of the sums finished by the last program to arrive.
I32_POINTERS = frozenset({"counters_ptr"})
# The dropout seed: a 0-dim int64 tensor, declared do_not_specialize (no alignment hint).
I64_POINTERS = frozenset({"seed_ptr"})
# Token ids and their sort (embedding kernels): int64 tensors allocated by torch (16-byte aligned).
ID_POINTERS = frozenset({"ids_ptr", "sorted_ids_ptr", "order_ptr", "run_end_ptr"})
FLOAT_SCALARS = frozenset({"scaling", "keep_scale"})
# Integer arguments whose divisibility by 16 does not depend on the tensor shapes.
NO_HINT_INTS = frozenset({"drop_threshold", "m_blocks_per_split", "padding_idx", "parts", "s_splits"})

_TRITON_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
_TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_RES_USAGE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")


# --------------------------------------------------------------------------------------------
# What to compile
# --------------------------------------------------------------------------------------------

def input_precision(dtype: str, fp32_precision: str = "ieee") -> str:
    return fp32_precision if dtype == "fp32" else "tf32"


# Kernels whose matrix instructions differ from the GEMM kernels': the embedding dA scatter has no dot; the
# embedding forward's few-token tile has 16 rows, which Triton lowers to mma.sync on sm_90 too (wgmma takes
# 64-row warpgroup tiles; its 64-row tile compiles to HGMMA, kernel_report).
_NO_DOT_KERNELS = frozenset({"_lora_embedding_bwd_da_kernel"})
_ROW_TILED_KERNELS = frozenset({"_lora_embedding_fwd_kernel"})


def expected_mma(arch: int, dtype: str, fp32_precision: str = "ieee", kernel: str | None = None,
                 config: dict | None = None) -> str:
    """The matrix instructions a healthy kernel of this arch and dtype (and config) should use."""
    if kernel in _NO_DOT_KERNELS or (kernel == "_dora_magnitude_grad_kernel" and (config or {}).get("FROM_Z")):
        return "none"  # FROM_Z: a reduction, no recompute
    if dtype == "fp32" and fp32_precision == "ieee":
        return "fma"
    if kernel in _ROW_TILED_KERNELS and (config or {}).get("BLOCK_M", 64) < 64:
        return "mma"
    return "wgmma" if arch >= 90 else "mma"


# The sizes the plans are enumerated at (REPRESENTATIVE_TOKENS below: every token regime of the configs, and one row
# block of dB / dA, stored once, against several, by atomics or partials). N = K = 4096 gives every grid several
# programs, and dA several splits over M at 132 SMs (an H100).
_PLAN_N = _PLAN_K = 4096
_PLAN_SMS = 132


def plan_launches(M: int, N: int, K: int, r: int, dtype, *, dropout: bool, bias: bool, deterministic: bool,
                  num_sms: int) -> list:
    """The Triton launches of every plan (fused_lora.kernels.plans, and the embedding plans of
    fused_lora.kernels.lora_embedding with V = K, D = N, scale_grad_by_freq = dropout) at one size."""
    from fused_lora.kernels import lora_embedding, plans

    launches = [*plans.plan_lora_shrink(M, K, r, dtype, dropout=dropout),
                *_weighed_plans(M, N, K, r, dtype, dropout=dropout, bias=bias, deterministic=deterministic,
                                num_sms=num_sms),
                *plans.plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic, num_sms=num_sms),
                *plans.plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout),
                *plans.plan_lora_bwd_da(M, K, r, dtype, dropout=dropout, deterministic=deterministic,
                                        num_sms=num_sms),
                *plans.plan_lora_bwd(M, N, K, r, dtype, dropout=dropout, deterministic=deterministic,
                                     num_sms=num_sms),
                *_dora_plans(M, N, K, r, dtype, dropout=dropout, bias=bias, deterministic=deterministic),
                *lora_embedding.plan_lora_embedding_fwd(M, K, N, r, dtype),
                *lora_embedding.plan_lora_embedding_bwd(M, K, N, r, dtype, deterministic=deterministic,
                                                        scale_grad_by_freq=dropout)]
    return [launch for launch in launches if launch.is_triton]


def _weighed_plans(M, N, K, r, dtype, *, dropout, bias, deterministic, num_sms) -> list:
    """Every alternative a plan weighs by its modeled time (which depends on sizes beyond these), the chosen ones
    among them: the forward's (plans.fwd_alternatives: the shrink fused or not, K split or not, the shrink in the
    launch or not; at N and at N / 4, whose tiles narrow), the one-launch backward wherever it has tiles, and the
    backward with the dS / dB jobs in the dX launch wherever it may run, at each group size."""
    from fused_lora.kernels import configs, plans

    fwd = [launch for n in (N, N // 4)
           for plan in plans.fwd_alternatives(M, n, K, r, dtype, dropout=dropout, bias=bias) for launch in plan]
    bwd = plans.plan_lora_bwd(M, N, K, r, dtype, dropout=dropout, deterministic=deterministic, num_sms=num_sms,
                              one_launch=True)
    if configs.bwd_ds_in_launch(M, configs.padded_rank(r), dtype, deterministic):
        bwd += [launch for size in configs.IN_LAUNCH_GROUP_M
                for launch in plans.plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=dropout, num_sms=num_sms,
                                                            group_m=size)]
    return fwd + bwd


def _dora_plans(M, N, K, r, dtype, *, dropout, bias, deterministic) -> list:
    """The DoRA launches the LoRA plans do not make: the norm, the LoRA kernels with DORA on (the dX launch with the
    dS / dB jobs inside too), the magnitude's gradient (dA is the LoRA launch)."""
    from fused_lora.kernels import configs, plans

    return [*plans.plan_dora_weight_norm(N, K, r, dtype),
            *plans.plan_dora_weight_norm(N // 4, K, r, dtype),  # its row tile narrows below 4096 rows
            *plans.plan_lora_fwd(M, N, K, r, dtype, dropout=dropout, bias=bias, dora=True),
            *plans.plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic, dora=True, bias=bias,
                                    dropout=dropout),
            *plans.plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout, dora=True),
            *plans.plan_dora_magnitude_grad(M, N, r, dtype, dropout=dropout),
            *(launch for size in configs.IN_LAUNCH_GROUP_M
              if configs.bwd_ds_in_launch(M, configs.padded_rank(r), dtype, deterministic, True, dropout)
              for launch in plans.plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=dropout, num_sms=_PLAN_SMS,
                                                          dora=True, bias=bias, group_m=size))]


# 1: one row block (few-token tiles); 65: two (64- and 32-column forward tiles at N and N / 4, 64-column K slices of
# the one-launch backward); 256: 128-column forward tiles, 128-column K slices; 2049: the many-token tiles.
REPRESENTATIVE_TOKENS = (1, 65, 256, 2049)


def _representative_launches(dtype) -> Iterator:
    """Every Triton launch the plans make at sizes that reach each choice of the launchers."""
    from fused_lora.kernels import configs

    for R in configs.PADDED_RANKS:
        for M in REPRESENTATIVE_TOKENS:
            for dropout, bias, deterministic in itertools.product((False, True), repeat=3):
                yield from plan_launches(M, _PLAN_N, _PLAN_K, R, dtype, dropout=dropout, bias=bias,
                                         deterministic=deterministic, num_sms=_PLAN_SMS)


def launch_config(launch) -> dict:
    """The job config of a planned Triton launch: its constexprs at the register worst case of the
    flags (WORST_CASE_FLAGS), and its launch options.

    A DoRA launch keeps its APPLY_DROPOUT: with DORA on, dropout selects another loop (two base products) and
    another tile config, so each value is its own launch. So does the dX launch with the dS jobs inside
    (DS_IN_LAUNCH): LoRA's dropout masks dS A alone, in a second accumulator after the main loop on 64-row tiles
    and seeding the accumulator before it on 128-row tiles (DS_LATE); without dropout dS A joins dX's accumulator.
    Its group size is not a job of its own: GROUP_M enters only the ticket-to-job integer arithmetic, and 8 and 16
    compiled to the same registers, spills, shared memory and MMA kind at all 64 fp16 / bf16 DS_IN_LAUNCH configs on
    sm_80 and sm_90 (aligned), so each is compiled once at the first of configs.IN_LAUNCH_GROUP_M.
    """
    from fused_lora.kernels import configs

    worst = {k: v for k, v in WORST_CASE_FLAGS.items() if k in launch.constexprs}
    if launch.constexprs.get("DORA") or launch.constexprs.get("DS_IN_LAUNCH"):
        worst.pop("APPLY_DROPOUT", None)
    if launch.constexprs.get("DS_IN_LAUNCH"):
        worst["GROUP_M"] = configs.IN_LAUNCH_GROUP_M[0]
    return {**launch.constexprs, **worst, **launch.config.launch_options()}


def launch_jobs(archs: Iterable[int] = ARCHS, dtypes: Iterable[str] = DTYPES,
                kernels: Iterable[str] | None = None, ranks: Iterable[int] | None = None,
                alignments: Iterable[str] = DEFAULT_ALIGNMENTS, fp32_precision: str = "ieee") -> list[dict]:
    """One job per (kernel, arch, dtype, planned config, alignment); imports torch and the plans."""
    import torch

    kernels = set(KERNELS if kernels is None else kernels)
    unknown = kernels - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; known: {list(KERNELS)}")
    ranks = None if ranks is None else set(ranks)
    jobs = []
    for dtype in dtypes:
        seen = set()
        for launch in _representative_launches(getattr(torch, _TORCH_DTYPE[dtype])):
            config = launch_config(launch)
            key = (launch.kernel, json.dumps(config, sort_keys=True))
            rank_excluded = ranks is not None and "R" in config and config["R"] not in ranks  # no R: every rank
            if launch.kernel not in kernels or rank_excluded or key in seen:
                continue
            seen.add(key)  # a config reached by several sizes or flags is compiled once
            for arch in archs:
                for align in alignments:
                    jobs.append({"kernel": launch.kernel, "arch": int(arch), "dtype": dtype, "config": config,
                                 "align": align, "fp32_precision": fp32_precision})
    return jobs


def _stride_roles(arg_names: list[str]) -> dict[str, str]:
    """{stride argument: 'inner' | 'outer' | 'rank'}; 'rank' is an outer stride equal to r.

    Strides come in (outer, inner) pairs named stride_<tensor><dim>, e.g. stride_sm, stride_sr; a 1-D
    tensor's single stride (stride_bias_n) is 'inner'.
    """
    groups: dict[str, list[str]] = {}
    for n in arg_names:
        if n.startswith("stride_"):
            groups.setdefault(n[:-1], []).append(n)
    roles = {}
    for prefix, names in groups.items():
        if len(names) == 1:
            roles[names[0]] = "inner"
            continue
        if len(names) != 2:
            raise ValueError(f"cannot pair stride arguments {names}")
        outer, inner = names
        roles[inner] = "inner"
        roles[outer] = "rank" if inner.endswith("r") else "outer"
    return roles


def build_signature(kernel, dtype: str, constexprs: dict, align: str = "aligned"):
    """(signature, constexprs, attrs) for triton.compiler.ASTSource, from the kernel's arguments.

    ``kernel`` is a JITFunction (``arg_names`` and ``params[i].is_constexpr``).
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    names = list(kernel.arg_names)
    roles = _stride_roles(names)
    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    declared = {p.name for p in kernel.params if p.is_constexpr}
    for p in kernel.params:  # a constexpr the plans set only where it can be on (SPLIT_K_PARTIALS)
        if p.is_constexpr and getattr(p, "has_default", False):
            constexprs.setdefault(p.name, p.default)
    missing = declared - set(constexprs)
    if missing:
        raise ValueError(f"{kernel.__name__}: no value for constexpr arguments {sorted(missing)}")
    extra = set(constexprs) - declared
    if extra:
        raise ValueError(f"{kernel.__name__}: {sorted(extra)} are not constexpr arguments of the kernel")
    divisible = [("tt.divisibility", 16)]
    for i, n in enumerate(names):
        if n in declared:
            signature[n] = "constexpr"
        elif roles.get(n) == "inner":  # contiguous tensors: Triton turns a stride of 1 into a constant
            signature[n] = "constexpr"
            constexprs[n] = 1
        elif n in I64_POINTERS:
            signature[n] = "*i64"
        elif n in ID_POINTERS:
            signature[n] = "*i64"
            if align != "none":
                attrs[(i,)] = [list(a) for a in divisible]
        elif n in I32_POINTERS:
            signature[n] = "*i32"
            if align != "none":
                attrs[(i,)] = [list(a) for a in divisible]
        elif n.endswith("_ptr"):
            signature[n] = "*" + ("fp32" if n in FP32_POINTERS else _TRITON_DTYPE[dtype])
            if align != "none":
                attrs[(i,)] = [list(a) for a in divisible]
        elif n in FLOAT_SCALARS:
            signature[n] = "fp32"
        else:
            signature[n] = "i32"
            rank_tied = n == "r" or roles.get(n) == "rank"
            if n not in NO_HINT_INTS and (align == "aligned" or (align == "rank" and not rank_tied)):
                attrs[(i,)] = [list(a) for a in divisible]
    return signature, constexprs, attrs


# --------------------------------------------------------------------------------------------
# Compiling one job (runs in a worker process)
# --------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}: this triton wheel has no NVIDIA tools")
    return path


def parse_res_usage(text: str) -> dict:
    """{'REG': .., 'STACK': .., 'SHARED': .., 'LOCAL': .., ...} of the (single) kernel in the cubin."""
    m = _RES_USAGE.search(text)
    if not m:
        raise ValueError(f"unexpected cuobjdump -res-usage output:\n{text}")
    return {k: int(v) for k, v in re.findall(r"([A-Z_\[\]0-9]+):(\d+)", m.group(2))}


_SASS_OPS = ("HGMMA", "HMMA", "FFMA", "STL", "LDL")
# One pass over the disassembly for all five opcodes (five passes took 65 ms of a 1.3 s compile).
_SASS_OP = re.compile(rf"\b({'|'.join(_SASS_OPS)})(?:\.|\s)")


def classify_sass(sass: str) -> dict:
    counts = dict.fromkeys(_SASS_OPS, 0)
    for match in _SASS_OP.finditer(sass):
        counts[match.group(1)] += 1
    if counts["HGMMA"]:
        mma = "wgmma"
    elif counts["HMMA"]:
        mma = "mma"
    elif counts["FFMA"]:
        mma = "fma"
    else:
        mma = "none"
    return {"mma": mma, "hmma_with_wgmma": bool(counts["HGMMA"] and counts["HMMA"]), "sass_counts": counts}


_ADDPTR = re.compile(r"tt\.addptr\s+%[\w#.]+,\s*%[\w#.]+\s*:\s*\S+,\s*(\S+)")


def int32_pointer_offsets(ttir: str) -> list[str]:
    """The ``tt.addptr`` ops of a TTIR module whose offset is 32-bit (scalar i32 or a tensor of i32).

    Every pointer offset of the kernels is built from int64 spans, so this is empty; an i32 offset is a
    product of an i32 index and a stride, which wraps once it reaches 2**31 (N * K of a large output head,
    or a column-major dY's M * N).
    """
    found = []
    for line in ttir.splitlines():
        m = _ADDPTR.search(line)
        if m and re.fullmatch(r"i32|tensor<[0-9x]*xi32>", m.group(1)):
            found.append(line.strip())
    return found


# Bump when parse_res_usage / classify_sass change: cached cubin inspections are keyed on it.
_INSPECT_VERSION = 1


def _inspect_cache_dir() -> str | None:
    """FUSED_LORA_REPORT_CACHE: where cubin inspections are cached ('0' or '' disables)."""
    path = os.environ.get("FUSED_LORA_REPORT_CACHE")
    if path is None:
        path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                            "fused_lora", "kernel_report")
    return None if path in ("", "0") else path


def inspect_cubin(cubin: bytes) -> tuple[dict, dict]:
    """(resource usage, SASS classification) of a cubin, from one ``cuobjdump -res-usage -sass`` run.

    Disassembling is about a third of a cold compile's time and all of a warm one's, so results are
    cached on disk, keyed on the cubin's bytes, the cuobjdump binary and _INSPECT_VERSION.
    """
    import hashlib

    cuobjdump = _tool("cuobjdump")
    key = hashlib.sha256(cubin + f"|{cuobjdump}|{os.path.getsize(cuobjdump)}|{_INSPECT_VERSION}".encode()).hexdigest()
    cache = _inspect_cache_dir()
    entry = os.path.join(cache, key[:2], key + ".json") if cache else None
    if entry and os.path.exists(entry):
        try:
            with open(entry) as f:
                cached = json.load(f)
            return cached["usage"], cached["kinds"]
        except (OSError, ValueError, KeyError):
            pass
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        dump = subprocess.run([cuobjdump, "-res-usage", "-sass", path], check=True,
                              capture_output=True, text=True).stdout
    split = dump.find("Function :")  # the SASS follows the resource usage
    usage = parse_res_usage(dump if split < 0 else dump[:split])
    kinds = classify_sass("" if split < 0 else dump[split:])
    if entry:
        try:
            os.makedirs(os.path.dirname(entry), exist_ok=True)
            tmp_entry = f"{entry}.{os.getpid()}.tmp"
            with open(tmp_entry, "w") as f:
                json.dump({"usage": usage, "kinds": kinds}, f)
            os.replace(tmp_entry, entry)
        except OSError:
            pass
    return usage, kinds


def _kernel_fn(name: str, module: str | None = None):
    import importlib

    fn = getattr(importlib.import_module(module or KERNEL_MODULES[name]), name)
    if not hasattr(fn, "params"):  # an InterpretedFunction: TRITON_INTERPRET=1 in this process
        raise RuntimeError(f"{name} is not a JITFunction (TRITON_INTERPRET=1?): compile in a clean process")
    return fn


def compile_job(job: dict) -> dict:
    """Compile one job and measure it. Never raises: a failure is recorded under 'error'."""
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    record = dict(job)
    arch, dtype = job["arch"], job["dtype"]
    limit = SHARED_LIMIT.get(arch)
    record.update(shared_limit=limit, expected_mma=expected_mma(arch, dtype, job.get("fp32_precision", "ieee"),
                                                                job["kernel"], job["config"]))
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        kernel = _kernel_fn(job["kernel"], job.get("module"))
        cfg = dict(job["config"])
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        # A flag with a default in the kernel is set by the plans only where it can be on (launch_config).
        defaulted = {p.name for p in kernel.params if getattr(p, "has_default", False)}
        flags = {k: v for k, v in WORST_CASE_FLAGS.items() if k in kernel.arg_names and k not in defaulted}
        if "INPUT_PRECISION" in kernel.arg_names:  # the embedding dA kernel has no dot
            flags["INPUT_PRECISION"] = input_precision(dtype, job.get("fp32_precision", "ieee"))
        signature, constexprs, attrs = build_signature(kernel, dtype, {**flags, **cfg}, job["align"])
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        record["compile_s"] = round(time.perf_counter() - t0, 3)
        record["int32_offsets"] = int32_pointer_offsets(compiled.asm["ttir"])
        usage, kinds = inspect_cubin(compiled.asm["cubin"])
        dynamic = int(compiled.metadata.shared)
        static = usage.get("SHARED", 0)
        record.update(
            registers=usage["REG"],
            spill_bytes=max(usage.get("STACK", 0), usage.get("LOCAL", 0)),
            stack_bytes=usage.get("STACK", 0), local_bytes=usage.get("LOCAL", 0),
            shared_bytes=dynamic + static, dynamic_shared=dynamic, static_shared=static,
            **kinds, error=None)
    except Exception as e:  # recorded, so one broken config does not hide the others
        record.update(registers=None, spill_bytes=None, shared_bytes=None, mma=None,
                      hmma_with_wgmma=None, error=f"{type(e).__name__}: {e}")
    record["shared_ok"] = record["shared_bytes"] is not None and limit is not None \
        and record["shared_bytes"] <= limit
    problems = []
    if record["error"] is not None:
        problems.append(record["error"])
    else:
        if record["spill_bytes"]:
            problems.append(f"spills {record['spill_bytes']} B")
        if not record["shared_ok"]:
            problems.append(f"shared {record['shared_bytes']} B > {limit} B")
        if record["mma"] != record["expected_mma"]:
            problems.append(f"{record['mma']} instead of {record['expected_mma']}")
        if record["hmma_with_wgmma"]:
            problems.append("HMMA next to HGMMA")
        if record.get("int32_offsets"):
            problems.append(f"{len(record['int32_offsets'])} pointer offsets in int32")
    record["problems"] = problems
    record["ok"] = not problems
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


# --------------------------------------------------------------------------------------------
# Running many jobs
# --------------------------------------------------------------------------------------------

def _worker_env() -> dict:
    """The environment of the compile workers: no TRITON_INTERPRET, so @triton.jit gives JITFunctions."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The package may be imported from a source tree that is not installed: give workers our sys.path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _worker_main() -> None:
    """Compile worker: one JSON job per line on stdin, one JSON record per line on stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else writes to stdout (triton, ptxas) goes to stderr
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if line.strip():
            out.write(json.dumps(compile_job(json.loads(line))) + "\n")
            out.flush()


def _cost(job: dict) -> int:
    """Rough compile cost, so the slowest jobs start first."""
    c = job["config"]
    tile = c.get("BLOCK_M", 1) * max(c.get("BLOCK_N", 0), c.get("R", 1)) * max(c.get("BLOCK_K", 0), c.get("R", 1))
    return tile * (4 if job["dtype"] == "fp32" else 1)


def run_jobs(jobs: list[dict], processes: int | None = None) -> list[dict]:
    """Compile all jobs and return their records in job order.

    With more than one process, or when this process runs under TRITON_INTERPRET=1, the compiles
    run in fresh worker processes (``python -c ...`` with an explicit environment; no
    multiprocessing, so any __main__ works), fed one job at a time, slowest first.
    """
    if not jobs:
        return []
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    if processes == 1 and not interpreting():
        return [compile_job(j) for j in jobs]
    import queue
    import threading

    pending: queue.Queue = queue.Queue()
    for i in sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i])):
        pending.put(i)
    records: list[dict | None] = [None] * len(jobs)
    failures: list[str] = []
    cmd = [sys.executable, "-c", "from fused_lora.kernels.report import _worker_main; _worker_main()"]
    env = _worker_env()

    def feed() -> None:
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) as proc:
            try:
                while True:
                    try:
                        i = pending.get_nowait()
                    except queue.Empty:
                        break
                    proc.stdin.write(json.dumps(jobs[i]) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    if not line:
                        failures.append(f"compile worker exited with status {proc.wait()} on job {jobs[i]}")
                        return
                    records[i] = json.loads(line)
            finally:
                if proc.stdin and not proc.stdin.closed:
                    proc.stdin.close()

    threads = [threading.Thread(target=feed, daemon=True) for _ in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError("; ".join(failures))
    return records  # type: ignore[return-value]


def report(archs=ARCHS, dtypes=DTYPES, kernels=None, ranks=None, alignments=DEFAULT_ALIGNMENTS,
           fp32_precision="ieee", processes=None) -> list[dict]:
    return run_jobs(launch_jobs(archs, dtypes, kernels, ranks, alignments, fp32_precision), processes)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K")


def describe_config(config: dict) -> str:
    tiles = "x".join(str(config[k]) for k in _TILE_KEYS if k in config)
    rest = []
    if config.get("GROUP_M", 1) > 1:
        rest.append(f"G{config['GROUP_M']}")
    if "R_CHUNK" in config and config["R_CHUNK"] != config.get("R"):
        rest.append(f"rc{config['R_CHUNK']}")
    if config.get("FUSE_SHRINK"):
        rest.append("fused")
    if config.get("SPLIT_K_PARTIALS"):
        rest.append("splitk")
    if config.get("SHRINK_IN_LAUNCH"):
        rest.append("sharejobs")
    if config.get("DS_IN_LAUNCH"):
        rest.append("dsjobs")
        if not config.get("DORA"):  # LoRA's dropout takes its own path for dS A (DS_LATE in _lora_bwd_dx_tile)
            rest.append("dropout" if config.get("APPLY_DROPOUT") else "nodropout")
    if config.get("DORA"):
        rest.append("dora-dropout" if config.get("APPLY_DROPOUT") else "dora")
    if config.get("FROM_Z"):
        rest.append("fromZ")
    if config.get("USE_ATOMICS") is False:
        rest.append("1part")
    return " ".join([tiles, f"w{config['num_warps']}s{config['num_stages']}", *rest])


def job_id(job: dict) -> str:
    """Short unique name of a job (or record), e.g. 'sm90-bf16-fwd-R16-64x64x128-w8s3-fused-aligned'."""
    name = job["kernel"].removeprefix("_lora_").removesuffix("_kernel")
    desc = describe_config(job["config"]).replace(" ", "-")
    rank = f"R{job['config']['R']}-" if "R" in job["config"] else ""  # the magnitude kernel serves every rank
    return f"sm{job['arch']}-{job['dtype']}-{name}-{rank}{desc}-{job['align']}"


def format_table(records: list[dict]) -> str:
    head = ("kernel", "sm", "dtype", "R", "config", "align", "regs", "spill", "shared", "limit", "mma",
            "ok")
    rows = []
    for r in sorted(records, key=lambda r: (r["arch"], r["kernel"], DTYPES.index(r["dtype"]),
                                            r["config"].get("R", 0), describe_config(r["config"]), r["align"])):
        mma = r["mma"] or "-"
        if r.get("hmma_with_wgmma"):
            mma += "+mma"
        rows.append((r["kernel"], str(r["arch"]), r["dtype"], str(r["config"].get("R", "any")), describe_config(r["config"]),
                     r["align"], _s(r["registers"]), _s(r["spill_bytes"]), _s(r["shared_bytes"]),
                     _s(r["shared_limit"]), mma, "ok" if r["ok"] else "NO: " + "; ".join(r["problems"])[:80]))
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _s(v) -> str:
    return "-" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_lora.kernels.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--kernel", nargs="+", default=None, choices=KERNELS)
    p.add_argument("--rank", type=int, nargs="+", default=None, help="padded ranks R to keep (default: all)")
    p.add_argument("--align", nargs="+", default=list(DEFAULT_ALIGNMENTS), choices=ALIGNMENTS,
                   help="argument specialisations to compile (see the module docstring)")
    p.add_argument("--fp32-precision", default="ieee", choices=("ieee", "tf32"),
                   help="input_precision of fp32 dots (torch.backends.cuda.matmul.allow_tf32)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--check", action="store_true", help="exit with status 1 if any record is not ok")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    records = report(args.arch, args.dtype, args.kernel, args.rank, args.align, args.fp32_precision, args.jobs)
    elapsed = time.perf_counter() - t0
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(records))
    bad = sum(not r["ok"] for r in records)
    print(f"{len(records)} compiles, {bad} not ok, {elapsed:.1f} s with {args.jobs} processes", file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
