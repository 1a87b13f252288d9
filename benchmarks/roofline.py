"""A modeled (not measured) roofline of every provider, launch by launch, on an H100 SXM or H200 SXM preset.

modeled time of a launch = max(flops / (peak x e), compulsory bytes / bandwidth) x wave factor
                             (or, with producer jobs in the launch, the end of its schedule)
                           + atomic bytes / ATOMIC_BYTES_PER_S + tail bytes x SMs / bandwidth
                           + per-launch overhead,
summed over the launches, where
- e = 1 for torch ops; for a Triton launch e = 1 in the ideal table and TRITON_GEMM_EFFICIENCY in the second one;
- wave factor = 1 for a torch op (cuBLAS and torch's kernels size their grids to the GPU, e.g. split-K for
  few tokens); for a Triton launch of G programs, waves x slots / G, where slots = SMs x PROGRAMS_PER_SM and
  waves = ceil(G / slots): a grid below one wave gets G / slots of the peaks, 133 programs on 132 SMs take
  two waves, the second one nearly empty;
- atomic bytes: the fp32 atomic adds a plan's USE_ATOMICS launch makes into dB or dA (0 otherwise), and the
  last program's read and re-zeroing of the accumulator (one atomic exchange with 0);
- tail bytes: what one program moves alone once the others are done (the final pass of a sum finished by the
  last program to arrive), at one SM's share of the bandwidth;
- schedule (kernels/cost.py schedule_seconds): where a launch's tiles wait for producer jobs of the same launch
  (the forward's shrink shares, SHRINK_IN_LAUNCH; the dS jobs of the dX launch, DS_IN_LAUNCH, with its dA / dB
  jobs), its programs in the kernel's ticket order, each on the first free slot: producer and side jobs move their
  bytes at one SM's share of the bandwidth times spread / memory (the bandwidth the launch leaves idle) or compute
  their FLOPs at one SM's share of the peak, whichever takes longer; the tiles share the rest of the launch's evenly
  spread time but take no less than their own FLOPs (the launch's less the jobs') at one SM's share of the peak,
  and the tiles and dA jobs wait for their row block's or group's producer jobs as the kernel makes them wait. This
  replaces the wave factor, which counted a short job as a program as long as a tile.

Launch lists are derived, not typed in:
- fused: from the launchers' own plans (fused_lora.kernels.plans.plan_*): grids, tiles, passes, partial
  buffers, atomics and tails, as the launchers will launch them, plus a grad cast of fused_lora.ops.linear
  wherever a plan left dA or dB in another dtype than the parameters' (none does today).
- eager, peft, addmm, gemm: by running them once on meta tensors under a TorchDispatchMode that
  records every aten op autograd and the module run (views and allocations excluded), with FLOPs
  from torch.utils.flop_counter's formulas and compulsory bytes from the op's tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fused_lora.kernels import cost

from .sweep import DIRECTIONS, Point


@dataclass(frozen=True)
class Gpu:
    """A GPU preset: dense fp16/bf16 tensor-core peak, HBM bandwidth and SM count, with their source."""
    key: str  # the --gpu value
    name: str
    peak_flops: dict
    hbm_bytes_per_s: float
    num_sms: int
    source: str


# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 1,979 TFLOPS bf16/fp16 with sparsity, i.e. 989
# dense; 3.35 TB/s HBM3; 132 SMs (the dA split depends on it).
H100 = Gpu("h100", "H100 SXM", {"bfloat16": cost.H100_PEAK_FLOPS, "float16": cost.H100_PEAK_FLOPS},
           cost.H100_HBM_BYTES_PER_S, cost.H100_NUM_SMS,
           "NVIDIA H100 datasheet (SXM): 989 TFLOPS dense bf16/fp16, 3.35 TB/s HBM3, 132 SMs")
# NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: 4.8 TB/s HBM3e and the same 1,979 TFLOPS
# (sparse) bf16/fp16 as the H100 SXM; the same GH100 die with 132 SMs. Only the bandwidth differs.
H200 = Gpu("h200", "H200 SXM", dict(H100.peak_flops), 4.8e12, H100.num_sms,
           "NVIDIA H200 datasheet (SXM): 989 TFLOPS dense bf16/fp16 as the H100 SXM, 4.8 TB/s HBM3e, 132 SMs")
GPUS = {gpu.key: gpu for gpu in (H100, H200)}
DEFAULT_GPU = H100

# The H100 figures under their former names (the defaults of everything below).
PEAK_FLOPS = H100.peak_flops
HBM_BYTES_PER_S = H100.hbm_bytes_per_s
NUM_SMS = H100.num_sms
# The per-launch assumptions and the formula are fused_lora.kernels.cost's, which the plans weigh alternatives with:
# LAUNCH_OVERHEAD_S (4 us, GPU-side only: the host's time is measured by benchmarks.host and printed beside it),
# PROGRAMS_PER_SM (1) and ATOMIC_BYTES_PER_S (3.35 TB/s, added after the main time); their sources are there.
LAUNCH_OVERHEAD_S = cost.LAUNCH_OVERHEAD_S
PROGRAMS_PER_SM = cost.PROGRAMS_PER_SM
ATOMIC_BYTES_PER_S = cost.ATOMIC_BYTES_PER_S
# Triton's plain tl.dot main loop against cuBLAS on an H100: triton-lang/triton issue #3672 (2024-04-16),
# python/tutorials/03-matrix-multiplication.py in fp16 on an H100, Triton / cuBLAS TFLOP/s at its six
# largest sizes, M = N = K = 2432..3072: 321.3/518.5, 375.4/533.4, 433.4/433.4, 500.7/616.5, 471.4/573.9,
# 524.7/584.7 = 0.62, 0.70, 1.00, 0.81, 0.82, 0.90; median 0.82. Applied to the FLOP rate of every Triton
# launch (their main loops are such tl.dot loops, without TMA, persistence or warp specialisation), not to
# bandwidth, atomics or overhead (no published figure for those). The targets refer to the ideal table (1.0).
TRITON_GEMM_EFFICIENCY = 0.82
# fused_lora's default: fp32 atomics (deterministic partials only under
# torch.use_deterministic_algorithms(True)).
DETERMINISTIC = False


def assumptions(gpu: Gpu = DEFAULT_GPU) -> dict:
    """The model's constants and formula, as points.json's modeled_assumptions."""
    return {
        "device": f"{gpu.name} (modeled, not measured)",
        "gpu": gpu.key,
        "gpu_source": gpu.source,
        "peak_flops_bf16_fp16": gpu.peak_flops["bfloat16"],
        "hbm_bytes_per_s": gpu.hbm_bytes_per_s,
        "launch_overhead_s": LAUNCH_OVERHEAD_S,
        "num_sms": gpu.num_sms,
        "programs_per_sm": PROGRAMS_PER_SM,
        "atomic_bytes_per_s": ATOMIC_BYTES_PER_S,
        "triton_gemm_efficiency": TRITON_GEMM_EFFICIENCY,
        "formula": "sum over launches of max(flops / (peak x e), bytes / bandwidth) x wave factor (or the "
                   "schedule's end, see schedule) + atomic bytes / atomic rate + tail bytes x SMs / bandwidth "
                   "+ launch overhead",
        "waves": f"Triton launches: ceil(programs / ({gpu.num_sms} SMs x {PROGRAMS_PER_SM})) waves, wave factor "
                 "waves x slots / programs (a grid of 4 programs gets 4/132 of the peaks; 133 take 2 waves); "
                 "torch ops: 1",
        "atomics": "fp32 atomic adds of a USE_ATOMICS launch (plans' atomic_bytes): m_blocks x N x r x 4 bytes into "
                   "dB, splits x M x R x 4 into dS, SPLIT_M x r x K "
                   "x 4 into dA, plus 4 bytes per element for the last program's read and re-zeroing (one "
                   "atomic exchange with 0), at "
                   "atomic_bytes_per_s, added after the launch's main time (not overlapped)",
        "schedule": "a launch whose tiles wait for producer jobs of the same launch (the forward's shrink shares, "
                    "the dX launch's dS jobs, with its dA / dB jobs): its programs in the kernel's ticket order, each "
                    "on the first free slot (CUDA C++ Programming Guide, Hardware Implementation: as thread blocks "
                    "terminate, new blocks are launched on the vacated multiprocessors); a producer or side job moves "
                    "its bytes at hbm / SMs x spread / memory (HBM one pool) or its FLOPs at peak / SMs, whichever "
                    "takes longer; the tiles share the rest of the evenly spread time but take no less than their own "
                    "FLOPs (the launch's less the jobs') at peak / SMs; tiles and dA jobs wait for their "
                    "producers as the kernel's counters make them",
        "tails": "a sum finished by the last program to arrive: the bytes that one program moves after the rest "
                 "of the launch (its columns' accumulator or partials, and the grad it stores), at hbm / SMs",
        "triton_efficiency": "e = 1 in the ideal table; triton_gemm_efficiency on the FLOP rate of Triton "
                             "launches in the second table (triton-lang/triton#3672, tutorial 03 on H100)",
        "host": "not in the modeled time: the measured host time per layer (host-overhead part) is printed "
                "beside it; a layer whose host time exceeds its modeled GPU time is host-bound",
        "bytes": "compulsory HBM traffic: each distinct tensor a launch reads once plus each it writes once "
                 "(an in-place update reads and writes its tensor; a broadcast tensor counts its distinct "
                 "elements); L2 reuse and re-reads not counted; fp32 atomics counted apart (see atomics)",
        "flops_fused": "dots as the Triton kernels execute them: whole tiles and the padded rank R "
                       "(tl.dot runs on the padded operands), incl. the shrink recomputed per N tile when fused",
        "flops_torch": "torch.utils.flop_counter formulas for matmuls (no padding); elementwise ops 0",
        "dropout_torch": "traced as on CUDA: F.dropout -> aten.native_dropout (bool mask)",
        "deterministic": DETERMINISTIC,
    }


ASSUMPTIONS = assumptions(H100)


@dataclass(frozen=True)
class ModeledLaunch:
    name: str
    flops: int
    bytes: int
    detail: str = ""
    programs: int | None = None  # a Triton launch's grid size; None: a torch op, which fills the GPU
    atomic_bytes: int = 0  # fp32 atomic adds into L2 (the plan's atomic_bytes of a USE_ATOMICS launch)
    tail_bytes: int = 0  # moved by one last-to-arrive program after the rest of the launch (its sums' final pass)
    schedule: cost.Schedule | None = None  # producer jobs beside the tiles (cost.schedule_seconds)

    @property
    def is_triton(self) -> bool:
        return self.programs is not None

    def waves(self, gpu: Gpu = DEFAULT_GPU) -> int | None:
        """ceil(programs / (SMs x PROGRAMS_PER_SM)); None for a torch op."""
        return None if self.programs is None else cost.waves(self.programs, gpu.num_sms)

    def wave_factor(self, gpu: Gpu = DEFAULT_GPU) -> float:
        """Time over the time of the same work spread evenly over the GPU: waves x slots / programs."""
        return cost.wave_factor(self.programs, gpu.num_sms)

    @property
    def occupancy(self) -> float:
        """The share of the H100's peaks the launch gets (1 / wave factor)."""
        return 1.0 / self.wave_factor()

    def main_seconds(self, peak: float, gpu: Gpu = DEFAULT_GPU, triton_efficiency: float = 1.0) -> float:
        """Over the wave factor, or the end of the launch's schedule where it has producer jobs."""
        rate = peak * (triton_efficiency if self.is_triton else 1.0)
        return cost.main_seconds(self.flops, self.bytes, self.programs, peak=rate, hbm_bytes_per_s=gpu.hbm_bytes_per_s,
                                 num_sms=gpu.num_sms, schedule=self.schedule)

    def atomic_seconds(self) -> float:
        return cost.atomic_seconds(self.atomic_bytes)

    def tail_seconds(self, gpu: Gpu = DEFAULT_GPU) -> float:
        """One program alone after the others: at one SM's share of the bandwidth (hbm / SMs)."""
        return cost.tail_seconds(self.tail_bytes, hbm_bytes_per_s=gpu.hbm_bytes_per_s, num_sms=gpu.num_sms)

    def seconds(self, peak: float, gpu: Gpu = DEFAULT_GPU, triton_efficiency: float = 1.0) -> float:
        rate = peak * (triton_efficiency if self.is_triton else 1.0)
        return cost.launch_seconds(self.flops, self.bytes, self.programs, self.atomic_bytes, self.tail_bytes,
                                   self.schedule, peak=rate, hbm_bytes_per_s=gpu.hbm_bytes_per_s, num_sms=gpu.num_sms)

    def bound(self, peak: float, gpu: Gpu = DEFAULT_GPU) -> str:
        return "compute" if self.flops / peak >= self.bytes / gpu.hbm_bytes_per_s else "memory"


