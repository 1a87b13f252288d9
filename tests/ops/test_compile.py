"""torch.library registration: opcheck of both ops, and torch.compile(fullgraph=True) of LoRA models on CPU.

The test run sets TRITON_INTERPRET=1, so backend "triton" runs the real kernels in the interpreter.
"""
import pytest
import torch
from torch import nn

import fused_lora
from fused_lora.functional import interpreting
from numerics import assert_module_within_torch_error, assert_results_within_torch_error, make_inputs, run, \
    skip_unless_backend_runs, torch_and_fp64

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no guards or automatic-dynamic marks carried over from another test
    yield
    torch._dynamo.reset()


fwd_op = torch.ops.fused_lora.lora_linear_fwd.default
bwd_op = torch.ops.fused_lora.lora_linear_bwd.default
BACKENDS = ["torch", "triton", "cpp"]


def _op_args(monkeypatch, backend, *, bias, dropout_p, M=5, K=12, N=7, r=3, dtype=torch.float32):
    """The ops' arguments; ``backend`` is what the CPU kernel of the ops runs (FUSED_LORA_BACKEND)."""
    skip_unless_backend_runs(backend)
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend)
    x, w, b, a, bb = make_inputs((M,), K, N, r, dtype, bias=bias)
    for t in (x, a, bb):
        t.requires_grad_(True)
    return (x, w, b, a, bb, 0.75, dropout_p, torch.tensor(11))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck_fwd(backend, bias, dropout_p, monkeypatch):
    assert interpreting() or backend != "triton"
    torch.library.opcheck(fwd_op, _op_args(monkeypatch, backend, bias=bias, dropout_p=dropout_p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, False)])
def test_opcheck_bwd(backend, needs, monkeypatch):
    x, w, b, a, bb, scaling, p, seed = _op_args(monkeypatch, backend, bias=True, dropout_p=0.25)
    with torch.no_grad():
        _, s = fwd_op(x, w, b, a, bb, scaling, p, seed)
    dy = torch.randn(x.shape[0], w.shape[0])
    torch.library.opcheck(bwd_op, (dy, x.detach(), w, a.detach(), bb.detach(), s, scaling, p, seed, *needs))


def test_ops_agree_with_the_eager_function(monkeypatch):
    """The compiled path (the ops) and the eager path (the autograd.Function) give the same numbers."""
    x, w, b, a, bb, scaling, p, seed = _op_args(monkeypatch, "triton", bias=True, dropout_p=0.25)
    y_op, _ = fwd_op(x, w, b, a, bb, scaling, p, seed)
    y_op.sum().backward()
    grads_op = [t.grad.clone() for t in (x, a, bb)]
    for t in (x, a, bb):
        t.grad = None
    y = fused_lora.lora_linear(x, w, b, a, bb, scaling, dropout_p=p, training=True, seed=int(seed))
    y.sum().backward()
    # Exact: the autograd.Function calls the same kernels with the same arguments as the ops.
    assert torch.equal(y, y_op)
    for g_op, t in zip(grads_op, (x, a, bb)):
        assert torch.equal(g_op, t.grad)


def test_fake_shapes_on_meta():
    x, w, b, a, bb = (t.to("meta") for t in make_inputs((4, 9), 16, 10, 5, torch.bfloat16))
    y = fused_lora.lora_linear(x, w, b, a, bb, 2.0)
    assert y.shape == (4, 9, 10) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    y2, s = fwd_op(x.reshape(-1, 16), w, b, a, bb, 2.0, 0.0, torch.tensor(0))
    assert s.shape == (36, 5) and y2.shape == (36, 10)


