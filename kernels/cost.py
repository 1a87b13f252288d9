"""The modeled (not measured) time of a planned launch: the one formula the plans weigh alternatives with
(plans.plan_lora_fwd: the shrink fused or not; plans.plan_lora_bwd: one launch or three) and the benchmark's roofline
(fused_lora.benchmarks.roofline) prints, on an H100 SXM preset.

time = max(flops / peak, bytes / bandwidth) x wave factor + atomic bytes / ATOMIC_BYTES_PER_S
       + tail bytes x SMs / bandwidth + first-wave wait (wait_seconds) + last group's job (last_job_seconds)
       + LAUNCH_OVERHEAD_S

Pure arithmetic on the plans' numbers: no torch, no CUDA.
"""
from __future__ import annotations

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
                 num_sms: int) -> float:
    return max(flops / peak, nbytes / hbm_bytes_per_s) * wave_factor(programs, num_sms)


def atomic_seconds(atomic_bytes: int) -> float:
    return atomic_bytes / ATOMIC_BYTES_PER_S


def tail_seconds(tail_bytes: int, *, hbm_bytes_per_s: float, num_sms: int) -> float:
    """One program alone after the others: at one SM's share of the bandwidth (hbm / SMs)."""
    return tail_bytes * num_sms / hbm_bytes_per_s


def wait_seconds(wait_bytes: int, main: float, programs: int | None, *, hbm_bytes_per_s: float,
                 num_sms: int, at_start: bool = False, lead: int = 0) -> float:
    """The first wave of a launch whose tiles wait for producer jobs started beside them (SHRINK_IN_LAUNCH,
    DS_IN_LAUNCH): one producer job moves ``wait_bytes`` at one SM's share of the bandwidth (the tail rate). A tile
    of the first wave waits for all of it when it waits before its main loop (``at_start``), else for what exceeds
    its own share of the main time (``main`` / waves). Later producers run one group of row blocks ahead of their
    tiles, so only the first wave waits.

    Who waits in the first wave: its programs hold the first SMs x PROGRAMS_PER_SM tickets (_take_ticket: a
    program's ticket is its place in the order programs started), of which the first ``lead`` are producer jobs,
    which wait on nothing. In a one-wave launch any waiting program delays the end by the wait; in a longer one the
    waiting programs' idle time is shared by all slots, as the wave factor shares the work."""
    if not wait_bytes:
        return 0.0
    job = tail_seconds(wait_bytes, hbm_bytes_per_s=hbm_bytes_per_s, num_sms=num_sms)
    job = job if at_start else max(0.0, job - main / waves(programs or 1, num_sms))
    slots = num_sms * PROGRAMS_PER_SM
    waiting = max(0, min(slots, programs or 1) - lead)
    if waves(programs or 1, num_sms) == 1:
        return job if waiting else 0.0
    return job * waiting / slots


def last_job_seconds(job_bytes: int, cover: int, main: float, programs: int | None, *, hbm_bytes_per_s: float,
                     num_sms: int) -> float:
    """What one job of a launch's last group (DS_IN_LAUNCH's dA and dB jobs) adds beyond the ``cover`` programs that
    run beside it: its ``job_bytes`` at the tail rate, less those programs' share of the main time."""
    if not job_bytes:
        return 0.0
    job = tail_seconds(job_bytes, hbm_bytes_per_s=hbm_bytes_per_s, num_sms=num_sms)
    return max(0.0, job - main * cover / max(1, programs or 1))


def launch_seconds(flops: int, nbytes: int, programs: int | None, atomic_bytes: int = 0, tail_bytes: int = 0,
                   wait_bytes: int = 0, wait_at_start: bool = False, last_job_bytes: int = 0, last_job_cover: int = 0,
                   wait_lead: int = 0, *, peak: float = H100_PEAK_FLOPS, hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S,
                   num_sms: int = H100_NUM_SMS) -> float:
    main = main_seconds(flops, nbytes, programs, peak=peak, hbm_bytes_per_s=hbm_bytes_per_s, num_sms=num_sms)
    return (main + atomic_seconds(atomic_bytes) + tail_seconds(tail_bytes, hbm_bytes_per_s=hbm_bytes_per_s,
                                                               num_sms=num_sms)
            + wait_seconds(wait_bytes, main, programs, hbm_bytes_per_s=hbm_bytes_per_s, num_sms=num_sms,
                           at_start=wait_at_start, lead=wait_lead)
            + last_job_seconds(last_job_bytes, last_job_cover, main, programs, hbm_bytes_per_s=hbm_bytes_per_s,
                               num_sms=num_sms)
            + LAUNCH_OVERHEAD_S)


def plan_seconds(plan, num_sms: int = H100_NUM_SMS) -> float:
    """A plan's launches (plans.Launch) at the H100's rates with ``num_sms`` SMs."""
    return sum(launch_seconds(launch.flops, launch.hbm_bytes, launch.programs, launch.atomic_bytes, launch.tail_bytes,
                              launch.wait_bytes, launch.wait_at_start, launch.last_job_bytes, launch.last_job_cover,
                              launch.wait_lead, num_sms=num_sms) for launch in plan)
