"""What fused-lora-bench sweeps: providers, directions, dtypes, shapes, points and presets."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

PROVIDERS = ("fused", "eager", "peft", "addmm", "gemm")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
DTYPES = ("bfloat16", "float16", "float32")

# (in_features K, out_features N) of the attention and MLP projections.
LLAMA3_8B_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
LLAMA3_70B_SHAPES = ((8192, 8192), (8192, 28672))
MODEL_SHAPES = LLAMA3_8B_SHAPES + LLAMA3_70B_SHAPES
# The headline point: r = 16, 8192 tokens, 4096 -> 4096, bf16.
HEADLINE = dict(shape=(4096, 4096), tokens=8192, r=16, dtype="bfloat16")
# LoRA scaling of every provider: lora_alpha = 2 r (a common choice); it does not change the cost.
ALPHA_OVER_R = 2.0
# Base projections of Llama-class models have no bias.
BIAS = False


@dataclass(frozen=True)
class Point:
    """One layer configuration: y = x W^T + s * (dropout(x) A^T) B^T with x (tokens, K), W (N, K)."""
    in_features: int
    out_features: int
    tokens: int
    r: int
    dropout: float
    dtype: str
    bias: bool = BIAS

    @property
    def shape(self) -> str:
        return f"{self.in_features}->{self.out_features}"

    @property
    def scaling(self) -> float:
        return ALPHA_OVER_R

    def as_dict(self) -> dict:
        return {"shape": self.shape, **asdict(self)}

    def useful_flops(self, provider: str, direction: str) -> int:
        """FLOPs of the math (not of padded tiles): used for TFLOP/s.

        fwd: x W^T plus, for LoRA, x' A^T and S B^T. bwd (base frozen, x, A, B trainable): dY W, plus
        dS = dY B, dB = dY^T S, dA = dS^T x' and dS A for LoRA.
        """
        M, N, K, r = self.tokens, self.out_features, self.in_features, self.r
        lora = provider != "gemm"
        fwd = 2 * M * N * K + (2 * M * r * (K + N) if lora else 0)
        bwd = 2 * M * N * K + (4 * M * r * (K + N) if lora else 0)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


@dataclass(frozen=True)
class Sweep:
    shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    ranks: tuple[int, ...]
    dropouts: tuple[float, ...]
    dtypes: tuple[str, ...]

    def points(self) -> list[Point]:
        return [Point(K, N, M, r, p, dt) for (K, N), M, r, p, dt in
                itertools.product(self.shapes, self.tokens, self.ranks, self.dropouts, self.dtypes)]

    def with_filters(self, filters: dict) -> "Sweep":
        return replace(self, **{k: v for k, v in filters.items() if v is not None})


# On a GPU. quick: 6 shapes x 4 token counts x 2 ranks x 2 dropouts, bf16: 96 points x 5 providers x 3
# directions, at do_bench's ~0.1 s per timing a few minutes on one GPU.
GPU_PRESETS = {
    "tiny": Sweep(((256, 256),), (64,), (16,), (0.0, 0.1), ("bfloat16",)),
    "quick": Sweep(MODEL_SHAPES, (1, 256, 2048, 8192), (16, 64), (0.0, 0.1), ("bfloat16",)),
    "full": Sweep(MODEL_SHAPES, (1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384), (8, 16, 64, 128), (0.0, 0.1),
                  ("bfloat16", "float16")),
}
# On CPU (no CUDA): small shapes, fp32. bf16 is not timed by default: a 1024^3 bf16 mm took 2.3 s on
# a 2-core x86_64 CPU through torch's mm (21 ms in fp32). The default CPU run (quick) took 32-39 s in all.
CPU_PRESETS = {
    "tiny": Sweep(((64, 64),), (32,), (8,), (0.0, 0.1), ("float32",)),
    "quick": Sweep(((1024, 1024),), (64, 256), (16,), (0.0, 0.1), ("float32",)),
    "full": Sweep(((1024, 1024), (1024, 4096)), (64, 256, 1024), (16, 64), (0.0, 0.1), ("float32",)),
}
# The modeled H100 sweep in CPU mode: the full sweep's shapes, tokens and ranks. bf16 only: the model
# gives fp16 the same peak and the same bytes, so its rows would be identical.
MODEL_PRESETS = {
    "tiny": Sweep((HEADLINE["shape"],), (HEADLINE["tokens"],), (HEADLINE["r"],), (0.0, 0.1), ("bfloat16",)),
    "quick": Sweep(MODEL_SHAPES, (1, 16, 256, 1024, 4096, 8192, 16384), (8, 16, 64, 128), (0.0, 0.1),
                   ("bfloat16",)),
    "full": Sweep(MODEL_SHAPES, (1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384), (8, 16, 64, 128), (0.0, 0.1),
                  ("bfloat16", "float16")),
}
