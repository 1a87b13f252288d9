"""The same numerics on a CUDA device with the compiled kernels: `pytest -m gpu` on a GPU runner.

Skipped at run time (never at import) when there is no CUDA device or the interpreter is on.
"""
import pytest
import torch

from cases import CASES, DTYPES, case_id
from numerics import compare_with_reference, lora_grads, make_inputs

pytestmark = pytest.mark.gpu
# The CPU cases, and this file's own: rank 1 on a 3-D x, and shapes too large for the interpreter on CPU.
GPU_CASES = CASES + [
    ((1,), 4096, 4096, 16, 0.0, True),
    ((4, 33), 48, 72, 1, 0.1, True),
    ((727,), 577, 859, 64, 0.1, True),
    ((2048,), 1024, 3072, 16, 0.1, False),
    ((16,), 4096, 1024, 64, 0.1, True),  # the forward's K split over programs: 32 tiles x 4 splits
    ((3,), 4096, 1024, 16, 0.0, False),  # 64 tiles x 2 splits
    ((256,), 14336, 1024, 64, 0.1, True),  # the shrink's 28 K splits summed by the forward GEMM
    # 16-bit: the shrink's shares made in the forward launch, the dS / dB jobs in the dX launch (64 row blocks of 128)
    ((8192,), 4096, 4096, 16, 0.1, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_matches_reference_on_gpu(cuda, case, dtype):
    lead, K, N, r, p, bias = case
    inputs = make_inputs(lead, K, N, r, dtype, bias=bias, device=cuda)
    compare_with_reference(inputs, scaling=1.7, dropout_p=p, seed=2024, grad_weight=True)


def test_deterministic_grads_on_gpu(cuda):
    inputs = make_inputs((4096,), 1024, 1024, 16, torch.bfloat16, device=cuda)
    first, second = lora_grads(inputs, deterministic=True), lora_grads(inputs, deterministic=True)
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


def test_split_k_forward_is_repeatable_on_gpu(cuda):
    """The K split's shares are summed in split order by whichever program arrives last: the same bits every run."""
    from fused_lora.kernels import launchers, plans
    x, w, b, a, bb = make_inputs((16,), 4096, 1024, 64, torch.bfloat16, device=cuda)
    launch = plans.find_launch(plans.plan_lora_fwd(16, 1024, 4096, 64, torch.bfloat16, dropout=False, bias=True),
                               "_lora_fwd_kernel")
    assert len(launch.grid) == 2
    first = launchers.lora_fwd(x, w, b, a, bb, 0.5)
    for _ in range(20):
        again = launchers.lora_fwd(x, w, b, a, bb, 0.5)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_shrink_shares_summed_by_the_forward_are_repeatable_on_gpu(cuda):
    """The forward GEMM sums the shrink launch's 28 K splits in split order: the same bits every run."""
    from fused_lora.kernels import launchers, plans
    x, w, b, a, bb = make_inputs((256,), 14336, 1024, 64, torch.bfloat16, device=cuda)
    plan = plans.plan_lora_fwd(256, 1024, 14336, 64, torch.bfloat16, dropout=False, bias=True, fuse_shrink=False)
    assert plans.find_launch(plan, "_lora_fwd_kernel").constexprs["S_FROM_PARTS"]
    first = launchers.lora_fwd(x, w, b, a, bb, 0.5, fuse_shrink=False)
    for _ in range(20):
        again = launchers.lora_fwd(x, w, b, a, bb, 0.5, fuse_shrink=False)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("M", [130, 8192])
@pytest.mark.parametrize("r", [16, 64])
def test_producer_jobs_in_the_launch_on_gpu(cuda, guarded_workspaces, M, r):
    """The shrink's shares made in the forward launch and the dS, dB and dA jobs in the dX launch, whose tiles and dA
    jobs wait for dS (spin on a counter): within torch's error (forced, whichever plan the model picks; 8192 tokens
    take the 128-row tiles, two dS jobs per row block), the forward the same bits in 20 runs, every counter back at
    zero after each and nothing written past the workspaces."""
    from fused_lora import reference
    from fused_lora.kernels import launchers
    from numerics import assert_within_torch_error

    dtype = torch.bfloat16
    x, w, b, a, bb = make_inputs((M,), 4096, 1024, r, dtype, device=cuda)
    g = torch.Generator(device=cuda).manual_seed(3)
    dy = torch.randn(M, 1024, device=cuda, generator=g).to(dtype)
    y, s = launchers.lora_fwd(x, w, b, a, bb, 0.5, dropout_p=0.1, seed=7, shrink_in_launch=True)
    low, ref = (reference.lora_fwd(x, w, b, a, bb, 0.5, dropout_p=0.1, seed=7, upcast=u) for u in (False, True))
    assert_within_torch_error("y", y, low[0], ref[0], dtype)
    dx, da, db = launchers.lora_bwd_in_launch(dy, x, w, a, bb, s, 0.5, dropout_p=0.1, seed=7)
    refs = []  # at dtype (dS rounded to it, as the kernels store it), then in fp64
    for upcast in (False, True):
        ds, db_ref = reference.lora_bwd_dy(dy, bb, s, 0.5, upcast=upcast)
        ds = ds if upcast else ds.to(dtype)
        refs.append((reference.lora_bwd_dx(dy, w, ds, a, dropout_p=0.1, seed=7, upcast=upcast),
                     reference.lora_bwd_da(ds, x, dropout_p=0.1, seed=7, upcast=upcast), db_ref))
    for name, got, lo, rf in zip(("dX", "dA", "dB"), (dx, da, db), *refs):
        assert_within_torch_error(name, got, lo, rf, dtype)
    for _ in range(20):
        again = launchers.lora_fwd(x, w, b, a, bb, 0.5, dropout_p=0.1, seed=7, shrink_in_launch=True)
        assert torch.equal(again[0], y) and torch.equal(again[1], s)
        launchers.lora_bwd_in_launch(dy, x, w, a, bb, s, 0.5, dropout_p=0.1, seed=7)
        torch.cuda.synchronize()
        for workspace in launchers._workspaces.values():
            assert not workspace.counters.any() and not workspace.accumulator.any()


def test_dropout_mask_is_redrawn_on_each_cuda_graph_replay(cuda):
    """The seed is drawn on the device inside the captured region and the kernels load it: each replay
    draws a new mask (a host int seed would freeze one mask into the graph)."""
    import fused_lora

    x, w, b, a, bb = make_inputs((64,), 256, 128, 16, torch.bfloat16, device=cuda)
    step = lambda: fused_lora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=True)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


def test_a_graph_captured_after_eager_calls_keeps_its_own_workspace(cuda):
    """A graph captured on a stream whose eager calls cached a workspace (launchers._workspace) gets its own: a later
    eager call that grows the stream's workspace frees the old one, and other tensors take that memory. The forward
    with its shrink's shares made in the launch (a ticket counter and a counter per row block) replays the eager
    call's bits."""
    from fused_lora.kernels import launchers

    dtype = torch.bfloat16
    x, w, b, a, bb = make_inputs((130,), 4096, 1024, 16, dtype, device=cuda)
    big = make_inputs((8192,), 4096, 1024, 16, dtype, device=cuda)  # 65 counters against 130 tokens' 4
    fwd = lambda: launchers.lora_fwd(x, w, b, a, bb, 0.5, shrink_in_launch=True)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = fwd()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fwd()
    with torch.cuda.stream(stream):
        launchers.lora_fwd(*big, 0.5, shrink_in_launch=True)
        taken = [torch.full((4,), 7, device=cuda, dtype=torch.int32) for _ in range(256)]
    stream.synchronize()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    assert all(t.eq(7).all() for t in taken)


def test_tensors_on_a_device_that_is_not_current(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    inputs = make_inputs((33,), 77, 53, 8, torch.bfloat16, device=torch.device("cuda", 1))
    with torch.cuda.device(0):
        compare_with_reference(inputs, scaling=1.7, dropout_p=0.1, seed=5)