@dataclass
class Modeled:
    provider: str
    direction: str
    launches: list[ModeledLaunch] = field(default_factory=list)
    peak: float = 0.0
    gpu: Gpu = DEFAULT_GPU

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def atomic_bytes(self) -> int:
        return sum(launch.atomic_bytes for launch in self.launches)

    @property
    def atomic_seconds(self) -> float:
        return sum(launch.atomic_seconds() for launch in self.launches)

    @property
    def triton_waves(self) -> int:
        """Waves summed over the Triton launches (0 for the torch providers)."""
        return sum(launch.waves(self.gpu) or 0 for launch in self.launches)

    def seconds_at(self, triton_efficiency: float) -> float:
        return sum(launch.seconds(self.peak, self.gpu, triton_efficiency) for launch in self.launches)

    @property
    def seconds(self) -> float:
        """The ideal table's time (Triton efficiency 1.0)."""
        return self.seconds_at(1.0)


def modeled_dtype_supported(dtype: str) -> bool:
    return dtype in PEAK_FLOPS


# ---------------------------------------------------------------------------------------------
# fused: from the launchers' plans
# ---------------------------------------------------------------------------------------------

def _from_plan(launch) -> ModeledLaunch:
    ops = ", ".join(f"{'w' if op in launch.writes else 'r'}:{op.name}{list(op.shape)}"
                    for op in launch.reads + launch.writes)
    grid = f" grid={launch.grid} {launch.config.BLOCK_M}x{launch.config.BLOCK_N}x{launch.config.BLOCK_K}" \
        if launch.is_triton else ""
    if launch.atomic_bytes:
        grid += f" atomics={launch.atomic_bytes / 2**20:.3g} MiB"
    if launch.tail_bytes:
        grid += f" tail={launch.tail_bytes / 2**10:.3g} KiB"
    if launch.schedule is not None:
        plan = launch.schedule
        grid += (f" schedule={plan.num_pid_m} row blocks x ({plan.parts} producer jobs of "
                 f"{plan.part_bytes / 2**10:.3g} KiB + {plan.columns - plan.tiles} side jobs + {plan.tiles} tiles)")
    return ModeledLaunch(launch.kernel, launch.flops, launch.hbm_bytes, f"{ops}{grid}",
                         programs=launch.programs, atomic_bytes=launch.atomic_bytes, tail_bytes=launch.tail_bytes,
                         schedule=launch.schedule)


