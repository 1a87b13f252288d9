"""LoRA for Embedding: y = E[ids] + s * (A^T[ids]) B^T, its backward, tile configs, plans and launchers.

ids: (M,) after flattening, int32 or int64 · E: (V, D) frozen table · A = lora_embedding_A: (r, V) ·
B = lora_embedding_B: (D, r) · s: the scaling. S := A^T[ids] (M, r) is the only activation saved.

    forward   _lora_embedding_fwd_kernel: one pass gathers the E rows and the A^T rows of each token and
              writes y (and S, from the first D tile)
    backward  dS = s dY B and dB = s dY^T S from one pass over dY (the Linear family's _lora_bwd_dy_kernel,
              which computes exactly this pair); then dA[:, v] = sum of dS over the tokens with id v:
              ids sorted (stable) on the device, and _lora_embedding_bwd_da_kernel sums each id's run of
              dS rows in token order and stores its column once. No atomics, so dA is bit-identical from run
              to run with or without torch.use_deterministic_algorithms (one path for both).
              dE (only when E requires grad) is torch's embedding backward, done by the caller.

S is saved instead of regathered: a saved S is M * r contiguous elements written once and read once; a
regather reads r elements per token at a stride of V elements, one 32-byte sector per element on a GPU,
16x the bytes of S in bf16.

The plans work without triton installed (the benchmark's modeled table imports them): the kernels are
defined only when triton imports.
"""
import contextlib
import functools

import torch

from .configs import TileConfig, padded_rank
from .plans import ZEROS, Launch, Operand, plan_lora_bwd_dy

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# Torch ops the backward plan runs besides plans.TORCH_OPS.
SORT = "torch.sort(stable=True)"  # reads: ids; writes: sorted ids and the token order
SEARCHSORTED = "torch.searchsorted(right=True)"  # reads: sorted ids; writes: each run's end
EMBEDDING_TORCH_OPS = (ZEROS, SORT, SEARCHSORTED)

FWD_KERNEL = "_lora_embedding_fwd_kernel"
DA_KERNEL = "_lora_embedding_bwd_da_kernel"
KERNELS = (FWD_KERNEL, DA_KERNEL)

# At or below this many tokens one 16-row tile covers them (tl.dot's smallest M).
FEW_TOKENS = 16


# ---- tile configs -------------------------------------------------------------------------------

def _is_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def rank_chunk(R: int, dtype: torch.dtype) -> int:
    """Rank slice of the S B^T dot: a (BLOCK_M, R_CHUNK) S slice and an (R_CHUNK, BLOCK_D) B slice live at a time.

    fp32 from R = 128 on: 16 (the 16 x 64 FMA tile spilled 8 B on sm_80 with 32 slices; kernel_report).
    """
    return 16 if _is_fp32(dtype) and R >= 128 else min(R, 32)


def fwd_config(M: int, R: int, dtype: torch.dtype) -> TileConfig:
    """_lora_embedding_fwd_kernel: the bytes are the gathered E rows and y (M * D each); the dot is r / D of
    a GEMM's work per element, so tiles are sized for memory parallelism, not for the MMA."""
    # fp32 without tf32 runs the dot on FMA, which holds K = R_CHUNK slices of both operands in registers:
    # a 64-wide D tile. One stage: there is no loop over D or over the tokens to pipeline.
    block_d = 64 if _is_fp32(dtype) else 128
    if M <= FEW_TOKENS:
        return TileConfig(BLOCK_M=16, BLOCK_N=block_d, num_warps=4, num_stages=1)
    # 64 x 128 on 4 warps spilled 216 B on sm_90 (bf16 / fp16, R = 64, r % 16 != 0) at 255 registers; 8 warps
    # halve the accumulator and E tile per thread (kernel_report).
    return TileConfig(BLOCK_M=64, BLOCK_N=block_d, num_warps=8, num_stages=1)


