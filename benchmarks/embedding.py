"""The ``embedding`` family of fused-lora-bench: LoRA on an embedding table (``fused-lora-bench --family embedding``).

Providers: ``fused`` (fused_lora.lora_embedding), ``peft`` (PEFT's lora.Embedding on an nn.Embedding) and
``embedding`` (a plain nn.Embedding, no LoRA). Three parts:

1. measured on the CPU it runs on (fp32, a smaller table: the 128256 x 4096 fp32 table is 2 GiB): forward,
   backward and both, median of interleaved rounds; fused runs its CPU path (the torch backend);
2. saved bytes: what autograd keeps for backward (parameters excluded), exact, on meta tensors at the
   modeled sizes;
3. modeled H100 (benchmarks.roofline's GPU constants and launch cost): fused from its plans
   (fused_lora.kernels.lora_embedding.modeled_launches), the torch providers from the aten ops they run on
   meta tensors (each op: its tensors' bytes and its matmul FLOPs, one launch each).

Only A and B are trainable (the table is frozen, as after inject / get_peft_model); ids need no grad.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .providers import random_tensors

PROVIDERS = ("fused", "peft", "embedding")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
VOCAB, DIM = 128256, 4096  # Llama 3's embed_tokens
MODEL_TOKENS = (1, 16, 256, 1024, 4096, 16384)
RANKS = (16, 64)
CPU_VOCAB, CPU_DIM, CPU_TOKENS, CPU_RANKS = 32000, 1024, (256, 4096), (16,)
PRESETS = {  # (model tokens, ranks, cpu tokens, cpu ranks)
    "tiny": ((16, 4096), (16,), (64,), (16,)),
    "quick": (MODEL_TOKENS, RANKS, CPU_TOKENS, CPU_RANKS),
    "full": (MODEL_TOKENS, RANKS, (256, 2048, 16384), (16, 64)),
}
ALPHA_OVER_R = 2.0


@dataclass(frozen=True)
class EmbeddingPoint:
    vocab: int
    dim: int
    tokens: int
    r: int
    dtype: str


@dataclass
class EmbeddingRow:
    part: str  # "measured" | "saved" | "modeled"
    provider: str
    direction: str
    vocab: int
    dim: int
    tokens: int
    r: int
    dtype: str
    ms: float | None = None  # measured median, or modeled time
    saved_bytes: int | None = None
    modeled_bytes: int | None = None
    launches: int | None = None


def _layer(provider: str, point: EmbeddingPoint, device, *, seed: int = 0):
    """(forward of ids, trainable leaves, parameters) of one provider, all sharing the same numbers."""
    dtype = getattr(torch, point.dtype)
    V, D, r = point.vocab, point.dim, point.r
    rand = random_tensors(device, dtype, seed)
    E = nn.Parameter(rand(V, D), requires_grad=False)
    A, B = nn.Parameter(rand(r, V)), nn.Parameter(rand(D, r) / r**0.5)  # B != 0: as after some training
    s = ALPHA_OVER_R
    if provider == "embedding":
        return (lambda ids: F.embedding(ids, E)), [], [E]
    if provider == "fused":
        import fused_lora
        return (lambda ids: fused_lora.lora_embedding(ids, E, A, B, s)), [A, B], [E, A, B]
    if provider == "peft":
        from peft import LoraConfig
        from peft.tuners.lora.layer import Embedding as PeftEmbedding
        base = nn.Embedding(V, D, device="meta", dtype=dtype)
        base.weight = E
        layer = PeftEmbedding(base, "default", LoraConfig(r=r, lora_alpha=ALPHA_OVER_R * r), r=r,
                              lora_alpha=ALPHA_OVER_R * r)
        layer.lora_embedding_A["default"] = A
        layer.lora_embedding_B["default"] = B
        return layer, [A, B], [E, A, B]
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def _ids(point: EmbeddingPoint, device, seed: int = 1) -> torch.Tensor:
    if torch.device(device).type == "meta":
        return torch.empty(point.tokens, dtype=torch.int64, device=device)
    return torch.randint(0, point.vocab, (point.tokens,), generator=torch.Generator().manual_seed(seed)).to(device)


# ---- measured (CPU) ------------------------------------------------------------------------------

def _direction_fns(forward, trainable, ids, dy):
    state = {}

    def fwd():
        with torch.no_grad() if not trainable else torch.enable_grad():
            state["y"] = forward(ids)

    def bwd():
        if trainable:
            state["y"].backward(dy, retain_graph=True)

    def both():
        y = forward(ids)
        if trainable:
            y.backward(dy)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def measure(point: EmbeddingPoint, providers=PROVIDERS, *, rounds: int = 15) -> list[EmbeddingRow]:
    """Median ms per direction, providers interleaved round by round (each round runs every provider)."""
    from .providers import torch_backend_for_cpu

    rows = []
    ids = _ids(point, "cpu")
    dy = torch.randn(point.tokens, point.dim, generator=torch.Generator().manual_seed(2),
                     dtype=getattr(torch, point.dtype))
    with torch_backend_for_cpu():  # time fused_lora's CPU path, not triton's interpreter
        layers = {p: _layer(p, point, "cpu") for p in providers}
        fns = {p: _direction_fns(*layers[p][:2], ids, dy) for p in providers}
        samples = {(p, d): [] for p in providers for d in DIRECTIONS}
        for p in providers:  # warm-up, and the graph bwd() replays
            fns[p]["fwd+bwd"]()
            fns[p]["fwd"]()
        for _ in range(rounds):
            for p in providers:
                for d in DIRECTIONS:
                    if d == "bwd":
                        fns[p]["fwd"]()
                    t0 = time.perf_counter()
                    fns[p][d]()
                    samples[(p, d)].append((time.perf_counter() - t0) * 1e3)
                    for t in layers[p][1]:
                        t.grad = None
    for (p, d), xs in samples.items():
        rows.append(EmbeddingRow("measured", p, d, **asdict(point), ms=statistics.median(xs)))
    return rows


# ---- saved bytes (meta) --------------------------------------------------------------------------

def saved_bytes(provider: str, point: EmbeddingPoint) -> int:
    """Bytes autograd saves in one forward, by storage, parameters excluded (exact, on meta tensors)."""
    forward, trainable, params = _layer(provider, point, "meta")
    if not trainable:
        return 0
    excluded = {t.untyped_storage()._cdata for t in params}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in excluded:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(_ids(point, "meta"))
    return sum(seen.values())


# ---- modeled (H100) ------------------------------------------------------------------------------

_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "view",
              "_unsafe_view", "t", "transpose", "permute", "expand", "reshape", "as_strided", "unsqueeze", "squeeze",
              "_to_copy", "lift_fresh"}


def _traced_launches(provider: str, point: EmbeddingPoint) -> dict[str, list]:
    """{direction: [ModeledLaunch]} of a torch provider from the aten ops it runs on meta tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .roofline import ModeledLaunch

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in _NO_LAUNCH:
                tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                if name in ("embedding", "index_select"):
                    # A gather reads the rows it selects, not the whole table (the dense backward, which
                    # writes the whole grad, keeps its bytes).
                    table = max(tensors, key=lambda t: t.numel())
                    nbytes -= table.numel() * table.element_size()
                    rows = next(t for t in tensors if not t.is_floating_point())
                    nbytes += rows.numel() * table.shape[-1] * table.element_size()
                flops = 0
                if name in ("mm", "addmm", "matmul", "bmm"):
                    a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
                    flops = 2 * math.prod(a.shape) * b.shape[-1]
                self.ops.append(ModeledLaunch(f"aten.{name}", flops, nbytes))
            return out

    forward, trainable, _ = _layer(provider, point, "meta")
    ids = _ids(point, "meta")
    rec = Recorder()
    with rec:
        y = forward(ids)
    fwd = list(rec.ops)
    rec.ops.clear()
    if trainable:
        with rec:
            y.backward(torch.empty_like(y))
    return {"fwd": fwd, "bwd": list(rec.ops), "fwd+bwd": fwd + list(rec.ops)}


