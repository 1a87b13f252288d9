"""Host time of one tiny fused_lora layer (kernels stubbed) against eager torch, for any fused_lora version.

    python benchmarks/host_compare.py                                   # the fused_lora installed here
    cd /tmp && PYTHONPATH=/path/to/other/tree python /path/to/benchmarks/host_compare.py

Unlike ``fused-lora-bench --host-only`` it uses nothing but the kernel names of
the launchers' module (``fused_lora.kernels.launchers``; ``fused_lora.kernels.ops`` in older trees) and
``fused_lora.lora_linear``, so it also measures older checkouts (whose package tree has ``kernels/``
copied to ``fused_lora/kernels``) in the same session as the current one.
Same method: CPU time of this thread, one thread, shuffled rounds, minimum over rounds.
"""
import os
import random
import time

os.environ["TRITON_INTERPRET"] = "1"  # selects the Triton path for CPU tensors; the kernels never run

import torch  # noqa: E402

import fused_lora  # noqa: E402
try:
    from fused_lora.kernels import launchers  # noqa: E402
except ImportError:  # trees before the launchers' module was named launchers.py
    from fused_lora.kernels import ops as launchers  # noqa: E402

# Older trees have no _lora_bwd_dx_da_db_kernel: setting it there adds an attribute nothing reads.
KERNELS = ("_lora_shrink_kernel", "_lora_fwd_kernel", "_lora_bwd_dy_kernel", "_lora_bwd_dx_kernel",
           "_lora_bwd_da_kernel", "_lora_bwd_dx_da_db_kernel")


class _BareFunction(torch.autograd.Function):
    """Saves and allocates what the fused op does, computes nothing: the floor of any Python autograd op."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        s = torch.empty(x.shape[0], lora_A.shape[0])
        ctx.save_for_backward(x, weight, lora_A, lora_B, s)
        return torch.empty(x.shape[0], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, _ = ctx.saved_tensors
        return torch.empty_like(x), None, None, torch.empty_like(lora_A), torch.empty_like(lora_B), None, None, None, None


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(rounds: int = 80, calls: int = 50) -> None:
    for name in KERNELS:
        setattr(launchers, name, _NoLaunch())
    torch.set_num_threads(1)
    M, K, N, r = 4, 32, 32, 4
    x = torch.randn(M, K, requires_grad=True)
    W = torch.randn(N, K)
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    dy = torch.randn(M, N)
    base = torch.nn.Linear(K, N, bias=False).requires_grad_(False)
    lora_A, lora_B = torch.nn.Linear(K, r, bias=False), torch.nn.Linear(r, N, bias=False)
    drop = torch.nn.Dropout(0.1)
    cases = {
        ("fused", 0.0): lambda: fused_lora.lora_linear(x, W, None, A, B, 2.0).backward(dy),
        ("eager", 0.0): lambda: (base(x) + lora_B(lora_A(x)) * 2.0).backward(dy),
        ("fused", 0.1): lambda: fused_lora.lora_linear(x, W, None, A, B, 2.0, dropout_p=0.1,
                                                        training=True).backward(dy),
        ("eager", 0.1): lambda: (base(x) + lora_B(lora_A(drop(x))) * 2.0).backward(dy),
        ("bare", 0.0): lambda: _BareFunction.apply(x, W, None, A, B, 2.0, 0.0, None, "").backward(dy),
    }
    best = dict.fromkeys(cases, float("inf"))
    order = random.Random(0)
    for _ in range(rounds):
        items = list(cases.items())
        order.shuffle(items)
        for key, fn in items:
            start = time.thread_time()
            for _ in range(calls):
                fn()
            best[key] = min(best[key], (time.thread_time() - start) / calls * 1e6)
    print(f"fused_lora from {os.path.dirname(fused_lora.__file__)}")
    for p in (0.0, 0.1):
        fused, eager = best[("fused", p)], best[("eager", p)]
        print(f"dropout {p}: fused {fused:.1f} us, eager {eager:.1f} us, fused/eager {fused / eager:.2f}")
    bare = best[("bare", 0.0)]
    print(f"a bare autograd.Function saving and allocating the same tensors: {bare:.1f} us "
          f"({bare / best[('eager', 0.0)]:.2f}x eager)")


if __name__ == "__main__":
    main()
