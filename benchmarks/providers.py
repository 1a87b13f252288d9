"""The providers: five ways to compute one LoRA layer (or its base GEMM) from the same parameters.

Every provider is built from one ``Params`` (W, b, A, B, s, p) and returns a ``Layer``: a forward
callable of x, and the trainable leaves whose grads the timing loop clears. W and b are frozen
everywhere; x, A and B require grad (x because a real layer passes dX on to the previous layer).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .sweep import PROVIDERS, Point


def random_tensors(device, dtype, seed: int):
    """A function of a shape giving seeded randn tensors (empty ones on meta, where there are no values)."""
    if torch.device(device).type == "meta":
        return lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)


@dataclass
class Params:
    W: torch.Tensor
    b: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float

    @classmethod
    def make(cls, point: Point, device, *, seed: int = 0) -> "Params":
        dtype = getattr(torch, point.dtype)
        K, N, r = point.in_features, point.out_features, point.r
        rand = random_tensors(device, dtype, seed)
        # Scaled so y and the grads stay O(1) in 16-bit dtypes; B is not zero (as after some training).
        W, A, B = rand(N, K) / K**0.5, rand(r, K) / K**0.5, rand(N, r) / r**0.5
        b = rand(N) if point.bias else None
        return cls(W, b, A, B, point.scaling, point.dropout)

    def frozen(self) -> list[torch.Tensor]:
        return [t for t in (self.W, self.b) if t is not None]


@dataclass
class Layer:
    forward: Callable[[torch.Tensor], torch.Tensor]
    trainable: list[torch.Tensor]  # leaves (besides x) that get a .grad
    parameters: list[torch.Tensor]  # every parameter tensor, frozen or not (excluded from saved bytes)


def _leaf(t: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """A new leaf sharing t's storage, so every provider uses the very same numbers."""
    return nn.Parameter(t.detach(), requires_grad=requires_grad)


def backend_env(name: str):
    """FUSED_LORA_BACKEND=name inside the block, restored after."""
    from fused_lora.ops.dispatch import forced_backend
    return forced_backend(name)


def torch_backend_for_cpu():
    """Run fused_lora's CPU path (its torch backend) even when TRITON_INTERPRET=1 is set: timing the
    interpreter would measure numpy, not our CPU path."""
    return backend_env("torch")


def fused_cpu_backend() -> str:
    """The CPU path `fused` is timed on: FUSED_LORA_BACKEND=cpp or torch when the user sets it, else what a
    CPU user gets (the C++ kernels, or the torch backend where they cannot be built)."""
    from fused_lora.ops import cpp_backend

    forced = os.environ.get("FUSED_LORA_BACKEND", "").strip().lower()
    if forced in ("cpp", "torch"):
        return forced
    return "cpp" if cpp_backend.available() else "torch"


def fused_cpu_path():
    """Run fused_lora's CPU path (fused_cpu_backend) even when TRITON_INTERPRET=1 is set: timing the
    interpreter would measure numpy."""
    return backend_env(fused_cpu_backend())


def build_fused(p: Params) -> Layer:
    """fused_lora.lora_linear: the Triton kernels on CUDA, the C++ kernels (or the torch backend) on CPU, the
    torch backend on meta."""
    import fused_lora

    A, B = _leaf(p.A, True), _leaf(p.B, True)

    def forward(x):
        return fused_lora.lora_linear(x, p.W, p.b, A, B, p.scaling, dropout_p=p.dropout, training=True)

    return Layer(forward, [A, B], [p.W, p.b, A, B])


class EagerLoRA(nn.Module):
    """PEFT's formula in plain torch: base(x) + lora_B(lora_A(dropout(x))) * s (PEFT's Identity at p = 0)."""

    def __init__(self, p: Params):
        super().__init__()
        N, K = p.W.shape
        r = p.A.shape[0]
        self.base = nn.Linear(K, N, bias=p.b is not None, device="meta")
        self.lora_A = nn.Linear(K, r, bias=False, device="meta")
        self.lora_B = nn.Linear(r, N, bias=False, device="meta")
        self.base.weight = _leaf(p.W, False)
        if p.b is not None:
            self.base.bias = _leaf(p.b, False)
        self.lora_A.weight = _leaf(p.A, True)
        self.lora_B.weight = _leaf(p.B, True)
        self.dropout = nn.Dropout(p.dropout) if p.dropout > 0.0 else nn.Identity()
        self.scaling = p.scaling

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def build_eager(p: Params) -> Layer:
    m = EagerLoRA(p).train()
    return Layer(m, [m.lora_A.weight, m.lora_B.weight], list(m.parameters()))


def peft_available() -> bool:
    try:
        import peft.tuners.lora  # noqa: F401
    except ImportError:
        return False
    return True


