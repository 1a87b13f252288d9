"""The DoRA ops: opcheck of fused_lora::dora_weight_norm / dora_linear_fwd / _bwd, and torch.compile(fullgraph=True)
of fused_lora.dora_linear (forward and every grad) against eager and the fp64 reference."""
import pytest
import torch

import fused_lora
from fused_lora.functional import interpreting
from numerics import assert_within_torch_error, make_inputs

norm_op = torch.ops.fused_lora.dora_weight_norm.default
fwd_op = torch.ops.fused_lora.dora_linear_fwd.default
bwd_op = torch.ops.fused_lora.dora_linear_bwd.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _args(monkeypatch, backend, *, bias=True, dropout_p=0.0, M=5, K=12, N=7, r=3):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    x, w, b, a, bb = make_inputs((M,), K, N, r, torch.float32, bias=bias)
    m = torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.5
    m[1] = 0.0
    n = norm_op(w, a, bb, 0.75)
    for t in (x, a, bb, m):
        t.requires_grad_(True)
    return x, w, b, a, bb, m, n, 0.75, dropout_p, torch.tensor(11)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck(backend, bias, dropout_p, monkeypatch):
    assert interpreting() or backend != "triton"
    args = _args(monkeypatch, backend, bias=bias, dropout_p=dropout_p)
    x, w, b, a, bb, m, n, scaling, p, seed = args
    torch.library.opcheck(norm_op, (w, a.detach(), bb.detach(), scaling))
    torch.library.opcheck(fwd_op, args)
    with torch.no_grad():
        y, s, z = fwd_op(*args)
    dy = torch.randn(x.shape[0], w.shape[0])
    saved = z if p > 0 else y
    for needs in [(True, True, True, True), (False, True, False, True), (True, False, False, False)]:
        torch.library.opcheck(bwd_op, (dy, x.detach(), w, b, a.detach(), bb.detach(), m.detach(), n, s, saved,
                                       scaling, p, seed, *needs))


def _grads(fn, inputs, m, dy):
    x, w, b, a, bb = (t.detach().clone() for t in inputs)
    m = m.detach().clone()
    leaves = (x, a, bb, m)
    for t in leaves:
        t.requires_grad_(True)
    y = fn(x, w, b, a, bb, m)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compile_fullgraph_matches_eager(backend, dropout, monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    inputs = make_inputs((3, 5), 24, 20, 4, torch.float32)
    m = torch.rand(20, generator=torch.Generator().manual_seed(2)) + 0.5
    dy = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(3))

    def layer(x, w, b, a, bb, m):
        return fused_lora.dora_linear(x, w, b, a, bb, 1.5, m, dropout_p=dropout, training=True, seed=5)

    graphs = []

    def counting(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        def record(fx_module, _inputs):
            graphs.append(fx_module)
            return make_boxed_func(fx_module.forward)
        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    compiled = torch.compile(layer, backend=counting, fullgraph=True)
    got = _grads(compiled, inputs, m, dy)
    eager = _grads(layer, inputs, m, dy)
    low = _grads(lambda *t: fused_lora.reference.dora_linear(*t[:5], 1.5, t[5], dropout_p=dropout, training=True,
                                                             seed=5), inputs, m, dy)
    ref = _grads(lambda *t: fused_lora.reference.dora_linear(*t[:5], 1.5, t[5], dropout_p=dropout, training=True,
                                                             seed=5), [t.double() for t in inputs], m.double(),
                 dy.double())
    for name, c, e, lo, rf in zip(("y", "dx", "dA", "dB", "dm"), got, eager, low, ref):
        assert_within_torch_error(f"compiled {name}", c, lo, rf, torch.float32)
        assert_within_torch_error(f"eager {name}", e, lo, rf, torch.float32)
    forward_graph, backward_graph = graphs
    count = lambda g, name: sum(1 for node in g.graph.nodes if node.op == "call_function" and name in str(node.target))
    assert count(forward_graph, "dora_weight_norm") == 1 and count(forward_graph, "dora_linear_fwd") == 1
    assert count(backward_graph, "dora_linear_bwd") == 1
    assert count(forward_graph, "mm") == 0, "the DoRA layer was traced into, not kept as one op"


def test_ops_have_a_cuda_kernel():
    for op in ("fused_lora::dora_weight_norm", "fused_lora::dora_linear_fwd", "fused_lora::dora_linear_bwd"):
        for key in ("CUDA", "CompositeExplicitAutograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