def fused_launches(point: Point, direction: str, *, deterministic: bool = DETERMINISTIC,
                   num_sms: int = NUM_SMS) -> list[ModeledLaunch]:
    """The launches fused_lora makes on CUDA for this point (mirrors fused_lora.ops.triton_backend)."""
    from fused_lora.kernels import plans

    dtype = getattr(torch, point.dtype)
    M, N, K, r = point.tokens, point.out_features, point.in_features, point.r
    dropout = point.dropout > 0.0
    fwd = plans.plan_lora_fwd(M, N, K, r, dtype, dropout=dropout, bias=point.bias, num_sms=num_sms)
    bwd = plans.plan_lora_bwd(M, N, K, r, dtype, dropout=dropout, deterministic=deterministic, num_sms=num_sms)
    modeled = [_from_plan(launch) for launch in {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]]
    return modeled + (grad_casts(bwd, dtype) if direction != "fwd" else [])


def grad_casts(bwd, dtype: torch.dtype) -> list[ModeledLaunch]:
    """The cast launches after a backward plan: the ops return dA.to(A.dtype) and dB.to(B.dtype), a launch wherever
    the plan leaves the grad in another dtype (none does since the sums end in the kernels)."""
    casts = []
    for name in ("dA", "dB"):
        grad = _final_operand(bwd, name)
        if grad.dtype != dtype:
            n = math.prod(grad.shape)
            casts.append(ModeledLaunch(f"to({_short(dtype)})", 0, n * grad.dtype.itemsize + n * dtype.itemsize,
                                       f"r:{name}_{_short(grad.dtype)}{list(grad.shape)}, w:{name}{list(grad.shape)}"))
    return casts


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _final_operand(plan, name: str):
    """The operand ``name`` as the plan's last launch writing it leaves it."""
    written = [op for launch in plan for op in launch.writes if op.name == name]
    if not written:
        raise ValueError(f"the plan writes no {name!r}")
    return written[-1]


