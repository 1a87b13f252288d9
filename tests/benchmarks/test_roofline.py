"""The roofline's accounting: fp32 atomics, wave quantisation, GPU presets, the Triton efficiency factor and
the host-bound marks."""
import csv
import json
from dataclasses import replace

import pytest
import torch

from fused_lora.benchmarks import cli, roofline, runs, tables
from fused_lora.benchmarks.progress import Progress
from fused_lora.benchmarks.rows import HostOverhead, HostRow
from fused_lora.benchmarks.sweep import Point
from fused_lora.kernels import configs, cost, plans

BIG = Point(4096, 4096, 8192, 16, 0.0, "bfloat16")


def _launch(plan, kernel):
    (launch,) = [l for l in plan if l.kernel == kernel]
    return launch


# --- fp32 atomics -------------------------------------------------------------------------------

def test_db_atomic_bytes_are_m_blocks_times_n_times_r_fp32():
    """Each row block adds its (N, r) fp32 share; the last to arrive per N split reads and re-zeroes it in one
    atomic exchange with 0."""
    M, N, r = 8192, 4096, 16
    launch = _launch(plans.plan_lora_bwd_dy(M, N, r, torch.bfloat16, deterministic=False), "_lora_bwd_dy_kernel")
    assert launch.constexprs["USE_ATOMICS"] and launch.constexprs["REDUCE"]
    m_blocks = -(-M // configs.bwd_dy_config(configs.padded_rank(r), torch.bfloat16).BLOCK_M)
    splits, R = launch.grid[1], launch.constexprs["R"]
    assert launch.grid[0] == m_blocks and splits > 1 and launch.constexprs["SPLIT_N"]
    # dB over the row blocks, dS over the N splits; each exchanged with 0 once by the last program
    assert launch.atomic_bytes == (m_blocks * N * r * 4 + N * r * 4) + (splits * M * R * 4 + M * R * 4)
    assert roofline._from_plan(launch).atomic_bytes == launch.atomic_bytes


def test_da_atomic_bytes_are_splits_times_r_times_k_fp32():
    M, K, r = 8192, 4096, 16
    launch = _launch(plans.plan_lora_bwd_da(M, K, r, torch.bfloat16, dropout=False, deterministic=False,
                                            num_sms=roofline.NUM_SMS), "_lora_bwd_da_kernel")
    splits = launch.grid[1]
    assert launch.constexprs["USE_ATOMICS"] and splits > 1
    assert launch.atomic_bytes == splits * r * K * 4 + r * K * 4


def test_a_plan_with_atomics_models_slower_than_the_same_without():
    launch = _launch(plans.plan_lora_bwd_dy(8192, 4096, 16, torch.bfloat16, deterministic=False),
                     "_lora_bwd_dy_kernel")
    without = replace(launch, atomic_bytes=0)
    peak = roofline.PEAK_FLOPS["bfloat16"]
    with_atomics, plain = roofline._from_plan(launch), roofline._from_plan(without)
    assert plain.atomic_bytes == 0
    assert with_atomics.seconds(peak) > plain.seconds(peak)
    assert with_atomics.main_seconds(peak) == plain.main_seconds(peak)  # the atomics are added, not overlapped
    assert with_atomics.atomic_seconds() == with_atomics.atomic_bytes / roofline.ATOMIC_BYTES_PER_S


def test_deterministic_and_single_part_plans_have_no_atomics():
    for launch in roofline.fused_launches(BIG, "bwd", deterministic=True):
        assert launch.atomic_bytes == 0
    decode = replace(BIG, tokens=1)  # one row block: dB and dA stored once, no atomics
    assert all(launch.atomic_bytes == 0 for launch in roofline.fused_launches(decode, "bwd"))
    assert sum(launch.atomic_bytes for launch in roofline.fused_launches(BIG, "bwd")) > 0


def test_deterministic_partials_are_written_and_read_back():
    M, N, r = 8192, 4096, 16
    atomics, partials = (_launch(plans.plan_lora_bwd_dy(M, N, r, torch.bfloat16, deterministic=d),
                                 "_lora_bwd_dy_kernel") for d in (False, True))
    db_parts, ds_parts = partials.grid[0] * N * r * 4, partials.grid[1] * M * partials.constexprs["R"] * 4
    # stored by every part, read back by the last
    assert partials.hbm_bytes == atomics.hbm_bytes + 2 * db_parts + 2 * ds_parts
    assert not partials.constexprs["USE_ATOMICS"] and partials.tail_bytes > atomics.tail_bytes


def test_the_last_programs_tail_is_modeled_at_one_sms_share_of_the_bandwidth():
    launch = roofline._from_plan(_launch(plans.plan_lora_bwd_dy(8192, 4096, 16, torch.bfloat16, deterministic=False),
                                         "_lora_bwd_dy_kernel"))
    assert launch.tail_bytes > 0
    assert launch.tail_seconds() == pytest.approx(launch.tail_bytes / (roofline.HBM_BYTES_PER_S / roofline.NUM_SMS))
    peak = roofline.PEAK_FLOPS["bfloat16"]
    assert launch.seconds(peak) == pytest.approx(launch.main_seconds(peak) + launch.atomic_seconds()
                                                 + launch.tail_seconds() + roofline.LAUNCH_OVERHEAD_S)


# --- wave quantisation --------------------------------------------------------------------------

def test_133_programs_on_132_sms_take_two_waves():
    assert roofline.NUM_SMS == 132 and roofline.PROGRAMS_PER_SM == 1
    one, two = (roofline.ModeledLaunch("k", flops=0, bytes=10**9, programs=g) for g in (132, 133))
    assert one.waves() == 1 and two.waves() == 2
    assert one.wave_factor() == 1.0 and two.wave_factor() == 2 * 132 / 133
    assert two.seconds(1e15) > one.seconds(1e15)
    full_two = roofline.ModeledLaunch("k", flops=0, bytes=10**9, programs=264)
    assert full_two.waves() == 2 and full_two.wave_factor() == 1.0


# --- the schedule of a launch with producer jobs ---------------------------------------------------

HBM = roofline.HBM_BYTES_PER_S
SM_RATE = HBM / 132  # one SM's share of the bandwidth: a producer or side job's rate


def _schedule_seconds(nbytes, schedule):
    """A memory-bound launch of ``nbytes`` (spread: nbytes / HBM) run as ``schedule`` on 132 slots."""
    return cost.schedule_seconds(0, nbytes, schedule, peak=1e15, hbm_bytes_per_s=HBM, num_sms=132)


@pytest.mark.parametrize("tiles", [1, 100, 132, 133, 264, 300])
def test_a_schedule_of_tiles_alone_is_the_wave_factors_time(tiles):
    alone = cost.Schedule(num_pid_m=1, group_m=8, parts=0, part_bytes=0, tiles=tiles, tiles_wait_at_start=False)
    main = cost.main_seconds(0, 10**9, tiles, peak=1e15, hbm_bytes_per_s=HBM, num_sms=132)
    assert _schedule_seconds(10**9, alone) == pytest.approx(main)


def test_short_jobs_do_not_count_as_tiles():
    """133 tiles and 131 short jobs: 264 programs are two full waves to the wave factor (the launch's evenly spread
    time), but one slot runs two tiles one after the other: about twice that."""
    job = 10**3
    mixed = cost.Schedule(num_pid_m=1, group_m=8, parts=0, part_bytes=0, tiles=133, tiles_wait_at_start=False,
                          side_jobs=(cost.SideJobs(131, (job,), wait_for_parts=False),))
    spread = 10**9 / HBM
    assert cost.main_seconds(0, 10**9, 264, peak=1e15, hbm_bytes_per_s=HBM, num_sms=132) == pytest.approx(spread)
    tile = (spread * 132 - 131 * job / SM_RATE) / 133
    assert _schedule_seconds(10**9, mixed) == pytest.approx(2 * tile)


def test_tiles_wait_for_their_row_blocks_parts_before_or_after_their_main_loop():
    """One row block: one long producer job, then 131 tiles. Waiting before the loop they end a tile after it;
    waiting after it they end with it or with their own work, whichever is later."""
    part = 10**6  # 39 us at one SM's share
    def run(at_start, nbytes):
        return _schedule_seconds(nbytes, cost.Schedule(num_pid_m=1, group_m=8, parts=1, part_bytes=part, tiles=131,
                                                       tiles_wait_at_start=at_start))
    for nbytes in (10**8, 10**9):  # tiles shorter, then longer than the part
        tile = (nbytes / HBM * 132 - part / SM_RATE) / 131
        assert run(True, nbytes) == pytest.approx(part / SM_RATE + tile)
        assert run(False, nbytes) == pytest.approx(max(part / SM_RATE, tile))


def test_side_jobs_that_wait_hold_their_slot_until_the_groups_parts_end():
    """Two row blocks in one group, one part each; a waiting side job starts when both parts have ended, one that
    does not wait at once."""
    def run(waits):
        return _schedule_seconds(10**6, cost.Schedule(
            num_pid_m=2, group_m=8, parts=1, part_bytes=10**5 * (1 + 9 * waits), tiles=0, tiles_wait_at_start=False,
            side_jobs=(cost.SideJobs(1, (10**5,), wait_for_parts=waits),)))
    assert run(True) == pytest.approx((10**6 + 10**5) / SM_RATE)
    assert run(False) == pytest.approx(10**5 / SM_RATE)


def test_a_compute_bound_launchs_jobs_add_their_slots_at_the_idle_bandwidth():
    """132 tiles bound by FLOPs (twice the bytes' time) and 132 short jobs ahead of them: a tile takes its FLOPs at
    one SM's share of the peak (no less, though the jobs' slot time came out of the spread), and a job streams at one
    SM's share of the bandwidth times spread / memory (2: half the launch's bandwidth is idle)."""
    peak, nbytes, job = 1e15, 10**9, 10**5
    memory = nbytes / HBM
    flops = 2 * memory * peak
    mixed = cost.Schedule(num_pid_m=1, group_m=8, parts=0, part_bytes=0, tiles=132, tiles_wait_at_start=False,
                          side_jobs=(cost.SideJobs(132, (job,), wait_for_parts=False),))
    end = cost.schedule_seconds(flops, nbytes, mixed, peak=peak, hbm_bytes_per_s=HBM, num_sms=132)
    assert end == pytest.approx(job / (2 * SM_RATE) + flops / peak)
    assert end > cost.main_seconds(flops, nbytes, 264, peak=peak, hbm_bytes_per_s=HBM, num_sms=132)  # 2 waves


def test_a_jobs_flops_are_its_slots_not_the_tiles():
    """The same compute-bound launch, the jobs now carrying half the launch's FLOPs: the tiles' floor is their own
    half; a job takes the longer of its bytes at the rate above and its FLOPs at one SM's share of the peak."""
    peak, nbytes = 1e15, 10**9
    flops = 2 * nbytes / HBM * peak
    def run(job_flops, job_bytes=10**5):
        return cost.schedule_seconds(flops, nbytes, cost.Schedule(
            num_pid_m=1, group_m=8, parts=0, part_bytes=0, tiles=132, tiles_wait_at_start=False,
            side_jobs=(cost.SideJobs(132, (job_bytes,), wait_for_parts=False, flops_by_group=(job_flops,)),)),
            peak=peak, hbm_bytes_per_s=HBM, num_sms=132)
    half = flops // 2 // 132  # one job's share: FLOP-bound (longer than its bytes at 2x one SM's share)
    assert run(half) == pytest.approx(half / (peak / 132) + (flops - 132 * half) / peak)
    assert run(half, job_bytes=10**8) == pytest.approx(10**8 / (2 * SM_RATE) + (flops - 132 * half) / peak)
    lone = cost.Schedule(num_pid_m=1, group_m=8, parts=0, part_bytes=0, tiles=131, tiles_wait_at_start=False,
                         side_jobs=(cost.SideJobs(1, (10**5,), wait_for_parts=False, flops_by_group=(flops // 2,)),))
    assert cost.schedule_seconds(flops, nbytes, lone, peak=peak, hbm_bytes_per_s=HBM, num_sms=132) == \
        pytest.approx(flops // 2 / (peak / 132))  # one job with half the FLOPs: longer than any tile
    # One FLOP-bound producer job, then 131 tiles that wait for it before their main loop.
    part = cost.Schedule(num_pid_m=1, group_m=8, parts=1, part_bytes=10**5, tiles=131, tiles_wait_at_start=True,
                         part_flops=half)
    assert cost.schedule_seconds(flops, nbytes, part, peak=peak, hbm_bytes_per_s=HBM, num_sms=132) == \
        pytest.approx(half / (peak / 132) + (flops - half) / (peak / 132) / 131)


def test_the_schedule_walks_the_kernels_ticket_order():
    """cost.ticket_order, which the schedule walks, is plans.producers_first_order (which the interpreter checks
    against _common._producers_first_job, tests/kernels/test_launchers.py) job by job."""
    for num_pid_m, columns, parts, group_m in ((1, 3, 2, 8), (20, 5, 3, 8), (17, 4, 1, 16), (9, 2, 0, 4)):
        order = plans.producers_first_order(num_pid_m, columns, parts, group_m)
        walked = list(cost.ticket_order(num_pid_m, columns, parts, group_m))
        assert len(order) == len(walked) == num_pid_m * (parts + columns)
        assert [kind == "part" for kind, _ in order] == [is_part for is_part, _, _ in walked]
        assert [i // parts for kind, i in order if kind == "part"] == [m for p, m, _ in walked if p]


@pytest.mark.parametrize("M,N,r,dropout", [(1024, 1024, 64, False), (8192, 4096, 64, True), (300, 4096, 16, True)])
def test_a_plans_schedule_is_its_grid(M, N, r, dropout):
    """The forward's share jobs and tiles, the backward's dS, dA, dB jobs and dX tiles: as many as the launch has
    programs, with the group size and the waits the kernel uses."""
    fwd = plans.plan_lora_fwd(M, N, 4096, r, torch.bfloat16, dropout=dropout, bias=False, shrink_in_launch=True)[-1]
    plan = fwd.schedule
    assert plan.num_pid_m * (plan.parts + plan.columns) == fwd.programs
    assert (plan.parts, plan.tiles) == (fwd.args["s_splits"], -(-N // fwd.config.BLOCK_N))
    assert plan.group_m == fwd.config.GROUP_M and not plan.tiles_wait_at_start and not plan.side_jobs
    bwd = plans.plan_lora_bwd_in_launch(M, N, 4096, r, torch.bfloat16, dropout=dropout, num_sms=132)[0]
    plan = bwd.schedule
    assert plan.num_pid_m * (plan.parts + plan.columns) == bwd.programs
    assert plan.parts == bwd.args["dy_splits"] and plan.tiles == -(-4096 // bwd.config.BLOCK_K)
    da, db = plan.side_jobs
    assert plan.tiles_first == bwd.args["tiles_first"]
    assert (da.per_row_block, da.wait_for_parts) == (bwd.args["da_slots"], True)
    assert (db.per_row_block, db.wait_for_parts) == (bwd.args["db_slots"], False)
    assert plan.tiles_wait_at_start == (dropout and bwd.config.BLOCK_M == 128)  # LoRA dropout, 128 rows: not DS_LATE
    # The jobs' FLOPs (dY B, dY^T S, dropout(x)^T dS) are the launch's less the tiles' (dY W and dS A, padded).
    assert sum(plan.group_sizes) == plan.num_pid_m and max(plan.group_sizes) <= plan.group_m
    cfg, R = bwd.config, bwd.constexprs["R"]
    Mp, Kp = plan.num_pid_m * cfg.BLOCK_M, plan.tiles * cfg.BLOCK_K
    tiles = 2 * Mp * Kp * (-(-N // cfg.BLOCK_N) * cfg.BLOCK_N + R)
    assert plan.job_flops == pytest.approx(bwd.flops - tiles, rel=0.05)
    assert all(len(side.flops_by_group) == len(plan.group_sizes) for side in (da, db))
    assert fwd.schedule.job_flops == pytest.approx(2 * fwd.schedule.num_pid_m * fwd.config.BLOCK_M * 4096 * R,
                                                   rel=0.05)


def test_torch_ops_have_no_waves():
    op = roofline.ModeledLaunch("aten.mm", flops=10**12, bytes=10**9)
    assert op.waves() is None and op.wave_factor() == 1.0


# --- GPU presets --------------------------------------------------------------------------------

def test_h200_differs_from_h100_in_bandwidth_only():
    h100, h200 = roofline.H100, roofline.H200
    assert h200.hbm_bytes_per_s == 4.8e12 and h100.hbm_bytes_per_s == 3.35e12
    assert replace(h200, key=h100.key, name=h100.name, source=h100.source,
                   hbm_bytes_per_s=h100.hbm_bytes_per_s) == h100


def test_h200_shortens_memory_bound_launches_only():
    peak = roofline.PEAK_FLOPS["bfloat16"]
    compute = roofline.ModeledLaunch("k", flops=10**12, bytes=10**6, programs=1024, atomic_bytes=10**6)
    memory = roofline.ModeledLaunch("k", flops=10**6, bytes=10**9, programs=1024, atomic_bytes=10**6)
    h100, h200 = roofline.H100, roofline.H200
    assert compute.seconds(peak, h200) == compute.seconds(peak, h100)
    assert memory.seconds(peak, h200) < memory.seconds(peak, h100)
    assert memory.main_seconds(peak, h200) == 10**9 / 4.8e12 * memory.wave_factor(h200)
    assert memory.seconds(peak, h200) == \
        memory.main_seconds(peak, h200) + memory.atomic_seconds() + roofline.LAUNCH_OVERHEAD_S
    gemm = {gpu.key: roofline.model_point("gemm", BIG, gpu)["fwd"].seconds for gpu in (h100, h200)}
    assert gemm["h200"] == gemm["h100"]  # 8192 tokens: compute-bound
    decode = {gpu.key: roofline.model_point("fused", replace(BIG, tokens=1), gpu)["fwd"].seconds
              for gpu in (h100, h200)}
    assert decode["h200"] < decode["h100"]  # 1 token: reading W


def test_gpu_option_names_the_preset_in_header_and_files(tmp_path, capsys):
    argv = ["--model-only", "--gpu", "h200", "--shapes", "4096x1024", "--tokens", "16,8192", "--ranks", "16",
            "--dtypes", "bf16", "--quiet", "--no-plots", "--no-host", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "[3/4] MODELED H200 SXM" in text and "4.8 TB/s" in text
    with open(tmp_path / "modeled.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"modeled-h200"} and {r["modeled_gpu"] for r in rows} == {"H200 SXM"}
    data = json.loads((tmp_path / "points.json").read_text())
    assert data["modeled_assumptions"]["gpu"] == "h200"
    assert data["modeled_assumptions"]["hbm_bytes_per_s"] == 4.8e12


# --- Triton GEMM efficiency ---------------------------------------------------------------------

def test_efficiency_applies_to_the_flop_rate_of_triton_launches_only():
    peak, e = roofline.PEAK_FLOPS["bfloat16"], roofline.TRITON_GEMM_EFFICIENCY
    assert 0 < e < 1
    triton_compute = roofline.ModeledLaunch("k", flops=10**12, bytes=10**6, programs=1320)
    triton_memory = roofline.ModeledLaunch("k", flops=10**6, bytes=10**9, programs=1320)
    torch_op = roofline.ModeledLaunch("aten.mm", flops=10**12, bytes=10**6)
    assert triton_compute.seconds(peak, triton_efficiency=e) > triton_compute.seconds(peak)
    assert triton_compute.main_seconds(peak, triton_efficiency=e) == 10**12 / (peak * e)
    assert triton_memory.seconds(peak, triton_efficiency=e) == triton_memory.seconds(peak)
    assert torch_op.seconds(peak, triton_efficiency=e) == torch_op.seconds(peak)


def test_modeled_rows_carry_both_tables():
    rows = runs.run_modeled([BIG], ("fused", "gemm", "addmm"), Progress(1, enabled=False), [])
    at = {(r.provider, r.direction): r for r in rows}
    assert at["fused", "fwd+bwd"].us_at_efficiency > at["fused", "fwd+bwd"].us
    for provider in ("gemm", "addmm"):  # torch ops only: the factor does not touch them
        assert at[provider, "fwd+bwd"].us_at_efficiency == at[provider, "fwd+bwd"].us
    fused = at["fused", "fwd+bwd"]
    assert fused.ratio_to_at_efficiency["gemm"] == fused.us_at_efficiency / at["gemm", "fwd+bwd"].us_at_efficiency
    assert fused.atomic_mib > 0 and fused.atomics_us > 0 and fused.triton_waves > 0
    assert at["gemm", "fwd+bwd"].triton_waves == 0 and at["gemm", "fwd+bwd"].atomic_mib == 0
    record = fused.as_record()
    assert record["modeled_triton_efficiency"] == roofline.TRITON_GEMM_EFFICIENCY
    assert record["modeled_us_at_triton_efficiency"] == fused.us_at_efficiency


# --- host-bound column --------------------------------------------------------------------------

def _host(fused_us, eager_us):
    rows = [HostRow(p, fused_us, eager_us, fused_us / eager_us, fused_us, eager_us, 4, 20) for p in (0.0, 0.1)]
    return HostOverhead("cpu", "thread time", 1, "fused-lora-bench --host-only", "tiny", rows)


def test_host_times_attach_to_fused_and_eager_fwd_bwd_rows():
    decode, big = replace(BIG, tokens=1), BIG
    rows = runs.run_modeled([decode, big], ("fused", "eager", "gemm"), Progress(1, enabled=False), [])
    runs.attach_host_times(rows, _host(200.0, 300.0))
    for r in rows:
        expected = {"fused": 200.0, "eager": 300.0}.get(r.provider) if r.direction == "fwd+bwd" else None
        assert r.host_us == expected
        assert r.as_record()["measured_host_us"] == expected
        assert r.host_bound == (None if expected is None else expected > r.us)
    at = {(r.point.tokens, r.provider, r.direction): r for r in rows}
    assert at[1, "fused", "fwd+bwd"].host_bound  # ~68 us of GPU time under 200 us of host time
    assert not at[8192, "fused", "fwd+bwd"].host_bound


def test_summary_table_marks_host_bound_times():
    points = [replace(BIG, tokens=1), BIG]
    rows = runs.run_modeled(points, ("fused", "gemm"), Progress(1, enabled=False), [])
    runs.attach_host_times(rows, _host(200.0, 300.0))
    lines = tables.modeled_summary_table(rows, 16, 0.0, "bfloat16").splitlines()
    decode, big = (next(line for line in lines if line.split()[1] == t) for t in ("1", "8,192"))
    assert decode.split()[2].endswith("*") and not big.split()[2].endswith("*")
    unmeasured = runs.run_modeled(points, ("fused", "gemm"), Progress(1, enabled=False), [])
    runs.attach_host_times(unmeasured, None)  # no host part: nothing marked
    assert "*" not in tables.modeled_summary_table(unmeasured, 16, 0.0, "bfloat16")


def test_model_only_says_when_the_host_part_did_not_run(tmp_path, capsys):
    argv = ["--model-only", "--no-host", "--shapes", "4096x1024", "--tokens", "16,8192", "--ranks", "16",
            "--dtypes", "bf16", "--quiet", "--no-plots", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "Host-bound time not shown: the host-overhead part did not run (--no-host)" in text
    assert "(skipped: --no-host)" in text
    assert "Triton GEMM efficiency of 0.82" in text
