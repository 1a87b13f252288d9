"""The modeled (not measured) time of a planned launch: the one formula the plans weigh alternatives with
(plans.plan_lora_fwd: the shrink fused or not; plans.plan_lora_bwd: one launch or three) and the benchmark's roofline
(fused_lora.benchmarks.roofline) prints, on an H100 SXM preset.

time = main + atomic bytes / ATOMIC_BYTES_PER_S + tail bytes x SMs / bandwidth + LAUNCH_OVERHEAD_S, where main is
max(flops / peak, bytes / bandwidth) x wave factor, or for a launch whose tiles wait for producer jobs of their own
launch the end of its programs' schedule in ticket order (schedule_seconds).

Pure arithmetic on the plans' numbers: no torch, no CUDA.
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass
from typing import Iterator

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 1,979 TFLOPS bf16/fp16 with sparsity, i.e. 989 dense;
# 3.35 TB/s HBM3; 132 SMs.
H100_PEAK_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12
H100_NUM_SMS = 132
# Assumed, not measured (no GPU here): the gap one eager launch adds on the GPU timeline, a few microseconds for
# back-to-back PyTorch / Triton launches without CUDA graphs. GPU-side only: the host's Python time per layer is
# measured by the benchmark's host-overhead part and printed beside it.
LAUNCH_OVERHEAD_S = 4e-6
# Assumed: one resident program per SM for every Triton launch. The model has no per-config occupancy (registers
# and shared memory per program are known only after compilation, see kernel_report); with two resident programs a
# sub-wave grid would be charged twice as much, a multi-wave one about the same.
PROGRAMS_PER_SM = 1
# Assumed, not measured: fp32 atomic adds resolve in L2 at the rate of HBM loads of the H100 (3.35 TB/s of added
# data; the H200 has the same GH100 L2). Source for the rate: NVIDIA Nsight Visual Studio Edition 4.7 User Guide,
# "Memory Statistics - Atomics": since compute capability 3.x "many atomics can be performed ... nearly as quickly
# as memory loads". The same page: read-modify-writes to one location "are all serialized". The dS/dB programs
# sweep N in lockstep, so all of them add into the same dB tile at once; hence the atomic time is added after the
# launch's main time rather than hidden under it (no overlap credited).
ATOMIC_BYTES_PER_S = 3.35e12


def waves(programs: int, num_sms: int) -> int:
    return max(1, -(-programs // (num_sms * PROGRAMS_PER_SM)))


def wave_factor(programs: int | None, num_sms: int) -> float:
    """Time over the time of the same work spread evenly over the GPU: waves x slots / programs; 1 for a torch op
    (programs None: cuBLAS and torch's kernels size their grids to the GPU)."""
    if programs is None:
        return 1.0
    return waves(programs, num_sms) * num_sms * PROGRAMS_PER_SM / max(1, programs)


def main_seconds(flops: int, nbytes: int, programs: int | None, *, peak: float, hbm_bytes_per_s: float,
                 num_sms: int, schedule: Schedule | None = None) -> float:
    """max(flops / peak, bytes / bandwidth) x wave factor; for a launch with producer jobs (``schedule``) the end of
    its schedule (schedule_seconds) instead."""
    if schedule is not None:
        return schedule_seconds(flops, nbytes, schedule, peak=peak, hbm_bytes_per_s=hbm_bytes_per_s, num_sms=num_sms)
    return max(flops / peak, nbytes / hbm_bytes_per_s) * wave_factor(programs, num_sms)


def atomic_seconds(atomic_bytes: int) -> float:
    return atomic_bytes / ATOMIC_BYTES_PER_S


def tail_seconds(tail_bytes: int, *, hbm_bytes_per_s: float, num_sms: int) -> float:
    """One program alone after the others: at one SM's share of the bandwidth (hbm / SMs)."""
    return tail_bytes * num_sms / hbm_bytes_per_s


def group_sizes(num_pid_m: int, group_m: int) -> tuple[int, ...]:
    """Row blocks in each group of group_m of a grouped order over num_pid_m row blocks (the last may be short)."""
    group_m = max(1, group_m)
    return tuple(min(group_m, num_pid_m - first) for first in range(0, num_pid_m, group_m))


@dataclass(frozen=True)
class SideJobs:
    """Jobs a launch with producer jobs runs per row block beside its tiles, in columns of a group's grouped order
    before or after the tiles' (Schedule.tiles_first): the dX launch's dA and dB jobs."""
    per_row_block: int
    bytes_by_group: tuple[int, ...]  # what one job of each group of row blocks moves (at the tail rate)
    wait_for_parts: bool  # waits for its group's producer jobs before it starts
    flops_by_group: tuple[int, ...] = ()  # what one job of each group computes (none: 0)

    def flops(self, group: int) -> int:
        return self.flops_by_group[group] if self.flops_by_group else 0


@dataclass(frozen=True)
class Schedule:
    """The programs of a launch whose tiles wait for producer jobs of the same launch (the forward's SHRINK_IN_LAUNCH
    share jobs, the dX launch's DS_IN_LAUNCH dS jobs), in the kernel's ticket order (ticket_order): what
    schedule_seconds simulates instead of a wave factor, which would count a short job as a tile."""
    num_pid_m: int  # row blocks
    group_m: int  # row blocks per group of the grouped order
    parts: int  # producer jobs per row block
    part_bytes: int  # what one producer job moves (with the sum the last of a row block's makes)
    tiles: int  # tiles per row block: the launch's main work, which waits for its row block's parts
    tiles_wait_at_start: bool  # before the main loop (else after it: the tile's end waits)
    side_jobs: tuple[SideJobs, ...] = ()  # per row block, in this order
    tiles_first: bool = False  # the side jobs after the tiles in a group's grouped order (else ahead of them)
    part_flops: int = 0  # what one producer job computes: its slot's time is the longer of its bytes and its FLOPs

    @property
    def columns(self) -> int:
        """Jobs per row block after its producer jobs: side jobs and tiles, in the grouped order's columns."""
        return sum(side.per_row_block for side in self.side_jobs) + self.tiles

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return group_sizes(self.num_pid_m, self.group_m)

    @property
    def job_flops(self) -> int:
        """What the producer and side jobs compute: the launch's FLOPs less its tiles'."""
        return self.num_pid_m * self.parts * self.part_flops + sum(
            size * side.per_row_block * side.flops(g) for side in self.side_jobs
            for g, size in enumerate(self.group_sizes))


def ticket_order(num_pid_m: int, columns: int, parts: int, group_m: int) -> Iterator[tuple[bool, int, int]]:
    """(is_part, row block, part or column) of each ticket of a launch with producer jobs, as
    _common._producers_first_job deals them: the parts of the first group of group_m row blocks; then per group g,
    the parts of group g + 1, followed by group g's jobs in grouped order (column by column, each over the group's
    row blocks). plans.producers_first_order is this order by job index (the tests compare it with the kernel's)."""
    group_m = max(1, group_m)
    groups = -(-num_pid_m // group_m)

    def parts_of(g):
        for m in range(g * group_m, min(num_pid_m, (g + 1) * group_m)):
            for p in range(parts):
                yield True, m, p

    yield from parts_of(0)
    for g in range(groups):
        if g + 1 < groups:
            yield from parts_of(g + 1)
        rows = range(g * group_m, min(num_pid_m, (g + 1) * group_m))
        for col in range(columns):
            for m in rows:
                yield False, m, col


@functools.lru_cache(maxsize=1 << 16)  # the plans weigh the same schedule more than once (5 ms at 4000 programs)
def schedule_seconds(flops: int, nbytes: int, schedule: Schedule, *, peak: float, hbm_bytes_per_s: float,
                     num_sms: int) -> float:
    """When the last program of a launch with producer jobs ends: its programs in ticket order (ticket_order), each
    starting on the first free slot (SMs x PROGRAMS_PER_SM): "As thread blocks terminate, new blocks are launched on
    the vacated multiprocessors" (CUDA C++ Programming Guide, Hardware Implementation).

    A producer or side job moves its bytes at one SM's share of the bandwidth, scaled by the bandwidth the launch
    leaves idle (spread / memory, see `rate`), and computes its FLOPs at one SM's share of the peak: it takes the
    longer of the two. The tiles share the rest of the launch's evenly spread slot time, max(flops / peak, bytes /
    bandwidth) x slots less the jobs', but no less than their own FLOPs' time (the launch's less the jobs') at one
    SM's share of the peak: where the tiles are bound by FLOPs, the slots that run jobs add to the launch. A tile
    waits for its row block's parts before its main loop or, after it, ends no sooner than they do; a side job that
    waits starts after its group's parts. Where every job is a tile this is the wave factor's time (waves x one
    tile)."""
    slots = num_sms * PROGRAMS_PER_SM
    compute, memory = flops / peak, nbytes / hbm_bytes_per_s
    # HBM is one pool, as in max(flops / peak, bytes / bandwidth): the launch's bytes take `memory` of its evenly
    # spread time, so a job that streams gets one SM's share of the bandwidth times spread / memory (1 where the
    # launch is bound by its bytes, more where its tiles leave bandwidth idle).
    rate = hbm_bytes_per_s / num_sms * (max(compute, memory) / memory if memory else 1.0)
    slot_peak = peak / slots  # one SM's share of the peak (one program per SM)
    spread = max(compute, memory) * slots
    part = max(schedule.part_bytes / rate, schedule.part_flops / slot_peak)
    group_m = max(1, schedule.group_m)
    rows = schedule.group_sizes
    groups = len(rows)
    side_durations = [tuple(max(side.bytes_by_group[g] / rate, side.flops(g) / slot_peak) for g in range(groups))
                      for side in schedule.side_jobs]
    jobs = schedule.num_pid_m * schedule.parts * part + sum(
        rows[g] * side.per_row_block * durations[g] for side, durations in zip(schedule.side_jobs, side_durations)
        for g in range(groups))
    tiles = schedule.num_pid_m * schedule.tiles
    # A slot running a job computes no tile, and a tile computes at most at one SM's share of the peak; the jobs'
    # FLOPs are the jobs' (counted in their slots above), not the tiles'.
    tile = max(spread - jobs, max(0, flops - schedule.job_flops) / slot_peak) / max(1, tiles)
    # Per column of the grouped order: (duration by group, waits for: None / "group" / "row", waits at start).
    kinds = [(durations, "group" if side.wait_for_parts else None, True)
             for side, durations in zip(schedule.side_jobs, side_durations) for _ in range(side.per_row_block)]
    tile_kinds = [((tile,) * groups, "row", schedule.tiles_wait_at_start)] * schedule.tiles
    kinds = tile_kinds + kinds if schedule.tiles_first else kinds + tile_kinds
    free = [0.0] * slots  # a heap of the times the slots are free
    ready = [0.0] * schedule.num_pid_m  # when a row block's parts are all done
    for is_part, m, j in ticket_order(schedule.num_pid_m, schedule.columns, schedule.parts, group_m):
        start = free[0]
        if is_part:
            end = start + part
            ready[m] = max(ready[m], end)
        else:
            durations, waits_for, at_start = kinds[j]
            g = m // group_m
            after = 0.0 if waits_for is None else ready[m] if waits_for == "row" else \
                max(ready[g * group_m:g * group_m + rows[g]])
            end = max(start, after) + durations[g] if at_start else max(start + durations[g], after)
        heapq.heapreplace(free, end)
    return max(free)


def launch_seconds(flops: int, nbytes: int, programs: int | None, atomic_bytes: int = 0, tail_bytes: int = 0,
                   schedule: Schedule | None = None, *, peak: float = H100_PEAK_FLOPS,
                   hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S, num_sms: int = H100_NUM_SMS) -> float:
    main = main_seconds(flops, nbytes, programs, peak=peak, hbm_bytes_per_s=hbm_bytes_per_s, num_sms=num_sms,
                        schedule=schedule)
    return (main + atomic_seconds(atomic_bytes) + tail_seconds(tail_bytes, hbm_bytes_per_s=hbm_bytes_per_s,
                                                               num_sms=num_sms)
            + LAUNCH_OVERHEAD_S)


def plan_seconds(plan, num_sms: int = H100_NUM_SMS) -> float:
    """A plan's launches (plans.Launch) at the H100's rates with ``num_sms`` SMs."""
    return sum(launch_seconds(launch.flops, launch.hbm_bytes, launch.programs, launch.atomic_bytes, launch.tail_bytes,
                              launch.schedule, num_sms=num_sms) for launch in plan)