class _TwoLayer(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        torch.manual_seed(0)
        self.up = fused_lora.LoRALinear(24, 40, r=4, lora_alpha=8, lora_dropout=dropout)
        self.down = fused_lora.LoRALinear(40, 16, bias=False, r=7, lora_alpha=7, use_rslora=True,
                                          lora_dropout=dropout)
        for layer in (self.up, self.down):
            nn.init.normal_(layer.lora_B)  # nonzero B: the LoRA term shows in y and in every grad

    def forward(self, x, seed=None):
        h = torch.nn.functional.gelu(self.up(x, seed=seed))
        return self.down(h, seed=None if seed is None else seed + 1)


class _CountingBackend:
    """A torch.compile backend that records the graphs and runs them as aot_eager does."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        def record(fx_module, _inputs):
            self.graphs.append(fx_module)
            return make_boxed_func(fx_module.forward)
        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)


def _ops_in(graph_module, name):
    return sum(1 for node in graph_module.graph.nodes
               if node.op == "call_function" and name in str(node.target))


@pytest.mark.parametrize("backend_env", ["triton", "torch", "cpp"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compile_fullgraph_matches_eager(backend_env, dropout, monkeypatch):
    skip_unless_backend_runs(backend_env)
    monkeypatch.setenv("FUSED_LORA_BACKEND", backend_env)
    model = _TwoLayer(dropout).train()
    x = torch.randn(3, 5, 24, requires_grad=True)
    counting = _CountingBackend()
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    call = lambda m, x: m(x, seed=5)
    # The grads of y^2 for x and each LoRA parameter, eager and compiled, against the fp64 model; the baseline
    # runs the LoRA layers in fused_lora.reference at fp32. Same seeds: the same dropout masks in every run.
    eager = run(model, (x,), call=call, grads=True)
    comp = run(compiled, (x,), call=call, params=model, grads=True)
    low, ref = torch_and_fp64(model, (x,), call=call, grads=True)
    assert len(ref) == 1 + 5  # y; x, up.lora_A, up.lora_B, down.lora_A, down.lora_B
    assert_results_within_torch_error(eager, low, ref, "eager ")
    assert_results_within_torch_error(comp, low, ref, "compiled ")
    dynamo_graph, forward_graph, backward_graph = counting.graphs
    assert _ops_in(forward_graph, "lora_linear_fwd") == 2
    assert _ops_in(backward_graph, "lora_linear_bwd") == 2
    assert _ops_in(forward_graph, "mm") == 0, "the LoRA layers were traced into, not kept as one op"


def test_compile_draws_a_seed_inside_the_graph():
    """Training with dropout and no seed: the seed is drawn in the graph, not by a graph-breaking .item()."""
    model = _TwoLayer(0.5).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 24)
    y1, y2 = compiled(x), compiled(x)
    assert not torch.equal(y1, y2), "two calls drew the same dropout mask"
    model.eval()
    assert_module_within_torch_error(torch.compile(model, backend="aot_eager", fullgraph=True), model, (x,))


def test_compile_dynamic_token_count():
    model = _TwoLayer(0.0).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (1, 7, 33):
        assert_module_within_torch_error(compiled, model, (torch.randn(tokens, 24),), label=f"{tokens} tokens: ")


def test_compile_with_inductor_cpu(monkeypatch):
    """Inductor (the default backend) on CPU: the ops stay opaque extern calls, outputs match eager."""
    monkeypatch.setenv("FUSED_LORA_BACKEND", "torch")
    model = _TwoLayer(0.0).eval()
    x = torch.randn(9, 24)
    compiled = torch.compile(model, fullgraph=True)
    assert_module_within_torch_error(compiled, model, (x,))
    assert_module_within_torch_error(model, model, (x,), label="eager ")


def test_compile_injected_llama_fullgraph():
    """An injected transformers model under torch.compile(fullgraph=True)."""
    from peft_parity import tiny_llama
    model = fused_lora.inject(tiny_llama(), "all-linear", r=4, lora_alpha=8).eval()
    for module in model.modules():
        if isinstance(module, fused_lora.LoRALinear):
            nn.init.normal_(module.lora_B, std=0.02)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    counting = _CountingBackend()
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    call = lambda m, ids: m(input_ids=ids).logits
    comp = run(compiled, (ids,), call=call, params=model, grads=True)
    eager = run(model, (ids,), call=call, grads=True)
    low, ref = torch_and_fp64(model, (ids,), call=call, grads=True)
    assert len(ref) == 1 + 2 * 14  # logits; lora_A and lora_B of the 14 linear layers; lm_head excluded
    assert_results_within_torch_error(comp, low, ref, "compiled ")
    assert_results_within_torch_error(eager, low, ref, "eager ")
    _, forward_graph, backward_graph = counting.graphs
    assert _ops_in(forward_graph, "lora_linear_fwd") == 14
    assert _ops_in(backward_graph, "lora_linear_bwd") == 14


@pytest.mark.parametrize("op", ["fused_lora::lora_linear_fwd", "fused_lora::lora_linear_bwd"])
def test_ops_have_a_kernel_per_device(op):
    """The dispatcher's device keys (where a C++ CPU kernel or a sharding rule plugs in), not a backend string:
    CUDA's own kernel, and the default every other device (CPU until the C++ kernels load) falls back to."""
    from fused_lora.ops import linear as _op

    for key in ("CUDA", "CompositeExplicitAutograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    assert set(_op.DEVICE_KERNELS) == {"cpu", "cuda"}
    schema = str(getattr(torch.ops.fused_lora, op.split("::")[1]).default._schema)
    assert "backend" not in schema, schema