def da_config(R: int, dtype: torch.dtype) -> TileConfig:
    """_lora_embedding_bwd_da_kernel: one (BLOCK_M, R) fp32 accumulator per program, no dot.

    The gather of dS rows keeps a (BLOCK_M, R) int64 pointer tile next to the accumulator: 64 x 64 on 4 warps
    spilled 208 B on sm_90 (r % 16 != 0) and 32 x 256 on 4 warps 56-64 B (kernel_report). At most 2048
    elements per 4 warps and 4096 per 8 warps do not spill.
    """
    block_m = max(16, min(64, 2048 // R))
    return TileConfig(BLOCK_M=block_m, num_warps=4 if block_m * R <= 2048 else 8, num_stages=1)


# ---- plans --------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan_lora_embedding_fwd(M: int, V: int, D: int, r: int, dtype: torch.dtype,
                            ids_dtype: torch.dtype = torch.int64) -> list[Launch]:
    """The forward launch: grid (row tiles, D tiles); reads ids, the gathered rows of E and A^T, and B."""
    if M == 0 or D == 0:
        return []
    R = padded_rank(r)
    cfg = fwd_config(M, R, dtype)
    grid = (_cdiv(M, cfg.BLOCK_M), _cdiv(D, cfg.BLOCK_N))
    flops = 2 * grid[0] * cfg.BLOCK_M * grid[1] * cfg.BLOCK_N * R  # S B^T over the padded rank
    reads = (Operand("ids", (M,), ids_dtype), Operand("E[ids]", (M, D), dtype),
             Operand("A^T[ids]", (M, r), dtype), Operand("B", (D, r), dtype))
    writes = (Operand("Y", (M, D), dtype), Operand("S", (M, r), dtype))
    constexprs = dict(R=R, R_CHUNK=rank_chunk(R, dtype), BLOCK_M=cfg.BLOCK_M, BLOCK_D=cfg.BLOCK_N)
    return [Launch(FWD_KERNEL, grid, cfg, constexprs, reads=reads, writes=writes, flops=flops)]


def plan_lora_embedding_da(M: int, V: int, r: int, dtype: torch.dtype, *, scale_grad_by_freq: bool = False,
                           ids_dtype: torch.dtype = torch.int64) -> list[Launch]:
    """dA from dS: sort, run ends, a zeroed dA (ids absent from the batch keep 0) and the run sums."""
    dA = Operand("dA", (r, V), dtype)
    zeros = [Launch(ZEROS, writes=(dA,))] if r * V else []
    if M == 0 or r * V == 0:
        return zeros
    ids = Operand("ids", (M,), ids_dtype)
    sorted_ids, order = Operand("sorted_ids", (M,), ids_dtype), Operand("order", (M,), torch.int64)
    run_end = Operand("run_end", (M,), torch.int64)
    R = padded_rank(r)
    cfg = da_config(R, dtype)
    constexprs = dict(R=R, BLOCK_M=cfg.BLOCK_M, SCALE_GRAD_BY_FREQ=bool(scale_grad_by_freq))
    # dA's bytes: the columns of the ids present, at most M of them (the zeroing writes all of dA).
    touched = Operand("dA[:, ids]", (r, M), dtype)
    return [Launch(SORT, reads=(ids,), writes=(sorted_ids, order)),
            Launch(SEARCHSORTED, reads=(sorted_ids,), writes=(run_end,)),
            *zeros,
            Launch(DA_KERNEL, (_cdiv(M, cfg.BLOCK_M),), cfg, constexprs,
                   reads=(sorted_ids, order, run_end, Operand("dS", (M, r), dtype)), writes=(touched,))]


def plan_lora_embedding_bwd(M: int, V: int, D: int, r: int, dtype: torch.dtype, *, deterministic: bool,
                            need_dA: bool = True, need_dB: bool = True, scale_grad_by_freq: bool = False,
                            ids_dtype: torch.dtype = torch.int64) -> list[Launch]:
    """(dS, dB) from one pass over dY (plans.plan_lora_bwd_dy on dY (M, D) and B (D, r)), then dA."""
    if not (need_dA or need_dB):
        return []
    launches = plan_lora_bwd_dy(M, D, r, dtype, deterministic=deterministic)
    if need_dA:
        launches += plan_lora_embedding_da(M, V, r, dtype, scale_grad_by_freq=scale_grad_by_freq,
                                           ids_dtype=ids_dtype)
    return launches


def modeled_launches(M: int, V: int, D: int, r: int, dtype: torch.dtype, direction: str, *,
                     deterministic: bool = False) -> list[Launch]:
    """The launches of one direction ("fwd" or "bwd", every LoRA grad) for a roofline model."""
    if direction == "fwd":
        return plan_lora_embedding_fwd(M, V, D, r, dtype)
    if direction == "bwd":
        return plan_lora_embedding_bwd(M, V, D, r, dtype, deterministic=deterministic)
    raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")


# ---- kernels ----------------------------------------------------------------------------------

if triton is not None:
    from ._common import _span

    @triton.jit
    def _lora_embedding_fwd_kernel(
        ids_ptr,  # (M,) int32 / int64 token ids; ids outside [0, V) read nothing (a 0 row)
        e_ptr,  # (V, D) the frozen table E
        a_ptr,  # (r, V) lora_embedding_A
        b_ptr,  # (D, r) lora_embedding_B
        y_ptr,  # (M, D) output: E[ids] + s * S B^T, E's dtype
        s_ptr,  # (M, r) output: S = A^T[ids], written by the pid_d == 0 programs
        M, V, D, r,
        stride_ev, stride_ed,
        stride_ar, stride_av,
        stride_bd, stride_br,
        stride_ym, stride_yd,
        stride_sm, stride_sr,
        scaling,
        R: tl.constexpr,  # r padded to a power of two >= 16
        R_CHUNK: tl.constexpr,  # rank slice per S B^T dot
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        offs_m = _span(pid_m * BLOCK_M, BLOCK_M)
        offs_d = _span(pid_d * BLOCK_D, BLOCK_D)
        in_m = offs_m < M
        ids = tl.load(ids_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
        valid = in_m & (ids >= 0) & (ids < V)
        ids = tl.where(valid, ids, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for r0 in tl.range(0, R, R_CHUNK, num_stages=1):
            offs_r = _span(r0, R_CHUNK)
            in_r = offs_r < r
            # (BLOCK_M, R_CHUNK): column ids of A, i.e. rows of A^T.
            s = tl.load((a_ptr + ids[:, None] * stride_av) + offs_r[None, :] * stride_ar,
                        mask=valid[:, None] & in_r[None, :], other=0.0)
            if pid_d == 0:
                tl.store((s_ptr + offs_m[:, None] * stride_sm) + offs_r[None, :] * stride_sr, s,
                         mask=in_m[:, None] & in_r[None, :])
            b = tl.load((b_ptr + offs_r[:, None] * stride_br) + offs_d[None, :] * stride_bd,
                        mask=in_r[:, None] & (offs_d[None, :] < D), other=0.0)  # (R_CHUNK, BLOCK_D)
            acc = tl.dot(s, b, acc, input_precision=INPUT_PRECISION)
        e = tl.load((e_ptr + ids[:, None] * stride_ev) + offs_d[None, :] * stride_ed,
                    mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
        y = e.to(tl.float32) + acc * scaling
        tl.store((y_ptr + offs_m[:, None] * stride_ym) + offs_d[None, :] * stride_yd, y.to(y_ptr.dtype.element_ty),
                 mask=in_m[:, None] & (offs_d[None, :] < D))

    @triton.jit
    def _lora_embedding_bwd_da_kernel(
        sorted_ids_ptr,  # (M,) the ids sorted ascending (stable: equal ids keep token order)
        order_ptr,  # (M,) int64: the token of each sorted position
        run_end_ptr,  # (M,) int64: one past the last sorted position holding the same id
        ds_ptr,  # (M, r) dS = s dY B, in token order
        grad_a_ptr,  # (r, V) output dA, zeroed before: columns of ids absent from the batch stay 0
        M, V, r,
        padding_idx,  # the id whose column gets no gradient; -1: none
        stride_dsm, stride_dsr,
        stride_dar, stride_dav,
        R: tl.constexpr,  # r padded to a power of two >= 16
        BLOCK_M: tl.constexpr,
        SCALE_GRAD_BY_FREQ: tl.constexpr,  # divide each column by its id's count in the batch
    ):
        # A lane per sorted position; the lane at the head of a run of equal ids sums that whole run (which may
        # extend past this block) in sorted order and stores its column once: no two programs write a column.
        pid = tl.program_id(0).to(tl.int64)
        offs_k = _span(pid * BLOCK_M, BLOCK_M)
        offs_r = _span(0, R)
        in_k = offs_k < M
        ids = tl.load(sorted_ids_ptr + offs_k, mask=in_k, other=0).to(tl.int64)
        prev = tl.load(sorted_ids_ptr + (offs_k - 1), mask=in_k & (offs_k > 0), other=0).to(tl.int64)
        head = in_k & ((offs_k == 0) | (ids != prev)) & (ids != padding_idx) & (ids >= 0) & (ids < V)
        end = tl.load(run_end_ptr + offs_k, mask=head, other=0)
        count = tl.where(head, end - offs_k, 0)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for step in range(0, tl.max(count, axis=0)):
            live = step < count
            rows = tl.load(order_ptr + (offs_k + step), mask=live, other=0)
            ds = tl.load((ds_ptr + rows[:, None] * stride_dsm) + offs_r[None, :] * stride_dsr,
                         mask=live[:, None] & (offs_r[None, :] < r), other=0.0)
            acc += ds.to(tl.float32)
        if SCALE_GRAD_BY_FREQ:
            acc = acc / tl.maximum(count, 1).to(tl.float32)[:, None]
        tl.store((grad_a_ptr + offs_r[None, :] * stride_dar) + ids[:, None] * stride_dav, acc.to(grad_a_ptr.dtype.element_ty),
                 mask=head[:, None] & (offs_r[None, :] < r))

# ---- launchers ----------------------------------------------------------------------------------

def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's allow_tf32, as torch's own matmul does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _guard(device: torch.device):
    """Triton launches on the current CUDA device: make the tensors' device current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=4096)
def _fwd_plan(M, V, D, r, dtype, ids_dtype):
    return plan_lora_embedding_fwd(M, V, D, r, dtype, ids_dtype)


@functools.lru_cache(maxsize=4096)
def _da_plan(M, V, r, dtype, scale_grad_by_freq, ids_dtype):
    return plan_lora_embedding_da(M, V, r, dtype, scale_grad_by_freq=scale_grad_by_freq, ids_dtype=ids_dtype)


def _kwargs(launch: Launch, dtype: torch.dtype) -> dict:
    return {**launch.constexprs, **launch.config.launch_options(),
            **({"INPUT_PRECISION": _input_precision(dtype)} if launch.kernel == FWD_KERNEL else {})}


def lora_embedding_fwd(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S): y = E[ids] + s * S B^T (M, D) and S = A^T[ids] (M, r), both in E's dtype, fp32 accumulation.

    ids: (M,) contiguous int32 / int64 in [0, V) (checked by the caller; the kernel masks others to 0 rows).
    """
    if _interpreting():
        _install_interpreter_fixes()
    M = ids.shape[0]
    V, D = weight.shape
    r = lora_A.shape[0]
    y = torch.empty((M, D), device=weight.device, dtype=weight.dtype)
    s = torch.empty((M, r), device=weight.device, dtype=weight.dtype)
    plan = _fwd_plan(M, V, D, r, weight.dtype, ids.dtype)
    if not plan:
        if M and r:  # D == 0: S is still the gather
            s.copy_(lora_A.t()[ids])
        return y, s
    launch, = plan
    with _guard(weight.device):
        _lora_embedding_fwd_kernel[launch.grid](
            ids, weight, lora_A, lora_B, y, s, M, V, D, r, *weight.stride(), *lora_A.stride(), *lora_B.stride(),
            *y.stride(), *s.stride(), float(scaling), **_kwargs(launch, weight.dtype))
    return y, s


def lora_embedding_da(ids: torch.Tensor, ds: torch.Tensor, num_embeddings: int, *, padding_idx: int = -1,
                      scale_grad_by_freq: bool = False) -> torch.Tensor:
    """dA (r, V) in dS's dtype: column v is the sum of dS's rows over the tokens with id v, in token order
    (divided by their count with scale_grad_by_freq); the padding_idx column is 0 (-1: no padding)."""
    if _interpreting():
        _install_interpreter_fixes()
    M, r = ds.shape
    V = num_embeddings
    plan = _da_plan(M, V, r, ds.dtype, bool(scale_grad_by_freq), ids.dtype)
    buffers: dict[str, torch.Tensor] = {}
    with _guard(ds.device):
        for launch in plan:
            if launch.kernel == SORT:
                buffers["sorted_ids"], buffers["order"] = torch.sort(ids, stable=True)
            elif launch.kernel == SEARCHSORTED:
                buffers["run_end"] = torch.searchsorted(buffers["sorted_ids"], buffers["sorted_ids"], right=True)
            elif launch.kernel == ZEROS:
                out, = launch.writes
                buffers["dA"] = torch.zeros(out.shape, device=ds.device, dtype=out.dtype)
            elif launch.kernel == DA_KERNEL:
                da = buffers["dA"]
                _lora_embedding_bwd_da_kernel[launch.grid](
                    buffers["sorted_ids"], buffers["order"], buffers["run_end"], ds, da, M, V, r, padding_idx,
                    *ds.stride(), *da.stride(), **_kwargs(launch, ds.dtype))
            else:
                raise AssertionError(f"the plan has an op no launcher runs: {launch.kernel}")
    da = buffers.get("dA")
    return da if da is not None else torch.zeros((r, V), device=ds.device, dtype=ds.dtype)


def lora_embedding_bwd(dy, ids, lora_B, s, scaling: float, num_embeddings: int, *, padding_idx: int = -1,
                       scale_grad_by_freq: bool = False, need_dA: bool = True, need_dB: bool = True):
    """(dA or None, dB or None) in B's dtype: dS and dB from one pass over dY, then dA from dS.

    dB follows torch.are_deterministic_algorithms_enabled() as the Linear family's does (fp32 atomics over row
    blocks, or per-block partials summed in a fixed order, both finished in the kernel); dA is always deterministic.
    """
    from . import launchers  # imports triton

    if not (need_dA or need_dB):
        return None, None
    deterministic = torch.are_deterministic_algorithms_enabled()
    ds, db = launchers.lora_bwd_dy(dy, lora_B, s, scaling, deterministic=deterministic)
    da = lora_embedding_da(ids, ds, num_embeddings, padding_idx=padding_idx,
                           scale_grad_by_freq=scale_grad_by_freq) if need_dA else None
    return da, (db.to(lora_B.dtype) if need_dB else None)


def _interpreting() -> bool:
    from ._interpreter import interpreting
    return interpreting()


@functools.lru_cache(maxsize=None)
def _install_interpreter_fixes() -> None:
    from ._interpreter import install_fixes
    install_fixes()