def peft_linear(p: Params, **config):
    """The real peft.tuners.lora.Linear (LoraConfig(**config) on top of r, lora_alpha, lora_dropout) around an
    nn.Linear holding W and b, in training mode, its lora_A and lora_B our leaves A and B."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    N, K = p.W.shape
    r = p.A.shape[0]
    base = nn.Linear(K, N, bias=p.b is not None, device="meta")
    base.weight = _leaf(p.W, False)
    if p.b is not None:
        base.bias = _leaf(p.b, False)
    alpha = p.scaling * r
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p.dropout, init_lora_weights=False, **config)
    layer = PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=alpha)
    layer.lora_A["default"].weight = _leaf(p.A, True)
    layer.lora_B["default"].weight = _leaf(p.B, True)
    layer.scaling["default"] = p.scaling
    layer.train()
    return layer


def build_peft(p: Params) -> Layer:
    """The real peft.tuners.lora.Linear around an nn.Linear holding W and b."""
    layer = peft_linear(p)
    trainable = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return Layer(layer, trainable, list(layer.parameters()))


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * (a @ b) as one GEMM (cuBLAS's alpha): addmm with beta = 0 ignores its input, so a
    0-dim empty one (an allocation, no launch) stands in for it."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=alpha)


class _AddmmLoRA(torch.autograd.Function):
    """The strongest unfused baseline: y = x W^T, then addmm_ of S B^T into the same buffer; saves x, S.

    With dropout, backward needs dropout(x) (for dA) and the mask (for dX's LoRA term), not x (W is
    frozen): it saves those two, from one native_dropout (the CUDA kernel PEFT's nn.Dropout runs), so
    it keeps as many bytes as PEFT's formula (2 + 1 bytes per element of x in bf16) and recomputes
    nothing. The scaling s rides on the GEMMs' alpha (no separate mul launches); the mask is applied
    by the addcmul_ that adds the LoRA term into dX (one elementwise launch, not two).
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, scaling, p):
        if p > 0.0:
            x_lora, mask = torch.native_dropout(x, p, True)
        else:
            x_lora, mask = x, None
        s = torch.mm(x_lora, A.t())
        y = torch.addmm(b, x, W.t()) if b is not None else torch.mm(x, W.t())
        y.addmm_(s, B.t(), alpha=scaling)
        ctx.save_for_backward(x_lora, W, A, B, s, mask)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, dy):
        x_lora, W, A, B, s, mask = ctx.saved_tensors
        need_dx, _, _, need_dA, need_dB = ctx.needs_input_grad[:5]
        scaling = ctx.scaling
        dy_B = torch.mm(dy, B)  # dS / s
        dB = _mm_scaled(dy.t(), s, scaling) if need_dB else None
        dx = dA = None
        if need_dx:
            dx = torch.mm(dy, W)
            if mask is None:
                dx.addmm_(dy_B, A, alpha=scaling)
            else:
                dx.addcmul_(torch.mm(dy_B, A), mask, value=scaling / (1.0 - ctx.p))
        if need_dA:
            dA = _mm_scaled(dy_B.t(), x_lora, scaling)
        return dx, None, None, dA, dB, None, None


def build_addmm(p: Params) -> Layer:
    A, B = _leaf(p.A, True), _leaf(p.B, True)

    def forward(x):
        return _AddmmLoRA.apply(x, p.W, p.b, A, B, p.scaling, p.dropout)

    return Layer(forward, [A, B], [p.W, p.b, A, B])


def build_gemm(p: Params) -> Layer:
    """The bare base linear (frozen W: backward is dX = dY W only). The floor."""
    def forward(x):
        return F.linear(x, p.W, p.b)

    return Layer(forward, [], [p.W, p.b])


BUILDERS = {"fused": build_fused, "eager": build_eager, "peft": build_peft, "addmm": build_addmm,
            "gemm": build_gemm}
assert tuple(BUILDERS) == PROVIDERS


def available(name: str) -> tuple[bool, str]:
    """(usable, why not)."""
    if name == "peft" and not peft_available():
        return False, "peft is not installed (pip install 'fused_lora[peft]')"
    return True, ""


def make_input(point: Point, device, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x requiring grad, a fixed dY) for one point."""
    dtype = getattr(torch, point.dtype)
    M, K, N = point.tokens, point.in_features, point.out_features
    if torch.device(device).type == "meta":
        return (torch.empty(M, K, device=device, dtype=dtype, requires_grad=True),
                torch.empty(M, N, device=device, dtype=dtype))
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, generator=g, device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=g, device=device, dtype=dtype) / N**0.5
    return x, dy


@contextlib.contextmanager
def cuda_dropout_on_meta():
    """Make F.dropout on meta tensors dispatch as it does on CUDA.

    On CUDA, at::dropout calls the fused native_dropout (output and a bool mask, which autograd
    saves). On meta and CPU it takes another path (bernoulli_ noise in x's dtype, saved instead of
    the mask), so without this the meta trace and saved bytes of eager/peft would not be CUDA's.
    """
    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if input.device.type == "meta" and training and 0.0 < p < 1.0 and input.numel() > 0 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original