# ---------------------------------------------------------------------------------------------
# torch providers: traced on meta tensors
# ---------------------------------------------------------------------------------------------

# Ops that launch nothing: allocations and metadata (views are recognised by OpOverload.is_view).
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "_unsafe_view", "lift_fresh", "lift_fresh_copy", "_to_copy_noop", "set_", "resize_"}
# In-place ops that write their tensor without reading it.
_WRITE_ONLY = {"fill_", "zero_", "copy_", "bernoulli_", "uniform_", "normal_", "random_", "exponential_"}


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _addressed_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements t addresses: a broadcast (stride 0) dimension reads one slice,
    not size copies (an expanded bias is N elements, not M x N)."""
    if t.numel() == 0:
        return 0
    return math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _storage_bytes(tensors) -> dict[int, int]:
    """Bytes per storage touched (the largest view of it among tensors: x and x.t() count once)."""
    out: dict[int, int] = {}
    for t in tensors:
        key = t.untyped_storage()._cdata
        out[key] = max(out.get(key, 0), _addressed_bytes(t))
    return out


def _flops(func, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    formula = flop_registry.get(packet)
    if formula is None and packet.__name__.endswith("_"):  # in-place variant, e.g. addmm_
        formula = flop_registry.get(getattr(torch.ops.aten, packet.__name__[:-1], None))
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))


def _make_recorder():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        """Records each aten op that launches work: FLOPs and compulsory bytes."""

        def __init__(self):
            super().__init__()
            self.launches: list[ModeledLaunch] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func._overloadpacket.__name__
            if func.is_view or name in _NO_LAUNCH:
                return out
            written = [a for a, arg in zip(args, func._schema.arguments)
                       if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write]
            written += [v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k == "out"]
            written_keys = {t.untyped_storage()._cdata for t in written}
            read_only = [t for t in _tensors((args, kwargs)) if t.untyped_storage()._cdata not in written_keys]
            reads = _storage_bytes(read_only + ([] if name in _WRITE_ONLY else written))
            writes = _storage_bytes(_tensors(out) + written)
            shapes = ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in _tensors(args))
            self.launches.append(ModeledLaunch(f"aten.{name}", _flops(func, args, kwargs, out),
                                               sum(reads.values()) + sum(writes.values()), shapes))
            return out

    return Recorder()


def traced_launches(provider: str, point: Point) -> dict[str, list[ModeledLaunch]]:
    """{direction: launches} of a torch provider, from one forward and one backward on meta tensors."""
    from .providers import BUILDERS, Params, cuda_dropout_on_meta, make_input

    with cuda_dropout_on_meta():
        layer = BUILDERS[provider](Params.make(point, "meta"))
        x, dy = make_input(point, "meta")
        recorder = _make_recorder()
        with recorder:
            y = layer.forward(x)
        fwd = recorder.launches
        recorder = _make_recorder()
        with recorder:
            y.backward(dy)
        bwd = recorder.launches
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def model_point(provider: str, point: Point, gpu: Gpu = DEFAULT_GPU) -> dict[str, Modeled]:
    """{direction: Modeled} for one provider at one point (16-bit dtypes only) on the ``gpu`` preset."""
    peak = gpu.peak_flops[point.dtype]
    if provider == "fused":
        lists = {d: fused_launches(point, d, num_sms=gpu.num_sms) for d in DIRECTIONS}
    else:
        lists = traced_launches(provider, point)
    return {d: Modeled(provider, d, lists[d], peak, gpu) for d in DIRECTIONS}
