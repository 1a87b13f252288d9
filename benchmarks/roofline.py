"""A modeled (not measured) H100 roofline of every provider, launch by launch.

modeled time = sum over launches of max(flops / peak, compulsory bytes / bandwidth) / occupancy
               + per-launch overhead,
where occupancy = min(1, programs / SMs) for a Triton launch (its grid) and 1 for a torch op (cuBLAS and
torch's kernels size their grids to the GPU, e.g. split-K for few tokens).

Launch lists are derived, not typed in:
- fused: from the launchers' own plans (fused_lora.kernels.plans.plan_*): grids, tiles, passes, partial
  buffers and memsets, as the launchers will launch them, plus the grad casts of
  fused_lora.ops.linear (an fp32 dA or dB to the parameters' dtype).
- eager, peft, addmm, gemm: by running them once on meta tensors under a TorchDispatchMode that
  records every aten op autograd and the module run (views and allocations excluded), with FLOPs
  from torch.utils.flop_counter's formulas and compulsory bytes from the op's tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .sweep import DIRECTIONS, Point

# H100 SXM5: dense fp16/bf16 tensor-core peak and HBM3 bandwidth (NVIDIA datasheet figures);
# 132 SMs (the dA split depends on it).
PEAK_FLOPS = {"bfloat16": 989e12, "float16": 989e12}
HBM_BYTES_PER_S = 3.35e12
NUM_SMS = 132
# Assumed, not measured (no GPU here): the gap one eager launch adds on the GPU timeline, a few
# microseconds for back-to-back PyTorch / Triton launches without CUDA graphs.
LAUNCH_OVERHEAD_S = 4e-6
# fused_lora's default: fp32 atomics (deterministic partials only under
# torch.use_deterministic_algorithms(True)).
DETERMINISTIC = False

ASSUMPTIONS = {
    "device": "H100 SXM (modeled, not measured)",
    "peak_flops_bf16_fp16": PEAK_FLOPS["bfloat16"],
    "hbm_bytes_per_s": HBM_BYTES_PER_S,
    "launch_overhead_s": LAUNCH_OVERHEAD_S,
    "num_sms": NUM_SMS,
    "formula": "sum over launches of max(flops / peak, bytes / bandwidth) / occupancy + launch overhead",
    "occupancy": "Triton launches: min(1, programs / 132), one resident program per SM (a grid of 4 "
                 "programs gets 4/132 of the peaks); torch ops: 1",
    "bytes": "compulsory HBM traffic: each distinct tensor a launch reads once plus each it writes once "
             "(an in-place update reads and writes its tensor; a broadcast tensor counts its distinct "
             "elements); L2 reuse and re-reads not counted, nor fused's fp32 atomic adds into L2 (one "
             "(N, r) partial per row block for dB, one (r, K) per split for dA)",
    "flops_fused": "dots as the Triton kernels execute them: whole tiles and the padded rank R "
                   "(tl.dot runs on the padded operands), incl. the shrink recomputed per N tile when fused",
    "flops_torch": "torch.utils.flop_counter formulas for matmuls (no padding); elementwise ops 0",
    "dropout_torch": "traced as on CUDA: F.dropout -> aten.native_dropout (bool mask)",
    "deterministic": DETERMINISTIC,
}


@dataclass(frozen=True)
class ModeledLaunch:
    name: str
    flops: int
    bytes: int
    detail: str = ""
    programs: int | None = None  # a Triton launch's grid size; None: a torch op, which fills the GPU

    @property
    def occupancy(self) -> float:
        return 1.0 if self.programs is None else min(1.0, self.programs / NUM_SMS)

    def seconds(self, peak: float) -> float:
        return max(self.flops / peak, self.bytes / HBM_BYTES_PER_S) / self.occupancy + LAUNCH_OVERHEAD_S

    def bound(self, peak: float) -> str:
        return "compute" if self.flops / peak >= self.bytes / HBM_BYTES_PER_S else "memory"


@dataclass
class Modeled:
    provider: str
    direction: str
    launches: list[ModeledLaunch] = field(default_factory=list)
    peak: float = 0.0

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def seconds(self) -> float:
        return sum(launch.seconds(self.peak) for launch in self.launches)


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
    return ModeledLaunch(launch.kernel, launch.flops, launch.hbm_bytes, f"{ops}{grid}",
                         programs=math.prod(launch.grid) if launch.is_triton else None)


def fused_launches(point: Point, direction: str, *, deterministic: bool = DETERMINISTIC,
                   num_sms: int = NUM_SMS) -> list[ModeledLaunch]:
    """The launches fused_lora makes on CUDA for this point (mirrors fused_lora.ops.triton_backend)."""
    from fused_lora.kernels import plans

    dtype = getattr(torch, point.dtype)
    M, N, K, r = point.tokens, point.out_features, point.in_features, point.r
    dropout = point.dropout > 0.0
    fwd = plans.plan_lora_fwd(M, N, K, r, dtype, dropout=dropout, bias=point.bias)
    bwd_dy = plans.plan_lora_bwd_dy(M, N, r, dtype, deterministic=deterministic)
    bwd_da = plans.plan_lora_bwd_da(M, K, r, dtype, dropout=dropout, deterministic=deterministic, num_sms=num_sms)
    bwd = bwd_dy + plans.plan_lora_bwd_dx(M, N, K, r, dtype, dropout=dropout) + bwd_da
    modeled = [_from_plan(launch) for launch in {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]]
    if direction != "fwd":
        # LoRALinearFunction.backward returns dA.to(A.dtype) and dB.to(B.dtype): a cast launch
        # whenever the plan leaves the grad in another dtype (fp32 atomics or partial sums).
        for name, plan in (("dA", bwd_da), ("dB", bwd_dy)):
            grad = _final_operand(plan, name)
            if grad.dtype != dtype:
                n = math.prod(grad.shape)
                modeled.append(ModeledLaunch(f"to({point.dtype})", 0, n * grad.dtype.itemsize + n * dtype.itemsize,
                                             f"r:{name}_{_short(grad.dtype)}{list(grad.shape)}, "
                                             f"w:{name}{list(grad.shape)}"))
    return modeled


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


def model_point(provider: str, point: Point) -> dict[str, Modeled]:
    """{direction: Modeled} for one provider at one point (16-bit dtypes only)."""
    peak = PEAK_FLOPS[point.dtype]
    if provider == "fused":
        lists = {d: fused_launches(point, d) for d in DIRECTIONS}
    else:
        lists = traced_launches(provider, point)
    return {d: Modeled(provider, d, lists[d], peak) for d in DIRECTIONS}
