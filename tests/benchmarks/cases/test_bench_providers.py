"""Each provider, forward and forward+backward: tiny on CPU, the headline point on a GPU."""
import pytest
import torch

from fused_lora.benchmarks.providers import BUILDERS, Params, available, make_input, torch_backend_for_cpu
from fused_lora.benchmarks.sweep import PROVIDERS, Point

CPU_POINT = Point(128, 128, 64, 8, 0.0, "float32")
GPU_POINT = Point(4096, 4096, 8192, 16, 0.0, "bfloat16")  # the headline point (sweep.HEADLINE)


def _run(benchmark, provider, direction, point, device, rounds):
    ok, why = available(provider)
    if not ok:
        pytest.skip(why)
    layer = BUILDERS[provider](Params.make(point, device))
    x, dy = make_input(point, device)
    grads = layer.trainable + [x]

    def clear():
        for t in grads:
            t.grad = None

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def fwd():  # synchronised: without it a GPU round times the launches, not the kernels
        layer.forward(x)
        sync()

    def fwd_bwd():
        layer.forward(x).backward(dy)
        sync()

    fn = fwd if direction == "fwd" else fwd_bwd
    benchmark.extra_info.update(point.as_dict(), provider=provider, direction=direction)
    benchmark.pedantic(fn, setup=clear, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_cpu(benchmark, provider, direction):
    with torch_backend_for_cpu():
        _run(benchmark, provider, direction, CPU_POINT, "cpu", rounds=5)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_gpu(benchmark, cuda, provider, direction):
    _run(benchmark, provider, direction, GPU_POINT, cuda, rounds=50)
