"""Each kernel launcher on its own: interpreted at a tiny size on CPU, the headline point on a GPU."""
import pytest
import torch

from fused_lora.benchmarks.sweep import HEADLINE

TINY = dict(M=32, K=32, N=32, r=8, dtype=torch.float32, device="cpu")
REAL = dict(M=HEADLINE["tokens"], K=HEADLINE["shape"][0], N=HEADLINE["shape"][1], r=HEADLINE["r"],
            dtype=torch.bfloat16)
LAUNCHERS = ["lora_shrink", "lora_fwd", "lora_bwd_dy", "lora_bwd_dx", "lora_bwd_da"]


def _case(name, M, K, N, r, dtype, device):
    from fused_lora.kernels import launchers

    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)  # noqa: E731
    x, w, a, b, dy, s = rand(M, K), rand(N, K) / K**0.5, rand(r, K) / K**0.5, rand(N, r), rand(M, N), rand(M, r)
    return {
        "lora_shrink": lambda: launchers.lora_shrink(x, a, dropout_p=0.1, seed=1),
        "lora_fwd": lambda: launchers.lora_fwd(x, w, None, a, b, 2.0, dropout_p=0.1, seed=1),
        "lora_bwd_dy": lambda: launchers.lora_bwd_dy(dy, b, s, 2.0),
        "lora_bwd_dx": lambda: launchers.lora_bwd_dx(dy, w, s, a, dropout_p=0.1, seed=1),
        "lora_bwd_da": lambda: launchers.lora_bwd_da(s, x, dropout_p=0.1, seed=1),
    }[name]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_interpreted(benchmark, name):
    from fused_lora.functional import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it unless -m gpu)")
    benchmark.pedantic(_case(name, **TINY), rounds=2, iterations=1, warmup_rounds=1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_gpu(benchmark, cuda, name):
    fn = _case(name, **REAL, device=cuda)

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=5)