def modeled(provider: str, point: EmbeddingPoint, gpu=None):
    """{direction: roofline.Modeled} at the point on the given GPU (default H100)."""
    from . import roofline

    gpu = gpu or roofline.DEFAULT_GPU
    if provider == "fused":
        from fused_lora.kernels import lora_embedding as le
        dtype = getattr(torch, point.dtype)
        per = {d: [roofline._from_plan(launch) for launch in
                   le.modeled_launches(point.tokens, point.vocab, point.dim, point.r, dtype, d)]
               for d in ("fwd", "bwd")}
        per["fwd+bwd"] = per["fwd"] + per["bwd"]
    else:
        per = _traced_launches(provider, point)
    return {d: roofline.Modeled(provider, d, launches, gpu.peak_flops[point.dtype], gpu) for d, launches in per.items()}


# ---- the run -------------------------------------------------------------------------------------

def run(preset: str = "quick", providers=PROVIDERS, *, measure_cpu: bool = True, gpu=None) -> list[EmbeddingRow]:
    model_tokens, ranks, cpu_tokens, cpu_ranks = PRESETS[preset]
    rows = []
    if measure_cpu:
        for M in cpu_tokens:
            for r in cpu_ranks:
                rows += measure(EmbeddingPoint(CPU_VOCAB, CPU_DIM, M, r, "float32"), providers)
    for M in model_tokens:
        for r in ranks:
            point = EmbeddingPoint(VOCAB, DIM, M, r, "bfloat16")
            for p in providers:
                rows.append(EmbeddingRow("saved", p, "fwd", **asdict(point), saved_bytes=saved_bytes(p, point)))
                for d, m in modeled(p, point, gpu).items():
                    rows.append(EmbeddingRow("modeled", p, d, **asdict(point), ms=m.seconds * 1e3,
                                             modeled_bytes=m.bytes, launches=len(m.launches)))
    return rows


def format_rows(rows: list[EmbeddingRow]) -> str:
    head = ("part", "provider", "dir", "V x D", "tokens", "r", "dtype", "ms", "MiB moved", "launches", "saved MiB")
    body = []
    for row in rows:
        mib = lambda n: "-" if n is None else f"{n / 2**20:.3g}"  # noqa: E731
        body.append((row.part, row.provider, row.direction, f"{row.vocab}x{row.dim}", str(row.tokens), str(row.r),
                     row.dtype, "-" if row.ms is None else f"{row.ms:.4g}", mib(row.modeled_bytes),
                     "-" if row.launches is None else str(row.launches), mib(row.saved_bytes)))
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args, argv) -> int:
    """fused-lora-bench --family embedding [--tiny | --quick | --full] [--model-only] [--gpu h100|h200] [--out DIR]."""
    from . import roofline

    preset = "tiny" if args.tiny else "full" if args.full else "quick"
    torch.set_num_threads(args.cpu_threads)
    rows = run(preset, measure_cpu=not args.model_only, gpu=roofline.GPUS[args.gpu])
    print(f"LoRA for Embedding (fused-lora-bench {' '.join(argv)}): measured on CPU (fp32, {CPU_VOCAB}x{CPU_DIM}, "
          f"fused on its torch path), saved bytes and modeled {roofline.GPUS[args.gpu].name} "
          f"({VOCAB}x{DIM}, bf16, alpha = 2 r)")
    print(format_rows(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedding.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(f"wrote embedding.json to {out}/")
    return 0
