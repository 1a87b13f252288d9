"""A short demo: one LoRA layer, forward and backward, checked against the reference.

    python -m fused_lora.demo            # CPU path (or CUDA kernels when a GPU is present)
    TRITON_INTERPRET=1 python -m fused_lora.demo --device cpu   # the Triton kernels, interpreted
"""
from __future__ import annotations

import argparse
import time

import torch

import fused_lora
from fused_lora.functional import select_backend


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward, excluding parameters (counted by storage, once each)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--in-features", type=int, default=512)
    parser.add_argument("--out-features", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = fused_lora.LoRALinear(args.in_features, args.out_features, r=args.rank, lora_alpha=2 * args.rank,
                                  lora_dropout=args.dropout, device=args.device, dtype=dtype)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(args.tokens, args.in_features, device=args.device, dtype=dtype, requires_grad=True)
    print(f"fused_lora {fused_lora.__version__}: {layer}")
    print(f"backend: {select_backend(x)}  device: {args.device}  dtype: {args.dtype}  tokens: {args.tokens}")

    start = time.perf_counter()
    y = layer(x, seed=1)
    y.float().square().mean().backward()
    elapsed = time.perf_counter() - start
    a = layer.lora_A.detach().double().requires_grad_(True)
    b = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y64 = fused_lora.reference.lora_linear(x64, layer.weight.double(), layer.bias.double(), a, b, layer.scaling,
                                           dropout_p=args.dropout, training=True, seed=1)
    y64.square().mean().backward()
    rel = lambda got, ref: ((got.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"forward+backward: {elapsed * 1e3:.1f} ms (one call, includes first-call overhead)")
    print(f"max relative error vs fp64 reference: y {rel(y, y64):.2e}  dx {rel(x.grad, x64.grad):.2e}  "
          f"dA {rel(layer.lora_A.grad, a.grad):.2e}  dB {rel(layer.lora_B.grad, b.grad):.2e}")

    def peft_style():  # PEFT's formula: base(x) + lora_B(lora_A(dropout(x))) * s
        xx = x.detach().requires_grad_(True)
        lin = torch.nn.functional.linear
        drop = torch.nn.functional.dropout(xx, args.dropout, training=True)
        return lin(xx, layer.weight, layer.bias) + lin(lin(drop, layer.lora_A), layer.lora_B) * layer.scaling

    fused_bytes = _saved_bytes(lambda: layer(x.detach().requires_grad_(True), seed=1))
    eager_bytes = _saved_bytes(peft_style)
    # On CPU, F.dropout saves its mask as a noise tensor in x's dtype; on CUDA it saves a bool mask, so
    # fused-lora-bench's saved-bytes part (CUDA's dispatch) shows a smaller ratio for the same layer.
    print(f"activation bytes saved for backward ({args.dtype} on {args.device}, dropout {args.dropout}): "
          f"fused {fused_bytes:,}, PEFT's formula in eager torch {eager_bytes:,} "
          f"({eager_bytes / fused_bytes:.2f}x fewer for fused)")


if __name__ == "__main__":
    main()
