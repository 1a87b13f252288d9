"""The typed rows of a run: what benchmarks.runs and benchmarks.host return, and the tables, plots and
writers read.

Each row flattens to the columns of the CSV / JSON files with as_record(); those column names are the
files' format, which downstream readers (fused_lora.gpu_check among them) parse.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, ClassVar

from .sweep import DIRECTIONS, Point

if TYPE_CHECKING:
    from .roofline import ModeledLaunch

# The providers every time ratio is taken against: {direction}_ratio_to_{ref}, modeled_ratio_to_{ref}.
RATIO_REFERENCES = ("gemm", "eager", "peft")


def ratio(a, b):
    return a / b if a is not None and b else None


def ratios_to_references(values: dict[str, float | None]) -> dict[str, dict[str, float | None]]:
    """{provider: {ref: value / ref's value}} for each provider of ``values`` ({provider: value or None})
    and each of RATIO_REFERENCES; None where either value is missing."""
    return {provider: {ref: ratio(v, values.get(ref)) for ref in RATIO_REFERENCES} for provider, v in values.items()}


@dataclass
class Timing:
    """One direction of a measured row: median, p20 and p80 ms, TFLOP/s at the median, the rounds the
    statistics come from (CPU mode; None on a GPU) and the median's ratio to each reference provider."""
    ms: float
    p20: float
    p80: float
    tflops: float
    reps: int | None = None
    ratio_to: dict[str, float | None] = field(default_factory=dict)  # {ref: ms / ref's ms}


@dataclass
class MeasuredRow:
    """One provider at one measured point (points.csv). Fields left None were not measured (an error,
    or peak memory in CPU mode) and are absent from the record."""
    kind: str  # "measured-gpu" or "measured-cpu"
    point: Point
    provider: str
    saved_bytes: int | None = None
    saved_tensors: str | None = None
    peak_mem_bytes: int | None = None
    timings: dict[str, Timing] = field(default_factory=dict)  # by direction, in DIRECTIONS order
    error: str | None = None

    def ms(self, direction: str) -> float | None:
        timing = self.timings.get(direction)
        return timing.ms if timing else None

    def tflops(self, direction: str) -> float | None:
        timing = self.timings.get(direction)
        return timing.tflops if timing else None

    def ratio_to(self, direction: str, ref: str) -> float | None:
        timing = self.timings.get(direction)
        return timing.ratio_to.get(ref) if timing else None

    def as_record(self) -> dict:
        record = {"kind": self.kind, **self.point.as_dict(), "provider": self.provider}
        for key in ("saved_bytes", "saved_tensors", "peak_mem_bytes"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        for direction, t in self.timings.items():
            record.update({f"{direction}_ms": t.ms, f"{direction}_ms_p20": t.p20, f"{direction}_ms_p80": t.p80,
                           f"{direction}_tflops": t.tflops})
            if t.reps is not None:
                record[f"{direction}_reps"] = t.reps
        if self.error is not None:
            record["error"] = self.error
        for direction in DIRECTIONS:
            for ref in RATIO_REFERENCES:
                record[f"{direction}_ratio_to_{ref}"] = self.ratio_to(direction, ref)
        return record


@dataclass
class SavedBytesRow:
    """One provider's activation bytes saved for backward at one point (saved_bytes.csv)."""
    KIND: ClassVar[str] = "measured-saved-bytes (meta, as on CUDA)"
    point: Point
    provider: str
    saved_bytes: int
    saved_tensors: str  # "; "-joined dtype(shape) of each saved tensor
    ratio_to_fused: float | None = None

    @property
    def saved_bytes_per_token(self) -> float:
        return self.saved_bytes / self.point.tokens

    def as_record(self) -> dict:
        return {"kind": self.KIND, **self.point.as_dict(), "provider": self.provider,
                "saved_bytes": self.saved_bytes, "saved_bytes_per_token": self.saved_bytes_per_token,
                "saved_tensors": self.saved_tensors, "ratio_to_fused": self.ratio_to_fused}


@dataclass
class ModeledRow:
    """One provider and direction at one modeled point (modeled.csv); launches are the modeled
    launches (benchmarks.roofline.ModeledLaunch), which only the JSON and --verbose list.

    us and ratio_to are the ideal table's (Triton efficiency 1.0); us_at_efficiency and
    ratio_to_at_efficiency the second table's (benchmarks.roofline.TRITON_GEMM_EFFICIENCY on Triton
    launches). host_us is measured, not modeled: the host-overhead part's Python time per layer of this
    provider (fwd+bwd rows of fused and eager only; None where not measured)."""
    point: Point
    provider: str
    direction: str
    launches: list[ModeledLaunch]
    gflop: float
    hbm_mib: float
    us: float
    tflops: float
    ratio_to: dict[str, float | None] = field(default_factory=dict)  # {ref: us / ref's us}
    gpu: str = "h100"  # benchmarks.roofline.GPUS key
    gpu_name: str = "H100 SXM"
    atomic_mib: float = 0.0
    atomics_us: float = 0.0
    triton_waves: int = 0
    triton_efficiency: float = 1.0
    us_at_efficiency: float | None = None
    ratio_to_at_efficiency: dict[str, float | None] = field(default_factory=dict)
    host_us: float | None = None

    @property
    def kind(self) -> str:
        return f"modeled-{self.gpu}"

    @property
    def host_bound(self) -> bool | None:
        """Whether the measured host time per layer exceeds the modeled GPU time (None: not measured)."""
        return None if self.host_us is None else self.host_us > self.us

    def as_record(self) -> dict:
        return {"kind": self.kind, **self.point.as_dict(), "provider": self.provider, "direction": self.direction,
                "modeled_launches": len(self.launches), "modeled_gflop": self.gflop, "modeled_hbm_mib": self.hbm_mib,
                "modeled_us": self.us, "modeled_tflops": self.tflops,
                **{f"modeled_ratio_to_{ref}": self.ratio_to.get(ref) for ref in RATIO_REFERENCES},
                "modeled_gpu": self.gpu_name, "modeled_triton_waves": self.triton_waves,
                "modeled_atomic_mib": self.atomic_mib, "modeled_atomics_us": self.atomics_us,
                "modeled_triton_efficiency": self.triton_efficiency,
                "modeled_us_at_triton_efficiency": self.us_at_efficiency,
                **{f"modeled_ratio_to_{ref}_at_triton_efficiency": self.ratio_to_at_efficiency.get(ref)
                   for ref in RATIO_REFERENCES},
                "measured_host_us": self.host_us, "modeled_host_bound": self.host_bound}


@dataclass(frozen=True)
class HostRow:
    """The host-overhead part at one dropout: minimum and median us per call of fused (kernels stubbed)
    and eager, ratio = fused / eager of the minima, kernel launches of one fused call, rounds timed."""
    dropout: float
    fused_us: float
    eager_us: float
    ratio: float
    fused_median_us: float
    eager_median_us: float
    launches_per_call: int
    rounds: int


@dataclass(frozen=True)
class HostOverhead:
    """The host-overhead part's result (host.json, points.json's host_overhead)."""
    device: str
    clock: str
    threads: int
    command: str
    shape: str
    rows: list[HostRow]  # one per dropout

    def as_record(self) -> dict:
        return asdict(self)
