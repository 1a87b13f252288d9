"""Each kernel launcher against its formula in fused_lora.reference: plain torch at the same dtype and fp64."""
import pytest
import torch
import triton
import triton.language as tl

from fused_lora import reference
from fused_lora.kernels import configs, cost, launchers, plans
from fused_lora.kernels._common import _producers_first_job
from numerics import assert_within_torch_error, make_inputs

# Every workspace a launcher makes is checked for writes past its end (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("guarded_workspaces")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANKS = [1, 7, 16, 64, 256]
SEED = 31


def _refs(formula, *args, **kwargs):
    """formula(*args) at the inputs' dtype (plain torch) and in fp64 (upcast)."""
    return formula(*args, **kwargs), formula(*args, **kwargs, upcast=True)


def _check(name, got, low, ref, dtype):
    """low's error against ref bounds the kernel's; got is compared at dtype (dB / dA come in fp32 when
    reduced over several row blocks)."""
    assert_within_torch_error(name, got.to(dtype), low, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink(dtype, r, p):
    x, _, _, a, _ = make_inputs((70,), 83, 8, r, dtype)
    s = launchers.lora_shrink(x, a, dropout_p=p, seed=SEED)
    _check("S", s, *_refs(reference.lora_shrink, x, a, dropout_p=p, seed=SEED), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,r,fuse", [(3, 7, True), (3, 7, False), (50, 64, True), (127, 1, False),
                                      (127, 256, False)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fwd(dtype, M, r, fuse, p):
    x, w, b, a, bb = make_inputs((M,), 70, 45, r, dtype)
    y, s = launchers.lora_fwd(x, w, b, a, bb, 0.9, dropout_p=p, seed=SEED, fuse_shrink=fuse)
    (y_low, s_low), (y_ref, s_ref) = _refs(reference.lora_fwd, x, w, b, a, bb, 0.9, dropout_p=p, seed=SEED)
    _check("S", s, s_low, s_ref, dtype)
    _check("y", y, y_low, y_ref, dtype)
    # y from the kernel's own S: the expand and base GEMM alone against torch on that S.
    (y_low, _), (y_ref, _) = _refs(reference.lora_fwd, x, w, b, a, bb, 0.9, s=s)
    _check("y given S", y, y_low, y_ref, dtype)


def _fwd_launch(M, N, K, r, dtype, p=0.0, fuse=None):
    return plans.find_launch(plans.plan_lora_fwd(M, N, K, r, dtype, dropout=p > 0, bias=True, fuse_shrink=fuse),
                             "_lora_fwd_kernel")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# N = 45 and 16 / 32-column tiles: 2-3 tiles, so K = 401 (4 K tiles of 128, 13 of 32 in fp32) is split 4 ways (7 in
# fp32, the last split shorter); r = 33 pads to 64; the shrink fused or not.
@pytest.mark.parametrize("M,r,fuse", [(16, 1, True), (16, 7, False), (3, 33, True), (64, 64, False), (5, 16, True)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fwd_split_k(dtype, M, r, fuse, p):
    """Few tokens on few tiles: the forward's K split over programs, their fp32 shares summed in split order by the
    last to arrive at each tile; the same bits on a second run, and the counters back at zero."""
    N, K = 45, 401
    launch = _fwd_launch(M, N, K, r, dtype, p, fuse)
    assert len(launch.grid) == 2 and launch.constexprs["SPLIT_K_PARTIALS"] and launch.constexprs["FUSE_SHRINK"] == fuse
    _check_fwd_twice(M, N, K, r, dtype, p, fuse)


def _check_fwd_twice(M, N, K, r, dtype, p, fuse, given_s=False, in_launch=None):
    """lora_fwd's S and y against torch and fp64 (``given_s``: y also from the kernel's own S), the same bits on a
    second run, and the workspace counters back at zero."""
    x, w, b, a, bb = make_inputs((M,), K, N, r, dtype)
    y, s = launchers.lora_fwd(x, w, b, a, bb, 0.9, dropout_p=p, seed=SEED, fuse_shrink=fuse,
                              shrink_in_launch=in_launch)
    (y_low, s_low), (y_ref, s_ref) = _refs(reference.lora_fwd, x, w, b, a, bb, 0.9, dropout_p=p, seed=SEED)
    _check("S", s, s_low, s_ref, dtype)
    _check("y", y, y_low, y_ref, dtype)
    if given_s:
        (y_low, _), (y_ref, _) = _refs(reference.lora_fwd, x, w, b, a, bb, 0.9, s=s)
        _check("y given S", y, y_low, y_ref, dtype)
    again = launchers.lora_fwd(x, w, b, a, bb, 0.9, dropout_p=p, seed=SEED, fuse_shrink=fuse,
                               shrink_in_launch=in_launch)
    assert torch.equal(again[0], y) and torch.equal(again[1], s)
    for workspace in launchers._workspaces.values():
        assert not workspace.counters.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r,p", [(64, 0.0), (33, 0.2), (64, 0.2)])
def test_fwd_fuses_rank_64_on_128_column_tiles(monkeypatch, request, dtype, r, p):
    """The 65-2048-token forward with the shrink fused at R = 64 on 128-column tiles (configs.mid_fwd_fused_config:
    64 x 128 x 32, 4 stages), forced here at 130 tokens (3 row blocks), N = 150 (a partial second column tile) and
    K = 100 (4 K tiles of 32, the last partial); r = 33 pads to 64: the same checks as test_fwd_split_k."""
    monkeypatch.setattr(configs, "mid_fwd_block_n", lambda M, N: 128)
    launchers._fwd_ready.cache_clear()
    request.addfinalizer(launchers._fwd_ready.cache_clear)  # no forced plan left for later tests
    M, N, K = 130, 150, 100
    launch = _fwd_launch(M, N, K, r, dtype, p, fuse=True)
    assert (launch.config.BLOCK_N, launch.config.BLOCK_K, launch.config.num_stages) == (128, 32, 4)
    assert launch.constexprs["FUSE_SHRINK"] and launch.constexprs["R"] == 64
    _check_fwd_twice(M, N, K, r, dtype, p, True, given_s=True)


def _check_inf_of_x_stays_in_its_row(M, N, K, r, col, fuse, in_launch=None):
    """x[1, col] = inf: NaN and inf in y and S exactly where the fp64 reference has them (bf16)."""
    x, w, b, a, bb = make_inputs((M,), K, N, r, torch.bfloat16)
    x[1, col] = float("inf")
    got = launchers.lora_fwd(x, w, b, a, bb, 0.9, fuse_shrink=fuse, shrink_in_launch=in_launch)
    ref = reference.lora_fwd(x, w, b, a, bb, 0.9, upcast=True)
    for name, g_, r_ in zip(("y", "S"), got, ref):
        assert torch.equal(g_.isnan(), r_.isnan()) and torch.equal(g_.isinf(), r_.isinf()), name


@pytest.mark.parametrize("fuse", [True, False])
def test_fwd_split_k_keeps_inf_of_x_in_its_row(fuse):
    """An inf of x makes its row of y inf / NaN as in the reference, through the split's partials and (fused) the
    padded rank columns of S, which stay 0."""
    M, N, K, r = 5, 45, 401, 5
    assert len(_fwd_launch(M, N, K, r, torch.bfloat16, fuse=fuse).grid) == 2
    _check_inf_of_x_stays_in_its_row(M, N, K, r, 300, fuse)


def test_fwd_splits_k_where_the_tiles_leave_the_gpu_idle():
    """1-64 tokens on fewer than FILL_PROGRAMS tiles: K split to reach them where the modeled time is the lower
    (4096 -> 1024, R = 64 fused at 32 columns: 32 tiles x 4 splits); enough tiles, or more tokens: no split."""
    from fused_lora.kernels import cost
    for M, N, r in ((16, 1024, 64), (1, 1024, 16), (16, 4096, 16), (256, 1024, 16), (16, 1024, 256)):
        alternatives = plans.fwd_alternatives(M, N, 4096, r, torch.bfloat16, dropout=False, bias=False)
        chosen = plans.plan_lora_fwd(M, N, 4096, r, torch.bfloat16, dropout=False, bias=False)
        assert cost.plan_seconds(chosen) == min(cost.plan_seconds(plan) for plan in alternatives)
    assert _fwd_launch(16, 1024, 4096, 64, torch.bfloat16).grid == (32, 4)
    assert _fwd_launch(1, 1024, 4096, 16, torch.bfloat16).grid == (64, 2)
    assert _fwd_launch(16, 4096, 4096, 16, torch.bfloat16).grid == (128,)
    assert len(_fwd_launch(256, 1024, 4096, 16, torch.bfloat16).grid) == 1
    assert "SPLIT_K_PARTIALS" not in _fwd_launch(256, 1024, 4096, 16, torch.bfloat16).constexprs


def _shrink_and_fwd(M, N, K, r, dtype, p=0.0, fuse=None):
    plan = plans.plan_lora_fwd(M, N, K, r, dtype, dropout=p > 0, bias=True, fuse_shrink=fuse)
    return plans.find_launch(plan, "_lora_shrink_kernel"), plans.find_launch(plan, "_lora_fwd_kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)  # fp32: the shrink sums (below)
# K = 1100: 18 K tiles of 64 (the last partial) give the shrink 6 splits of 3 tiles; r = 200 pads to 256; N = 45:
# one partial N tile.
@pytest.mark.parametrize("M,r,p", [(70, 33, 0.0), (70, 33, 0.2), (66, 1, 0.2), (130, 200, 0.0), (130, 200, 0.2)])
def test_fwd_sums_the_shrinks_k_splits(dtype, M, r, p):
    """The shrink launch leaves its K splits' fp32 shares, and the forward GEMM sums them in split order and stores
    S from its pid_n == 0 tiles: S and y within torch's error, the same bits on a second run, counters at zero."""
    N, K = 45, 1100
    shrink, fwd = _shrink_and_fwd(M, N, K, r, dtype, p, fuse=False)
    assert shrink.grid[1] > 1 and not shrink.constexprs["SUM_PARTS"] and fwd.constexprs["S_FROM_PARTS"]
    assert fwd.args["s_splits"] == shrink.grid[1]
    _check_fwd_twice(M, N, K, r, dtype, p, False, given_s=True)


def test_fwd_sums_the_shrinks_k_splits_on_many_token_tiles():
    """2049 tokens: the 128 x 128 tiles sum the shrink's shares (K = 1100: 4 splits); bf16 only, about
    15 s in the interpreter."""
    test_fwd_sums_the_shrinks_k_splits(torch.bfloat16, 2049, 16, 0.0)


def test_fwd_sums_the_shrinks_k_splits_keeping_inf_of_x_in_its_row():
    """An inf of x: NaN and inf in y and S exactly where the fp64 reference has them, through the shrink's shares
    and the padded rank columns the forward GEMM sums them over (r = 5 in R = 16). Column 1050 is in the last of the
    6 splits, in its partial K tile."""
    M, N, K, r = 70, 45, 1100, 5
    shrink, _ = _shrink_and_fwd(M, N, K, r, torch.bfloat16, fuse=False)
    assert shrink.grid[1] > 1 and not shrink.constexprs["SUM_PARTS"]
    _check_inf_of_x_stays_in_its_row(M, N, K, r, 1050, False)


def _in_launch_fwd(M, N, K, r, dtype, p=0.0):
    plan = plans.plan_lora_fwd(M, N, K, r, dtype, dropout=p > 0, bias=True, shrink_in_launch=True)
    assert [launch.kernel for launch in plan] == ["_lora_fwd_kernel"]
    return plan[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)  # fp32 keeps the shrink launch's sum
# K = 1100: 18 K tiles of 64 give 3 share jobs of 8 tiles per row block, the last of 2 tiles, partial (5 of 4, the last
# of 2); N = 45: one column tile (its tiles store S), N = 200: 7 of 32 columns, or 4 of 64 when wide (several tiles
# wait on one row block's shares). 600 tokens: 10 row blocks of 64, a first group of 8 and a last of 2 (the job
# order's irregular end); r = 100 pads to 128, the largest rank configs.fwd_shrink_in_launch allows. Each case forces
# a share size of configs.IN_LAUNCH_SHARE_TILES and a tile width of configs.fwd_in_launch_tiles.
@pytest.mark.parametrize("M,N,r,p,share_tiles,wide", [(66, 45, 1, 0.0, 8, False), (70, 200, 33, 0.2, 4, True),
                                                      (130, 45, 100, 0.0, 4, False), (600, 200, 7, 0.2, 8, True),
                                                      (70, 200, 33, 0.0, 8, False)])
def test_fwd_makes_the_shrinks_shares_in_its_launch(monkeypatch, request, dtype, M, N, r, p, share_tiles, wide):
    """SHRINK_IN_LAUNCH: share jobs inside the forward launch store S's K-split fp32 shares, the tiles wait for their
    row block's and sum them in split order: S and y within torch's error, the same bits on a second run, the
    counters (row blocks and tickets) back at zero."""
    K = 1100
    narrow = configs.fwd_in_launch_tiles
    monkeypatch.setattr(configs, "IN_LAUNCH_SHARE_TILES", (share_tiles,))
    monkeypatch.setattr(configs, "fwd_in_launch_tiles", lambda cfg: narrow(cfg)[-1:] if wide else narrow(cfg)[:1])
    launchers._fwd_ready.cache_clear()
    request.addfinalizer(launchers._fwd_ready.cache_clear)  # no forced plan left for later tests
    launch = _in_launch_fwd(M, N, K, r, dtype, p)
    shares = launch.args["s_splits"]
    tiles = -(-M // launch.config.BLOCK_M) * -(-N // launch.config.BLOCK_N)
    base = configs.fwd_choices(M, N, configs.padded_rank(r), dtype, False, p > 0)[0][0].BLOCK_N
    assert launch.config.BLOCK_N == (2 * base if wide else base)
    assert shares == -(-18 // share_tiles) and launch.grid == (tiles + -(-M // launch.config.BLOCK_M) * shares,)
    assert launch.constexprs["SHRINK_IN_LAUNCH"] and launch.constexprs["S_FROM_PARTS"]
    _check_fwd_twice(M, N, K, r, dtype, p, None, given_s=True, in_launch=True)


def test_fwd_makes_the_shrinks_shares_in_its_launch_keeping_inf_of_x_in_its_row():
    """An inf of x at column 1050 (the last share job's partial K tile): NaN and inf in y and S exactly where the
    fp64 reference has them."""
    _check_inf_of_x_stays_in_its_row(70, 200, 1100, 5, 1050, None, in_launch=True)


@pytest.mark.parametrize("num_pid_m,num_pid_n,parts,group_m", [(1, 1, 1, 8), (3, 2, 3, 8), (8, 5, 2, 8), (9, 4, 3, 8),
                                                               (20, 3, 4, 8), (17, 1, 28, 8), (7, 3, 2, 1)])
def test_producers_first_order_puts_a_tiles_parts_before_it(num_pid_m, num_pid_n, parts, group_m):
    """The in-launch forward's job order (plans.producers_first_order): every part and tile once, every part of a
    tile's row block at a lower ticket, and the parts one group of row blocks ahead of the tiles."""
    order = plans.producers_first_order(num_pid_m, num_pid_n, parts, group_m)
    assert sorted(i for kind, i in order if kind == "part") == list(range(num_pid_m * parts))
    assert sorted(i for kind, i in order if kind == "tile") == list(range(num_pid_m * num_pid_n))
    last_part = {}
    for ticket, (kind, i) in enumerate(order):
        if kind == "part":
            last_part[i // parts] = ticket
    for ticket, (kind, i) in enumerate(order):
        if kind == "tile":
            group = i // (group_m * num_pid_n)
            rows = range(group * group_m, min(num_pid_m, (group + 1) * group_m))
            assert all(last_part[m] < ticket for m in rows)
            assert all(last_part[m] < ticket for m in range((group + 2) * group_m) if m < num_pid_m)


@triton.jit
def _job_of_ticket(out_ptr, num_pid_m, num_pid_n, parts, GROUP_M: tl.constexpr):
    """(is_part, index) of ticket program_id(0), at out_ptr[ticket]."""
    ticket = tl.program_id(0).to(tl.int64)
    is_part, index = _producers_first_job(ticket, num_pid_m, num_pid_n, parts, GROUP_M)
    tl.store(out_ptr + 2 * ticket, is_part.to(tl.int64))
    tl.store(out_ptr + 2 * ticket + 1, index)


def test_producers_first_job_is_the_plans_order():
    """_common._producers_first_job, run for every ticket in the interpreter, gives plans.producers_first_order."""
    for num_pid_m, num_pid_n, parts, group_m in ((1, 1, 1, 8), (3, 2, 3, 8), (9, 4, 3, 8), (20, 3, 4, 8),
                                                 (17, 1, 28, 8), (16, 2, 1, 8), (7, 3, 2, 1)):
        order = plans.producers_first_order(num_pid_m, num_pid_n, parts, group_m)
        out = torch.full((len(order), 2), -1, dtype=torch.int64)
        _job_of_ticket[(len(order),)](out, num_pid_m, num_pid_n, parts, GROUP_M=group_m)
        assert [("part" if p else "tile", i) for p, i in out.tolist()] == order, (num_pid_m, num_pid_n, parts)


def test_fwd_takes_the_shrink_into_its_launch_where_it_pays():
    """16-bit forwards above FEW_TOKENS weigh the shares made in the GEMM launch (one launch) against a shrink launch:
    at 8192 tokens (4096 -> 4096, r = 16: 64 row blocks of 128, 32 column tiles, 16 share jobs of 4 K tiles each
    or 8 of 8, configs.IN_LAUNCH_SHARE_TILES) one launch;
    fp32, DoRA and fuse_shrink=False keep the shrink launch; 1-64 tokens have no shares."""
    plan = plans.plan_lora_fwd(8192, 4096, 4096, 16, torch.bfloat16, dropout=False, bias=False)
    assert [launch.kernel for launch in plan] == ["_lora_fwd_kernel"]
    shares = plan[0].args["s_splits"]
    assert plan[0].grid == (64 * (32 + shares),) and plan[0].constexprs["SHRINK_IN_LAUNCH"]
    assert (shares, plan[0].args["k_per_split"]) in ((16, 256), (8, 512))
    assert plan[0].schedule.parts == shares and plan[0].schedule.tiles == 32
    for kwargs in (dict(dtype=torch.float32), dict(dora=True), dict(fuse_shrink=False)):
        launches = plans.plan_lora_fwd(8192, 4096, 4096, 16, **{"dtype": torch.bfloat16, "dropout": False,
                                                                "bias": False, **kwargs})
        assert launches[0].kernel == "_lora_shrink_kernel"
        assert not launches[-1].constexprs.get("SHRINK_IN_LAUNCH", False)
    for M, r, dora in ((16, 16, False), (8192, 256, False), (1024, 16, True)):  # few tokens, R = 256, DoRA
        with pytest.raises(ValueError, match="shrink cannot run in the forward launch"):
            plans.plan_lora_fwd(M, 4096, 4096, r, torch.bfloat16, dropout=False, bias=False, dora=dora,
                                shrink_in_launch=True)


def test_shrink_for_the_fwd_splits_k_without_a_lone_sum():
    """Where the forward GEMM sums the shrink's shares, the shrink splits K into parts of at least
    SHRINK_MIN_TILES_PER_PART tiles to fill the GPU (14336 -> 4096 at 256 tokens: 4 row blocks x 28 splits, where
    the last-to-arrive sum stopped at SHRINK_MAX_SPLITS = 8), and its launch has no lone tail; the standalone
    shrink keeps its own sum."""
    shrink, fwd = _shrink_and_fwd(256, 4096, 14336, 64, torch.bfloat16, fuse=False)
    assert shrink.grid == (4, 28) and shrink.tail_bytes == 0 and fwd.args["s_splits"] == 28
    assert [op.name for op in shrink.writes] == ["S_partials"] and "S" in [op.name for op in fwd.writes]
    alone = plans.find_launch(plans.plan_lora_shrink(256, 14336, 64, torch.bfloat16, dropout=False),
                              "_lora_shrink_kernel")
    assert alone.grid == (4, 8) and alone.constexprs["SUM_PARTS"] and alone.tail_bytes > 0
    # One split (8192 tokens fill the GPU with row blocks): S stored by the shrink, read by the GEMM.
    shrink, fwd = _shrink_and_fwd(8192, 4096, 4096, 16, torch.bfloat16, fuse=False)
    assert shrink.grid == (128, 1) and shrink.constexprs["SUM_PARTS"] and not fwd.constexprs["S_FROM_PARTS"]
    # fp32, and 1-64 tokens, keep the shrink's own sum (configs.fwd_sums_shrink_parts).
    for M, dtype in ((70, torch.float32), (16, torch.bfloat16)):
        shrink, fwd = _shrink_and_fwd(M, 45, 1100, 200, dtype)
        assert shrink.grid[1] > 1 and shrink.constexprs["SUM_PARTS"] and "S_FROM_PARTS" not in fwd.constexprs


def _fused(M, r, dtype=torch.bfloat16, N=4096, K=4096):
    launch = plans.find_launch(plans.plan_lora_fwd(M, N, K, r, dtype, dropout=False, bias=False), "_lora_fwd_kernel")
    return launch.constexprs["FUSE_SHRINK"]


def test_fwd_chooses_regime():
    assert _fused(1, 16) and _fused(1, 64) and not _fused(1, 128) and not _fused(1, 64, torch.float32)
    # 65-2048 tokens: fused or not by the lower modeled time (kernels/cost.py).
    # (1024 tokens, r = 16: the shrink's shares made in the GEMM launch model faster than the fused recompute.)
    assert _fused(configs.FEW_TOKENS + 1, 16) and not _fused(1024, 16) and not _fused(1024, 64)
    assert not _fused(2048, 16, N=14336)  # 112 N tiles would recompute S 112 times
    assert not _fused(configs.MID_TOKENS + 1, 16) and not _fused(configs.MID_TOKENS, 16, torch.float32)


def test_weighed_plans_take_the_lower_modeled_time():
    """Where the forward may fuse the shrink or not, and the backward be one launch or three, the plan is the
    alternative of the lower kernels/cost.py time (the formula the benchmark's roofline prints)."""
    from fused_lora.kernels import cost
    for M, N, r in ((256, 4096, 16), (1024, 4096, 64), (2048, 14336, 16), (256, 1024, 64), (130, 4096, 32)):
        fwd = [plans.plan_lora_fwd(M, N, 4096, r, torch.bfloat16, dropout=True, bias=True, fuse_shrink=f)
               for f in (False, True)]
        fwd += [plans.plan_lora_fwd(M, N, 4096, r, torch.bfloat16, dropout=True, bias=True, shrink_in_launch=True)]
        chosen = plans.plan_lora_fwd(M, N, 4096, r, torch.bfloat16, dropout=True, bias=True)
        if configs.padded_rank(r) <= configs.ONE_LAUNCH_BWD_MAX_RANK:
            assert cost.plan_seconds(chosen) == min(cost.plan_seconds(p) for p in fwd)
        bwd = [plans.plan_lora_bwd(M, N, 4096, r, torch.bfloat16, dropout=True, deterministic=False, num_sms=132,
                                   one_launch=o) for o in (False, True)]
        bwd += [plans.plan_lora_bwd_in_launch(M, N, 4096, r, torch.bfloat16, dropout=True, num_sms=132)]
        chosen = plans.plan_lora_bwd(M, N, 4096, r, torch.bfloat16, dropout=True, deterministic=False, num_sms=132)
        assert cost.plan_seconds(chosen) == min(cost.plan_seconds(p) for p in bwd)
        assert len(bwd[1]) == len(bwd[2]) == 1 and len(bwd[0]) == 3


def test_middle_token_tiles_fill_the_gpu():
    """65-2048 tokens: 128-column forward tiles, narrower (down to 32) while the grid has fewer than FILL_PROGRAMS
    programs (4096 -> 1024 at 256 tokens: 32 programs of 128 columns, 128 of 32); the one-launch backward's K
    slices likewise."""
    assert configs.mid_fwd_block_n(256, 4096) == 128
    assert configs.mid_fwd_block_n(256, 1024) == 32
    assert configs.mid_fwd_block_n(128, 4096) == 64
    assert configs.bwd_one_launch_config(256, 4096, 16, torch.bfloat16, deterministic=False).BLOCK_K == 128
    assert configs.bwd_one_launch_config(128, 4096, 16, torch.bfloat16, deterministic=False).BLOCK_K == 64
    assert configs.bwd_one_launch_config(65, 2048, 16, torch.bfloat16, deterministic=False).BLOCK_K == 32
    assert configs.bwd_one_launch_config(256, 4096, 16, torch.bfloat16, deterministic=True) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("deterministic", [False, True])
# Several row blocks (dB summed over them: atomics / partials) and one (stored directly); N = 1100 has more than
# more N tiles than one SM per row block needs, so N is split too (dS summed over the splits) at the interpreter's 2 SMs.
@pytest.mark.parametrize("M,N", [(133, 75), (20, 75), (133, 1100), (20, 1100)])
def test_bwd_dy(dtype, r, deterministic, M, N):
    _, _, _, _, bb = make_inputs((M,), 8, N, r, dtype)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(M, N, generator=g).to(dtype)
    s = torch.randn(M, r, generator=g).to(dtype)
    ds, db = launchers.lora_bwd_dy(dy, bb, s, 1.5, deterministic=deterministic)
    (ds_low, db_low), (ds_ref, db_ref) = _refs(reference.lora_bwd_dy, dy, bb, s, 1.5)
    _check("dS", ds, ds_low, ds_ref, dtype)
    _check("dB", db, db_low, db_ref, dtype)


def test_sums_finished_in_the_kernels_leave_their_workspace_at_zero():
    """The atomic accumulator and the arrival counters are zeroed once, when made, so every launch must leave them
    at zero: the next one adds into them. Mutating the re-zeroing (the last program's exchange with 0, or the counter
    reset) makes this fail."""
    g = torch.Generator().manual_seed(11)
    for deterministic in (False, True):
        for M, N, K, r in ((133, 1100, 70, 7), (300, 75, 200, 16), (20, 1100, 70, 3)):
            dy, s = torch.randn(M, N, generator=g), torch.randn(M, r, generator=g)
            x, _, _, _, bb = make_inputs((M,), K, N, r, torch.float32)
            ds, _ = launchers.lora_bwd_dy(dy, bb, s, 1.0, deterministic=deterministic)
            launchers.lora_bwd_da(ds, x, deterministic=deterministic)
            for workspace in launchers._workspaces.values():
                assert not workspace.counters.any() and not workspace.accumulator.any()
    assert launchers._workspaces, "no launch used a workspace"


def test_sums_finished_in_the_kernels_are_right_in_both_modes_and_repeatable_when_deterministic():
    """Atomics (default) and ordered partials (deterministic), with N split and several row blocks and M slices: both
    within the bound, and the deterministic ones the same bits on a second run."""
    M, N, K, r = 133, 1100, 200, 5
    x, _, _, _, bb = make_inputs((M,), K, N, r, torch.float32)
    g = torch.Generator().manual_seed(12)
    dy, s = torch.randn(M, N, generator=g), torch.randn(M, r, generator=g)
    (ds_low, db_low), (ds_ref, db_ref) = _refs(reference.lora_bwd_dy, dy, bb, s, 1.0)
    runs = []
    for deterministic in (False, True, True):
        ds, db = launchers.lora_bwd_dy(dy, bb, s, 1.0, deterministic=deterministic)
        da = launchers.lora_bwd_da(ds, x, deterministic=deterministic)
        _check("dS", ds, ds_low, ds_ref, torch.float32)
        _check("dB", db, db_low, db_ref, torch.float32)
        _check("dA", da, *_refs(reference.lora_bwd_da, ds, x), torch.float32)
        runs.append((ds, db, da))
    assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,r", [(3, 1), (127, 7), (127, 256), (200, 64)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bwd_dx(dtype, M, r, p):
    K, N = 91, 66
    _, w, _, a, _ = make_inputs((M,), K, N, r, dtype)
    g = torch.Generator().manual_seed(6)
    dy = torch.randn(M, N, generator=g).to(dtype)
    ds = torch.randn(M, r, generator=g).to(dtype)
    dx = launchers.lora_bwd_dx(dy, w, ds, a, dropout_p=p, seed=SEED)
    _check("dX", dx, *_refs(reference.lora_bwd_dx, dy, w, ds, a, dropout_p=p, seed=SEED), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,r", [(3, 7), (127, 16), (300, 256), (700, 1)])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_da(dtype, M, r, p, deterministic):
    K = 70
    x, _, _, _, _ = make_inputs((M,), K, 8, r, dtype)
    ds = torch.randn(M, r, generator=torch.Generator().manual_seed(8)).to(dtype)
    da = launchers.lora_bwd_da(ds, x, dropout_p=p, seed=SEED, deterministic=deterministic)
    _check("dA", da, *_refs(reference.lora_bwd_da, ds, x, dropout_p=p, seed=SEED), dtype)


def _bwd_refs(dy, x, w, a, bb, s, scaling, p, dtype):
    """(dX, dA, dB) of the three per-launcher formulas chained, at dtype (dS rounded to it, as the kernels store
    it) and in fp64."""
    out = []
    for upcast in (False, True):
        ds, db = reference.lora_bwd_dy(dy, bb, s, scaling, upcast=upcast)
        ds = ds if upcast else ds.to(dtype)
        out.append((reference.lora_bwd_dx(dy, w, ds, a, dropout_p=p, seed=SEED, upcast=upcast),
                    reference.lora_bwd_da(ds, x, dropout_p=p, seed=SEED, upcast=upcast), db))
    return out


# One row block: (1..64 tokens); several: 130 and 150 tokens, with more 64-column dA / dB tiles than K slices (K = 70:
# 3 slices of 32, N = 300: 5 dB tiles) and fewer (K = 200: 7 slices, 4 dA tiles).
ONE_LAUNCH_CASES = [(1, 1, 150, 91), (37, 7, 75, 200), (64, 33, 131, 70), (5, 64, 66, 129), (130, 7, 75, 200),
                    (150, 33, 300, 70), (129, 1, 70, 66), (100, 64, 90, 100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,r,N,K", ONE_LAUNCH_CASES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bwd_one_launch(dtype, M, r, N, K, p):
    """The one-launch backward against the chained dS / dB, dX and dA formulas: dA and dB in the inputs' dtype, dA /
    dB tiles dealt round-robin, and with several row blocks summed over them by the last to arrive."""
    x, w, _, a, bb = make_inputs((M,), K, N, r, dtype)
    g = torch.Generator().manual_seed(6)
    dy = torch.randn(M, N, generator=g).to(dtype)
    s = torch.randn(M, r, generator=g).to(dtype)
    if configs.bwd_one_launch_config(M, K, configs.padded_rank(r), dtype, deterministic=False) is None:
        assert dtype == torch.float32 and (r > 32 or M > configs.FEW_TOKENS)
        with pytest.raises(ValueError, match="no one-launch tiles"):
            launchers.lora_bwd_one_launch(dy, x, w, a, bb, s, 1.5)
        return
    dx, da, db = launchers.lora_bwd_one_launch(dy, x, w, a, bb, s, 1.5, dropout_p=p, seed=SEED)
    assert da.dtype == db.dtype == dtype
    for name, got, low, ref in zip(("dX", "dA", "dB"), (dx, da, db), *_bwd_refs(dy, x, w, a, bb, s, 1.5, p, dtype)):
        _check(name, got, low, ref, dtype)
    for workspace in launchers._workspaces.values():
        assert not workspace.counters.any() and not workspace.accumulator.any()


def test_bwd_one_launch_with_wide_k_slices(monkeypatch):
    """The 128- and 64-column K slices the one-launch backward takes at 65-2048 tokens on a real GPU (small sizes
    here, as if FILL_PROGRAMS were 1 and 10)."""
    M, N, K, r = 150, 70, 300, 5
    x, w, _, a, bb = make_inputs((M,), K, N, r, torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    dy, s = torch.randn(M, N, generator=g).to(torch.bfloat16), torch.randn(M, r, generator=g).to(torch.bfloat16)
    refs = _bwd_refs(dy, x, w, a, bb, s, 1.5, 0.2, torch.bfloat16)
    for fill, block_k in ((1, 128), (10, 64)):
        monkeypatch.setattr(configs, "FILL_PROGRAMS", fill)
        launchers._one_launch_ready.cache_clear()
        ready = launchers._one_launch_ready(M, N, K, r, torch.bfloat16, True, False, "tf32", 132, one_launch=True)
        assert ready.launch.config.BLOCK_K == block_k
        got = launchers.lora_bwd_one_launch(dy, x, w, a, bb, s, 1.5, dropout_p=0.2, seed=SEED)
        for name, got_, low, ref in zip(("dX", "dA", "dB"), got, *refs):
            _check(name, got_, low, ref, torch.bfloat16)
    launchers._one_launch_ready.cache_clear()


def _check_inf_of_dy_stays_in_its_row(backward, M, row):
    """dY[row, 7] = inf through ``backward`` (a launcher taking (dy, x, W, A, B, S, scaling)): dX, dA and dB NaN / inf
    exactly where the reference has them (bf16, N = 70, K = 90, r = 5), and the NaN sums re-zeroed in the workspace."""
    N, K, r = 70, 90, 5
    x, w, _, a, bb = make_inputs((M,), K, N, r, torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    dy, s = torch.randn(M, N, generator=g).to(torch.bfloat16), torch.randn(M, r, generator=g).to(torch.bfloat16)
    dy[row, 7] = float("inf")
    got = backward(dy, x, w, a, bb, s, 1.5)
    _, ref = _bwd_refs(dy, x, w, a, bb, s, 1.5, 0.0, torch.bfloat16)
    for name, g_, r_ in zip(("dX", "dA", "dB"), got, ref):
        assert torch.equal(g_.isnan(), r_.isnan()) and torch.equal(g_.isinf(), r_.isinf()), name
    for workspace in launchers._workspaces.values():
        assert not workspace.counters.any() and not workspace.accumulator.any()


@pytest.mark.parametrize("M", [3, 70])
def test_bwd_one_launch_keeps_inf_of_dy_in_its_rows(M):
    """An inf of dY makes its row of dS inf / NaN; the padded rank columns and rows of dS stay 0 (as the separate
    launches' masked store leaves them), so dX, dA and dB are NaN exactly where the reference is."""
    _check_inf_of_dy_stays_in_its_row(launchers.lora_bwd_one_launch, M, 1)


# 10 row blocks of 64 (a first group of 8 and a last of 2: the job order's irregular end) and 5 chunks of 64 columns
# of N and of K, so the last group's two dB and two dA jobs take 2 or 3 chunks each; 130 and 150 tokens: 3 row
# blocks in one group, where at K = 200 (4 chunks) 2 of the 6 dA jobs have none; r = 33 pads to 64.
IN_LAUNCH_CASES = [(130, 7, 75, 200), (150, 33, 300, 70), (600, 1, 270, 260), (129, 64, 70, 66)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)  # fp32 keeps the other backwards
@pytest.mark.parametrize("M,r,N,K", IN_LAUNCH_CASES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bwd_in_launch(dtype, M, r, N, K, p):
    """The backward as one dX launch with the dS / dB jobs inside (DS_IN_LAUNCH) against the chained dS / dB, dX and
    dA formulas: dA and dB in the inputs' dtype, the workspace (counters, tickets, accumulators) back at zero."""
    _check_bwd_in_launch(dtype, M, r, N, K, p)


@pytest.mark.parametrize("tiles_first", [False, True])
@pytest.mark.parametrize("group_m,M", [(8, 600), (16, 600), (16, 1100)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bwd_in_launch_at_each_group_size_and_order(monkeypatch, request, group_m, M, p, tiles_first):
    """The in-launch backward at each group size and job order the plan weighs (configs.IN_LAUNCH_GROUP_M,
    IN_LAUNCH_TILES_FIRST), forced: 600 tokens (10 row blocks of 64: groups of 8 and 2, or one lone group, whose dA
    and dB jobs store their sums without atomics) and 1100 (18: groups of 16 and 2); a group's dB and dA jobs before
    its dX tiles or after them; bf16, r = 33, N = 70, K = 200: test_bwd_in_launch's checks."""
    monkeypatch.setattr(configs, "IN_LAUNCH_GROUP_M", (group_m,))
    monkeypatch.setattr(configs, "IN_LAUNCH_TILES_FIRST", (tiles_first,))
    launchers._in_launch_ready.cache_clear()
    request.addfinalizer(launchers._in_launch_ready.cache_clear)  # no forced plan left for later tests
    r, N, K, dtype = 33, 70, 200, torch.bfloat16
    launch = plans.plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=p > 0,
                                           num_sms=launchers._num_sms(torch.device("cpu")))[0]
    assert launch.config.GROUP_M == group_m and launch.args["tiles_first"] == tiles_first
    assert launch.schedule.tiles_first == tiles_first and not launch.schedule.tiles_wait_at_start  # DS_LATE
    lone = -(-M // 64) <= group_m
    assert (launch.atomic_bytes == (launch.args["dy_splits"] + 1) * M * 64 * 4) == lone  # dS's atomics alone
    _check_bwd_in_launch(dtype, M, r, N, K, p)


@pytest.mark.parametrize("tiles_first", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bwd_in_launch_orders_at_rank_1_in_fp16(monkeypatch, request, p, tiles_first):
    """Both job orders forced at r = 1 (R = 16) in fp16: 330 tokens (6 row blocks of 64 in groups of 4 and 2),
    N = 70, K = 200; test_bwd_in_launch's checks."""
    monkeypatch.setattr(configs, "IN_LAUNCH_GROUP_M", (4,))
    monkeypatch.setattr(configs, "IN_LAUNCH_TILES_FIRST", (tiles_first,))
    launchers._in_launch_ready.cache_clear()
    request.addfinalizer(launchers._in_launch_ready.cache_clear)  # no forced plan left for later tests
    M, r, N, K, dtype = 330, 1, 70, 200, torch.float16
    launch = plans.plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=p > 0,
                                           num_sms=launchers._num_sms(torch.device("cpu")))[0]
    assert launch.config.GROUP_M == 4 and launch.args["tiles_first"] == tiles_first
    _check_bwd_in_launch(dtype, M, r, N, K, p)


def _check_bwd_in_launch(dtype, M, r, N, K, p):
    x, w, _, a, bb = make_inputs((M,), K, N, r, dtype)
    g = torch.Generator().manual_seed(6)
    dy = torch.randn(M, N, generator=g).to(dtype)
    s = torch.randn(M, r, generator=g).to(dtype)
    dx, da, db = launchers.lora_bwd_in_launch(dy, x, w, a, bb, s, 1.5, dropout_p=p, seed=SEED)
    assert da.dtype == db.dtype == dtype
    for name, got, low, ref in zip(("dX", "dA", "dB"), (dx, da, db), *_bwd_refs(dy, x, w, a, bb, s, 1.5, p, dtype)):
        _check(name, got, low, ref, dtype)
    for workspace in launchers._workspaces.values():
        assert not workspace.counters.any() and not workspace.accumulator.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r,p", [(64, 0.0), (20, 0.3)])
def test_bwd_in_launch_on_128_row_tiles(monkeypatch, request, dtype, r, p):
    """The in-launch backward on the many-token tiles (128 rows), here at 300 tokens (3 row blocks of 128 rows in one
    group, dA and dB jobs over two 64-row slices of each; that lone group stores dA and dB directly without dropout,
    and adds them by atomics with it, LONE_GROUP_STORES) and N, K = 200, 330: the same checks as
    test_bwd_in_launch."""
    many = configs.bwd_dx_config(configs.MID_TOKENS + 1, dtype)
    assert many.BLOCK_M == 128
    monkeypatch.setattr(configs, "bwd_dx_config", lambda M, dtype, two_products=False, dora=False: many)
    launchers._in_launch_ready.cache_clear()
    request.addfinalizer(launchers._in_launch_ready.cache_clear)  # no 128-row plan left for later tests
    M, N, K = 300, 200, 330
    x, w, _, a, bb = make_inputs((M,), K, N, r, dtype)
    g = torch.Generator().manual_seed(7)
    dy, s = torch.randn(M, N, generator=g).to(dtype), torch.randn(M, r, generator=g).to(dtype)
    launch = plans.plan_lora_bwd_in_launch(M, N, K, r, dtype, dropout=p > 0, num_sms=launchers._num_sms(x.device))[0]
    assert launch.config.BLOCK_M == 128 and launch.constexprs["DS_IN_LAUNCH"]
    dx, da, db = launchers.lora_bwd_in_launch(dy, x, w, a, bb, s, 0.75, dropout_p=p, seed=SEED)
    for name, got, low, ref in zip(("dX", "dA", "dB"), (dx, da, db), *_bwd_refs(dy, x, w, a, bb, s, 0.75, p, dtype)):
        _check(name, got, low, ref, dtype)
    for workspace in launchers._workspaces.values():
        assert not workspace.counters.any() and not workspace.accumulator.any()


def test_bwd_in_launch_keeps_inf_of_dy_in_its_rows():
    """An inf of dY (row 70: the second of 3 row blocks) makes its row of dS inf / NaN; dX, dA and dB are NaN / inf
    exactly where the reference is, and the NaN sums leave the accumulators at zero."""
    _check_inf_of_dy_stays_in_its_row(launchers.lora_bwd_in_launch, 130, 70)


def test_bwd_takes_the_ds_jobs_into_the_dx_launch_where_it_pays():
    """At 8192 tokens (4096 -> 4096, r = 16, bf16): one dX launch of 64 row blocks x (32 K tiles + the dS jobs' N
    splits + 64 / G dB jobs + 64 / G dA jobs: 64 chunks of 64 columns of N and of K over groups of G = 8 or 16 row
    blocks), none of the dS / dB or dA launches, its group size, job order and N split the fastest modeled ones (no
    slower than the dS / dB launch's own split); deterministic mode, fp32 and an input without grad keep other plans;
    1-64 tokens and fp32 cannot take it."""
    plan = plans.plan_lora_bwd(8192, 4096, 4096, 16, torch.bfloat16, dropout=False, deterministic=False, num_sms=132)
    splits, slots = plan[0].args["dy_splits"], 64 // plan[0].config.GROUP_M
    assert [(l.kernel, l.grid) for l in plan] == [("_lora_bwd_dx_kernel", (64 * (32 + splits + 2 * slots),))]
    assert plan[0].args == dict(n_per_split=-(-64 // splits) * 64, dy_splits=splits, db_slots=slots, da_slots=slots,
                                tiles_first=plan[0].args["tiles_first"])
    default_splits = configs.dy_split(128, 64, 132, 64, 8192)[0]  # 128 dS row blocks of 64, 64 N tiles of 64
    spy = []
    real = plans.Launch
    def recording(*args, **kwargs):
        spy.append(real(*args, **kwargs))
        return spy[-1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plans, "Launch", recording)
        plans.plan_lora_bwd_in_launch(8192, 4096, 4096, 16, torch.bfloat16, dropout=False, num_sms=132)
    assert {launch.args["dy_splits"] for launch in spy} >= {1, default_splits, 64}
    assert {launch.config.GROUP_M for launch in spy} == set(configs.IN_LAUNCH_GROUP_M)
    assert {launch.args["tiles_first"] for launch in spy} == {0}  # 128-row tiles: the jobs before the tiles
    assert cost.plan_seconds(plan) == min(cost.plan_seconds([launch]) for launch in spy)
    assert plan[0].constexprs["DS_IN_LAUNCH"] and plan[0].atomic_bytes > 0
    assert {op.name for op in plan[0].writes} == {"dX", "dS", "dA", "dB"}
    for kwargs in (dict(deterministic=True), dict(dtype=torch.float32), dict(need_dx=False)):
        other = plans.plan_lora_bwd(8192, 4096, 4096, 16, **{"dtype": torch.bfloat16, "dropout": False,
                                                             "deterministic": False, "num_sms": 132, **kwargs})
        assert not any(l.constexprs.get("DS_IN_LAUNCH") for l in other)
    x = torch.zeros(64, 8, dtype=torch.bfloat16)
    for M, dtype in ((64, torch.bfloat16), (70, torch.float32)):
        with pytest.raises(ValueError, match="cannot run the dS / dB jobs in the dX launch"):
            launchers.lora_bwd_in_launch(x.new_zeros(M, 8).to(dtype), x.new_zeros(M, 8).to(dtype),
                                         x.new_zeros(8, 8).to(dtype), x.new_zeros(4, 8).to(dtype),
                                         x.new_zeros(8, 4).to(dtype), x.new_zeros(M, 4).to(dtype), 1.0)


def test_bwd_plan_is_one_launch_where_it_pays():
    one = plans.plan_lora_bwd(64, 4096, 4096, 64, torch.bfloat16, dropout=True, deterministic=True, num_sms=132)
    assert [(l.kernel, l.grid) for l in one] == [("_lora_bwd_dx_da_db_kernel", (128,))]
    assert [op.dtype for op in one[0].writes] == [torch.bfloat16] * 3
    assert one[0].atomic_bytes == 0 and one[0].constexprs["REDUCE"] is False
    several, = plans.plan_lora_bwd(256, 4096, 4096, 16, torch.bfloat16, dropout=True, deterministic=False,
                                   num_sms=132, one_launch=True)
    assert several.grid == (4 * 32,) and several.constexprs["REDUCE"] is True and several.atomic_bytes > 0
    assert [op.dtype for op in several.writes] == [torch.bfloat16] * 3
    for M, r, dtype, deterministic in ((1, 128, torch.float16, False), (1, 64, torch.float32, False),
                                       (65, 16, torch.float32, False), (65, 16, torch.bfloat16, True),
                                       (1024, 64, torch.bfloat16, False), (2049, 16, torch.bfloat16, False)):
        for need_dx in (True, False):
            planned = plans.plan_lora_bwd(M, 4096, 4096, r, dtype, dropout=False, deterministic=deterministic,
                                          num_sms=132, need_dx=need_dx)
            assert "_lora_bwd_dx_da_db_kernel" not in [l.kernel for l in planned]
            assert ("_lora_bwd_dx_kernel" in [l.kernel for l in planned]) == need_dx
    without_dx, = plans.plan_lora_bwd(1, 4096, 4096, 16, torch.bfloat16, dropout=False, deterministic=False,
                                      num_sms=132, need_dx=False)
    assert without_dx.constexprs["COMPUTE_DX"] is False and "W" not in [op.name for op in without_dx.reads]
    assert without_dx.flops < one[0].flops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [9, 100])
def test_bwd_without_dx_gives_the_same_grads(dtype, M):
    """An input that needs no grad (need_dx=False) skips dX and W, and dA / dB are the same bits: gradient
    checkpointing, which makes a block's input require grad, changes no LoRA grad (with several row blocks on a GPU
    only up to the atomics' order, as any two runs)."""
    N, K, r = 150, 91, 7
    x, w, _, a, bb = make_inputs((M,), K, N, r, dtype)
    g = torch.Generator().manual_seed(6)
    dy, s = torch.randn(M, N, generator=g).to(dtype), torch.randn(M, r, generator=g).to(dtype)
    dx, da, db = launchers.lora_bwd(dy, x, w, a, bb, s, 1.5, dropout_p=0.2, seed=SEED)
    none, da2, db2 = launchers.lora_bwd(dy, x, w, a, bb, s, 1.5, dropout_p=0.2, seed=SEED, need_dx=False)
    assert dx is not None and none is None
    with_dx = plans.plan_lora_bwd(M, N, K, r, dtype, dropout=True, deterministic=False,
                                  num_sms=launchers._INTERPRETER_SMS)
    if with_dx[0].constexprs.get("DS_IN_LAUNCH"):
        # The dS / dB jobs in the dX launch need its tiles, so without dX another kernel sums dA / dB: the same
        # values within torch's error, in another order.
        refs = _bwd_refs(dy, x, w, a, bb, s, 1.5, 0.2, dtype)
        for name, got, low, ref in zip(("dA", "dB"), (da2, db2), refs[0][1:], refs[1][1:]):
            _check(name, got, low, ref, dtype)
    else:
        assert torch.equal(da, da2) and torch.equal(db, db2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_block_grads_are_stored_in_the_parameter_dtype(dtype):
    """Few tokens: dB and dA come straight from their kernels in the parameters' dtype (no memset, no
    sum, no cast launched), and equal the fp32-accumulated result rounded once."""
    M, N, K, r = 20, 75, 70, 16
    x, _, _, _, bb = make_inputs((M,), K, N, r, dtype)
    g = torch.Generator().manual_seed(9)
    dy, s = torch.randn(M, N, generator=g).to(dtype), torch.randn(M, r, generator=g).to(dtype)
    ds, db = launchers.lora_bwd_dy(dy, bb, s, 1.5)
    da = launchers.lora_bwd_da(ds, x)
    assert db.dtype == dtype and da.dtype == dtype
    one_launch = [plans.plan_lora_bwd_dy(M, N, r, dtype, deterministic=False),
                  plans.plan_lora_bwd_da(M, K, r, dtype, dropout=False, deterministic=False, num_sms=132)]
    assert [[launch.kernel for launch in plan] for plan in one_launch] == [["_lora_bwd_dy_kernel"],
                                                                           ["_lora_bwd_da_kernel"]]
    (_, db_low), (_, db_ref) = _refs(reference.lora_bwd_dy, dy, bb, s, 1.5)
    _check("dB", db, db_low, db_ref, dtype)
    _check("dA", da, *_refs(reference.lora_bwd_da, ds, x), dtype)
    assert launchers.lora_bwd_dy(dy, bb, s, 1.5, deterministic=True)[1].dtype == dtype


def test_da_split_covers_all_rows():
    for M in (1, 63, 64, 65, 700, 10_000):
        splits, per_split = configs.da_split(M, 4096, 64, 64, num_sms=132)
        m_blocks = -(-M // 64)
        assert splits * per_split >= m_blocks > (splits - 1) * per_split


def test_padded_rank():
    assert [configs.padded_rank(r) for r in (1, 7, 16, 17, 64, 100, 256)] == [16, 16, 16, 32, 64, 128, 256]


def test_input_precision_follows_allow_tf32():
    matmul = torch.backends.cuda.matmul
    original = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert launchers._input_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert launchers._input_precision(torch.float32) == "tf32"
        assert launchers._input_precision(torch.bfloat16) == "tf32"  # ignored by 16-bit dots
    finally:
        matmul.allow_tf32 = original
