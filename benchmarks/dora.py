"""The ``dora`` family of fused-lora-bench: DoRA linear layers (``fused-lora-bench --family dora``).

Providers, all built from the same W, b, A, B, s, p (benchmarks.providers.Params) and a magnitude m:

- ``fused_dora``: fused_lora.dora_linear, its weight norm recomputed every call (the op computes
  dora_weight_norm itself when no norm is passed, as in training, where W + s B A changes every step);
- ``peft_dora``: PEFT's own DoRA layer, a ``peft.tuners.lora.Linear`` with ``LoraConfig(use_dora=True)`` built
  from an nn.Linear holding W and b (unpatched);
- ``fused_lora``: fused_lora.lora_linear (plain LoRA on the same W, A, B): the cost DoRA adds is measured
  against it.

Four parts:

1. measured on the CPU it runs on (small fp32 shapes): fwd, bwd, fwd+bwd, median [p20-p80] of every provider
   and direction timed side by side in shuffled rounds (benchmarks.measure.time_cpu_interleaved); fused_dora and
   fused_lora both run their torch paths (the DoRA op has no C++ kernel);
2. saved bytes at real sizes on meta tensors: ``saved`` is benchmarks.measure.saved_activation_bytes (every
   storage autograd packs in one forward, parameters excluded), ``kept`` the part of it still held by the graph
   once the forward has returned (PEFT's DoRA packs tensors for the N x K lora_weight, whose graph is dropped
   before the forward returns), ``output`` the part of ``kept`` that is the layer's output itself (fused DoRA
   keeps y, which the next layer holds anyway; no copy);
3. modeled on the H100 SXM and H200 SXM presets (benchmarks.roofline: the same per-launch roofline, wave factor,
   atomics and launch overhead), in an ideal table and with the Triton GEMM efficiency on Triton launches;
   fused_dora from its plans (``fused_dora_launches``), fused_lora from roofline.fused_launches, PEFT's DoRA
   from the aten ops it runs on meta tensors;
4. the headline: modeled at 8192 tokens, 4096->4096, r = 16, bf16, dropout 0: fused_dora / fused_lora fwd+bwd
   (target <= 1.10) and peft_dora / fused_dora fwd+bwd (target >= 2).

x, A, B and m require grad (x: a real layer passes dX on); W and b are frozen.
"""
from __future__ import annotations

import gc
import json
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import sweep as sw
from .providers import Layer, Params, _leaf, cuda_dropout_on_meta, make_input, torch_backend_for_cpu
from .sweep import DIRECTIONS, Point, Sweep

PROVIDERS = ("fused_dora", "peft_dora", "fused_lora")
GPU_KEYS = ("h100", "h200")
HEADLINE = Point(*sw.HEADLINE["shape"], sw.HEADLINE["tokens"], sw.HEADLINE["r"], 0.0, sw.HEADLINE["dtype"])
# The targets of the headline (ideal table): fused DoRA within 10% of fused LoRA, PEFT's DoRA at least 2x
# slower than fused DoRA.
TARGET_DORA_OVER_LORA = 1.10
TARGET_PEFT_OVER_FUSED = 2.0
SUMMARY_TOKENS = (1, 16, 256, 1024, 8192)

# {preset: (CPU sweep, modeled sweep)}. CPU: fp32 at small shapes (a bf16 1024^3 mm took 2.3 s on this
# project's 2-core CPU, 21 ms in fp32). Modeled: bf16 only (the model gives fp16 the same peak and bytes).
PRESETS = {
    "tiny": (Sweep(((64, 64),), (32,), (8,), (0.0, 0.1), ("float32",)),
             Sweep((sw.HEADLINE["shape"],), (16, 8192), (16,), (0.0, 0.1), ("bfloat16",))),
    "quick": (Sweep(((1024, 1024),), (64, 256), (16,), (0.0, 0.1), ("float32",)),
              Sweep(((4096, 4096), (4096, 14336)), SUMMARY_TOKENS, (16, 64), (0.0, 0.1), ("bfloat16",))),
    "full": (Sweep(((1024, 1024), (1024, 4096)), (64, 256, 1024), (16, 64), (0.0, 0.1), ("float32",)),
             Sweep(sw.MODEL_SHAPES, (1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384), (8, 16, 64, 128), (0.0, 0.1),
                   ("bfloat16",))),
}


@dataclass
class DoraRow:
    part: str  # "measured" | "saved" | "modeled"
    provider: str
    direction: str
    in_features: int
    out_features: int
    tokens: int
    r: int
    dropout: float
    dtype: str
    gpu: str | None = None  # modeled rows: the preset's key
    ms: float | None = None  # measured median (CPU)
    p20: float | None = None
    p80: float | None = None
    saved_bytes: int | None = None  # measure.saved_activation_bytes: every packed storage
    kept_bytes: int | None = None  # the packed storages the graph still holds after the forward
    output_bytes: int | None = None  # of kept_bytes: the output's own storage
    saved_tensors: str | None = None  # "dtype(shape)" of each kept storage
    us: float | None = None  # modeled, ideal (Triton efficiency 1.0)
    us_at_efficiency: float | None = None  # modeled, roofline.TRITON_GEMM_EFFICIENCY on Triton launches
    modeled_bytes: int | None = None
    gflop: float | None = None
    launches: int | None = None

    @classmethod
    def at(cls, part: str, provider: str, direction: str, point: Point, **values) -> "DoraRow":
        return cls(part, provider, direction, point.in_features, point.out_features, point.tokens, point.r,
                   point.dropout, point.dtype, **values)

    @property
    def point(self) -> Point:
        return Point(self.in_features, self.out_features, self.tokens, self.r, self.dropout, self.dtype)


# ---- providers -----------------------------------------------------------------------------------

def _magnitude(p: Params) -> torch.Tensor:
    """m (N,) in W's dtype, as PEFT initialises it: ||W + s B A|| per row (then training moves it; a 5% spread
    keeps g = m / n away from exactly 1, which no step after the first has)."""
    N = p.W.shape[0]
    if p.W.device.type == "meta":
        return torch.empty(N, device="meta", dtype=p.W.dtype)
    n = torch.linalg.vector_norm(p.W.float() + p.scaling * (p.B.float() @ p.A.float()), dim=1)
    g = torch.Generator(device=p.W.device).manual_seed(3)
    spread = 1 + 0.05 * torch.randn(N, generator=g, device=p.W.device)
    return (n * spread).to(p.W.dtype)


def build_fused_dora(p: Params) -> Layer:
    import fused_lora

    A, B, m = _leaf(p.A, True), _leaf(p.B, True), _leaf(_magnitude(p), True)

    def forward(x):
        return fused_lora.dora_linear(x, p.W, p.b, A, B, p.scaling, m, dropout_p=p.dropout, training=True)

    return Layer(forward, [A, B, m], [p.W, p.b, A, B, m])


def build_peft_dora(p: Params) -> Layer:
    """PEFT's lora.Linear with use_dora=True around an nn.Linear holding W and b, its A, B, m our leaves."""
    from .providers import peft_linear

    layer = peft_linear(p, use_dora=True)
    layer.lora_magnitude_vector["default"].weight = _leaf(_magnitude(p), True)
    trainable = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                 layer.lora_magnitude_vector["default"].weight]
    return Layer(layer, trainable, list(layer.parameters()))


def build_fused_lora(p: Params) -> Layer:
    from .providers import build_fused
    return build_fused(p)


BUILDERS = {"fused_dora": build_fused_dora, "peft_dora": build_peft_dora, "fused_lora": build_fused_lora}
assert tuple(BUILDERS) == PROVIDERS


def parse_providers(text: str | None) -> tuple[str, ...]:
    """--providers for this family: a comma-separated subset of PROVIDERS (ValueError on an unknown name)."""
    if text is None:
        return PROVIDERS
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown or not names:
        raise ValueError(f"unknown provider(s) {unknown or text!r} for --family dora: expected a subset of "
                         f"{','.join(PROVIDERS)}")
    return tuple(p for p in PROVIDERS if p in names)


# ---- 1. measured (CPU) ---------------------------------------------------------------------------

def measure_cpu(point: Point, providers=PROVIDERS) -> list[DoraRow]:
    """Median [p20-p80] ms per provider and direction, all timed side by side (measure.time_cpu_interleaved)."""
    from . import measure

    params = Params.make(point, "cpu")
    x, dy = make_input(point, "cpu")
    with torch_backend_for_cpu():  # both fused ops on their torch paths, not triton's interpreter
        layers = {p: BUILDERS[p](params) for p in providers}
        fns = {(p, d): f for p in providers for d, f in measure.direction_fns(layers[p], x, dy).items()}
        grads = {(p, d): layers[p].trainable + [x] for p in providers for d in DIRECTIONS}
        timed = measure.time_cpu_interleaved(fns, grads, clock=measure.cpu_clock(torch.get_num_threads())[0])
    return [DoraRow.at("measured", p, d, point, ms=med, p20=p20, p80=p80)
            for (p, d), ((med, p20, p80), _) in timed.items()]


# ---- 2. saved bytes (meta) -----------------------------------------------------------------------

class _Packed:
    """What the saved-tensors hook hands autograd: alive exactly as long as the graph node holding it."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def saved(provider: str, point: Point) -> DoraRow:
    """saved / kept / output bytes of one forward at ``point`` on meta tensors (see the module docstring)."""
    from . import measure

    params = Params.make(point, "meta")
    x, _ = make_input(point, "meta")
    with cuda_dropout_on_meta(), torch_backend_for_cpu():
        layer = BUILDERS[provider](params)
        packed_all = measure.saved_activation_bytes(layer, x).activation_bytes
        excluded = {measure.storage_key(t) for t in layer.parameters if t is not None}
        held: list[weakref.ref] = []

        def pack(t):
            box = _Packed(t)
            held.append(weakref.ref(box))
            return box

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
            y = layer.forward(x)
        gc.collect()
        kept: dict[int, tuple[int, str]] = {}
        for ref in held:
            box = ref()
            if box is not None and measure.storage_key(box.tensor) not in excluded:
                t = box.tensor
                kept.setdefault(measure.storage_key(t), (t.untyped_storage().nbytes(),
                                                         f"{str(t.dtype).replace('torch.', '')}{tuple(t.shape)}"))
        output = kept.get(measure.storage_key(y), (0, ""))[0]
        del y
    return DoraRow.at("saved", provider, "fwd", point, saved_bytes=packed_all,
                      kept_bytes=sum(n for n, _ in kept.values()), output_bytes=output,
                      saved_tensors="; ".join(d for _, d in kept.values()))


# ---- 3. modeled ----------------------------------------------------------------------------------

def fused_dora_launches(point: Point, direction: str, *, deterministic: bool | None = None,
                        num_sms: int | None = None):
    """The launches fused_lora.dora_linear makes on CUDA (fused_lora.ops.dora_triton and kernels.launchers):
    forward = plan_dora_weight_norm + plan_lora_fwd(dora=True) (+ the shrink when not fused nor made in the launch);
    backward = plan_dora_bwd (plan_lora_bwd_dy(dora=True) + plan_lora_bwd_dx(dora=True) + plan_lora_bwd_da, or the dX
    launch with the dS / dB jobs inside, then plan_dora_magnitude_grad), plus a cast fused_lora.ops.dora._as_outputs would launch for a dA or dB a plan left in fp32 (none does). With dropout
    the forward and dX loops compute both base products (x W^T and x' W^T; dY W and (g - 1) dY W)."""
    from fused_lora.kernels import plans

    from . import roofline

    dropout = point.dropout > 0.0
    deterministic = roofline.DETERMINISTIC if deterministic is None else deterministic
    num_sms = roofline.NUM_SMS if num_sms is None else num_sms
    dtype = getattr(torch, point.dtype)
    M, N, K, r = point.tokens, point.out_features, point.in_features, point.r
    fwd = plans.plan_dora_weight_norm(N, K, r, dtype) + plans.plan_lora_fwd(M, N, K, r, dtype, dropout=dropout,
                                                                            bias=point.bias, dora=True,
                                                                            num_sms=num_sms)
    bwd = plans.plan_dora_bwd(M, N, K, r, dtype, dropout=dropout, bias=point.bias, deterministic=deterministic,
                              num_sms=num_sms)
    launches = [roofline._from_plan(launch) for launch in {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]]
    return launches + (roofline.grad_casts(bwd, dtype) if direction != "fwd" else [])


def traced_launches(provider: str, point: Point) -> dict[str, list]:
    """{direction: [roofline.ModeledLaunch]} from one forward and one backward on meta tensors: every aten op
    that launches work (roofline's recorder: FLOPs from torch.utils.flop_counter, compulsory bytes).

    peft_dora at dropout 0 traces to (4096->4096, bf16; DoraLinearLayer.forward / DoraLinearVariant.forward):
      forward: mm x W^T (base layer); eye(K) (K x K); mm eye A^T (K x r, 2 K^2 r FLOPs) and mm (.) B^T (K x N):
        lora_weight = B(A(eye)).T; mul s * lora_weight and add W + (.) (two N x K passes);
        linalg_vector_norm (reads N x K); div m / n; mm x A^T, mm S B^T (lora GEMMs); sub (g - 1);
        mul (g - 1) * base, mul g * lora, mul (.) * s, add, add result + (.) (five M x N passes);
      backward: the grads of those M x N multiplies and adds (dY copies and products, M x N each), the sums over
        M for dm (through g = m / n: mul, sum, div), mm for dB, dS, dA and dX (LoRA GEMMs and dY W); the
        lora_weight chain is detached, so nothing flows back through it.
    With dropout PEFT also runs native_dropout on x and a second base GEMM F.linear(dropout(x), W).
    """
    from . import roofline

    with cuda_dropout_on_meta(), torch_backend_for_cpu():
        layer = BUILDERS[provider](Params.make(point, "meta"))
        x, dy = make_input(point, "meta")
        recorder = roofline._make_recorder()
        with recorder:
            y = layer.forward(x)
        fwd = recorder.launches
        recorder = roofline._make_recorder()
        with recorder:
            y.backward(dy)
        bwd = recorder.launches
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def launches(provider: str, point: Point) -> dict[str, list]:
    """{direction: [ModeledLaunch]} of a provider at a point (the same for both presets: both have 132 SMs)."""
    from . import roofline

    if provider == "fused_dora":
        return {d: fused_dora_launches(point, d) for d in DIRECTIONS}
    if provider == "fused_lora":
        return {d: roofline.fused_launches(point, d) for d in DIRECTIONS}
    return traced_launches(provider, point)


def modeled(point: Point, providers=PROVIDERS, gpus=GPU_KEYS) -> list[DoraRow]:
    from . import roofline

    rows = []
    e = roofline.TRITON_GEMM_EFFICIENCY
    for provider in providers:
        per = launches(provider, point)
        for key in gpus:
            gpu = roofline.GPUS[key]
            for d in DIRECTIONS:
                m = roofline.Modeled(provider, d, per[d], gpu.peak_flops[point.dtype], gpu)
                rows.append(DoraRow.at("modeled", provider, d, point, gpu=key, us=m.seconds * 1e6,
                                       us_at_efficiency=m.seconds_at(e) * 1e6, modeled_bytes=m.bytes,
                                       gflop=m.flops / 1e9, launches=len(m.launches)))
    return rows


def headline(rows: list[DoraRow] | None = None, gpu: str = "h100") -> dict:
    """fused_dora / fused_lora and peft_dora / fused_dora fwd+bwd at HEADLINE on ``gpu``, ideal and at the
    Triton efficiency (from ``rows`` when they hold the point, else modeled here)."""
    sel = {r.provider: r for r in rows or () if r.part == "modeled" and r.gpu == gpu and r.point == HEADLINE
           and r.direction == "fwd+bwd"}
    if set(sel) != set(PROVIDERS):
        sel = {r.provider: r for r in modeled(HEADLINE, gpus=(gpu,)) if r.direction == "fwd+bwd"}
    out = {"gpu": gpu, **{f"{p}_us": sel[p].us for p in PROVIDERS},
           **{f"{p}_us_at_efficiency": sel[p].us_at_efficiency for p in PROVIDERS}}
    for suffix, attr in (("", "us"), ("_at_efficiency", "us_at_efficiency")):
        dora, lora, peft = (getattr(sel[p], attr) for p in ("fused_dora", "fused_lora", "peft_dora"))
        out[f"dora_over_lora{suffix}"] = dora / lora
        out[f"peft_over_dora{suffix}"] = peft / dora
    out["targets_met"] = (out["dora_over_lora"] <= TARGET_DORA_OVER_LORA
                          and out["peft_over_dora"] >= TARGET_PEFT_OVER_FUSED)
    return out


# ---- the run -------------------------------------------------------------------------------------

def sweeps(preset: str, filters: dict | None = None) -> tuple[Sweep, Sweep]:
    """(CPU sweep, modeled sweep) of the preset: --ranks and --dropout narrow both, --shapes, --tokens and
    --dtypes the modeled one (the CPU one stays at its small fp32 sizes), as in the linear family."""
    cpu, model = PRESETS[preset]
    filters = {k: v for k, v in (filters or {}).items() if v is not None}
    cpu = cpu.with_filters({k: v for k, v in filters.items() if k in ("ranks", "dropouts")})
    model = model.with_filters(filters)
    dtypes = tuple(d for d in model.dtypes if d != "float32")  # the model's peaks are the 16-bit ones
    return cpu, replace(model, dtypes=dtypes or ("bfloat16",))


def saved_points(model: Sweep) -> list[Point]:
    """Every modeled shape, rank and dropout at the largest modeled token count (saved bytes are linear in it)."""
    return Sweep(model.shapes, (max(model.tokens),), model.ranks, model.dropouts, model.dtypes[:1]).points()


def run(preset: str = "quick", providers=PROVIDERS, *, measure: bool = True, filters: dict | None = None
        ) -> list[DoraRow]:
    cpu, model = sweeps(preset, filters)
    rows = []
    if measure:
        for point in cpu.points():
            rows += measure_cpu(point, providers)
    for point in saved_points(model):
        rows += [saved(p, point) for p in providers]
    for point in model.points():
        rows += modeled(point, providers)
    return rows


# ---- printing ------------------------------------------------------------------------------------

def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def measured_table(rows: list[DoraRow]) -> str:
    from .tables import SHORT_DTYPES, _num, format_table

    sel = [r for r in rows if r.part == "measured"]
    keys = sorted({(r.point, r.provider) for r in sel}, key=lambda k: (k[0].in_features, k[0].out_features,
                                                                        k[0].tokens, k[0].r, k[0].dropout,
                                                                        PROVIDERS.index(k[1])))
    at = {(r.point, r.provider, r.direction): r for r in sel}
    body = []
    for point, p in keys:
        cells = [f"{_num(r.ms)} [{_num(r.p20)}-{_num(r.p80)}]" if (r := at.get((point, p, d))) else "-"
                 for d in DIRECTIONS]
        lora = at.get((point, "fused_lora", "fwd+bwd"))
        mine = at.get((point, p, "fwd+bwd"))
        body.append([point.shape, point.tokens, point.r, point.dropout, SHORT_DTYPES.get(point.dtype), p, *cells,
                     _x(mine.ms / lora.ms) if mine and lora else "-"])
    return format_table(["shape", "tokens", "r", "p", "dtype", "provider", "fwd ms [p20-p80]", "bwd ms [p20-p80]",
                         "fwd+bwd ms [p20-p80]", "x fused_lora"], body, keys=6)


def saved_table(rows: list[DoraRow]) -> str:
    from .tables import MiB, _short_dtypes, format_table

    sel = [r for r in rows if r.part == "saved"]
    return format_table(
        ["shape", "tokens", "r", "p", "provider", "saved MiB", "kept MiB", "of which output", "kept beyond output",
         "kept tensors"],
        [[r.point.shape, r.tokens, r.r, r.dropout, r.provider, r.saved_bytes / MiB, r.kept_bytes / MiB,
          r.output_bytes / MiB, (r.kept_bytes - r.output_bytes) / MiB, _short_dtypes(r.saved_tensors)] for r in sel],
        keys=5)


def modeled_table(rows: list[DoraRow], gpu: str, r_: int, *, at_efficiency: bool = False) -> str:
    """fwd+bwd modeled us per shape, tokens and dropout at rank r_, and the two headline ratios."""
    from .tables import format_table

    sel = [r for r in rows if r.part == "modeled" and r.gpu == gpu and r.r == r_ and r.direction == "fwd+bwd"]
    providers = [p for p in PROVIDERS if any(r.provider == p for r in sel)]
    keys = sorted({(r.in_features, r.out_features, r.dropout, r.tokens) for r in sel})
    body = []
    for K, N, p, M in keys:
        at = {r.provider: (r.us_at_efficiency if at_efficiency else r.us) for r in sel
              if (r.in_features, r.out_features, r.dropout, r.tokens) == (K, N, p, M)}
        d, lo, pe = at.get("fused_dora"), at.get("fused_lora"), at.get("peft_dora")
        body.append([f"{K}->{N}", p, M, *[at.get(q) for q in providers],
                     _x(d / lo) if d and lo else "-", _x(pe / d) if d and pe else "-"])
    return format_table(["shape", "p", "tokens", *[f"{q} us" for q in providers], "fused_dora/fused_lora",
                         "peft_dora/fused_dora"], body, keys=3)


def detail_table(rows: list[DoraRow], point: Point, gpu: str) -> str:
    from .tables import format_table

    sel = [r for r in rows if r.part == "modeled" and r.gpu == gpu and r.point == point]
    return format_table(["provider", "direction", "launches", "GFLOP", "HBM MiB", "modeled us", "us at Triton eff."],
                        [[r.provider, r.direction, r.launches, r.gflop, r.modeled_bytes / 2**20, r.us,
                          r.us_at_efficiency] for r in sel], keys=2)


def headline_text(h: dict) -> str:
    from . import roofline

    gpu = roofline.GPUS[h["gpu"]]
    ok = lambda cond: "met" if cond else "NOT met"  # noqa: E731
    return (f"HEADLINE (modeled {gpu.name}, not measured; {HEADLINE.shape}, {HEADLINE.tokens} tokens, r={HEADLINE.r}, "
            f"bf16, dropout 0, fwd+bwd): fused_dora {h['fused_dora_us']:.1f} us, fused_lora {h['fused_lora_us']:.1f} "
            f"us, peft_dora {h['peft_dora_us']:.1f} us; fused_dora / fused_lora = {h['dora_over_lora']:.3f} "
            f"(target <= {TARGET_DORA_OVER_LORA:g}: {ok(h['dora_over_lora'] <= TARGET_DORA_OVER_LORA)}), "
            f"peft_dora / fused_dora = {h['peft_over_dora']:.2f} (target >= {TARGET_PEFT_OVER_FUSED:g}: "
            f"{ok(h['peft_over_dora'] >= TARGET_PEFT_OVER_FUSED)}). At Triton efficiency "
            f"{roofline.TRITON_GEMM_EFFICIENCY:g}: {h['dora_over_lora_at_efficiency']:.3f} and "
            f"{h['peft_over_dora_at_efficiency']:.2f}.")


def launch_lines(point: Point, providers=PROVIDERS) -> str:
    from . import roofline

    out = []
    for p in providers:
        per = launches(p, point)
        for d in ("fwd", "bwd"):
            out.append(f"  {p} {d} (modeled):")
            for launch in per[d]:
                out.append(f"    {launch.name:<28} {launch.flops / 1e9:9.3f} GFLOP {launch.bytes / 2**20:9.2f} MiB"
                           f"  {launch.seconds(roofline.H100.peak_flops[point.dtype]) * 1e6:8.2f} us (H100)")
    return "\n".join(out)


def main(args, argv, filters: dict | None = None, providers=PROVIDERS) -> int:
    """fused-lora-bench --family dora [--tiny | --quick | --full] [--model-only] [--shapes/--tokens/--ranks/
    --dropout/--dtypes] [--providers fused_dora,peft_dora,fused_lora] [--verbose] [--out DIR]."""
    from . import measure as ms
    from . import roofline
    from .layout import wrap

    preset = "tiny" if args.tiny else "full" if args.full else "quick"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    try:
        rows = run(preset, providers, measure=not args.model_only, filters=filters)
    finally:
        torch.set_num_threads(threads)
    cpu, model = sweeps(preset, filters)
    print(wrap(f"DoRA linear (fused-lora-bench {' '.join(argv)}): fused_dora = fused_lora.dora_linear (weight norm "
               "recomputed per call), peft_dora = PEFT's lora.Linear with use_dora=True, fused_lora = "
               "fused_lora.lora_linear; x, A, B and m trainable, W frozen, alpha = 2 r."))
    print()
    print(wrap(f"[1/3] Measured CPU times (not GPU): median [p20-p80] ms of the "
               f"{ms.cpu_clock(args.cpu_threads)[1]}, {args.cpu_threads} thread(s), fp32, every provider and "
               "direction timed side by side in shuffled rounds; fused_dora and fused_lora on their torch paths "
               "(no C++ DoRA kernel). Nothing here is a Triton time."))
    print(measured_table(rows) if any(r.part == "measured" for r in rows) else "  (skipped: --model-only)")
    print()
    print(wrap("[2/3] Activation bytes, exact, on meta tensors at real size (dropout dispatched as on CUDA): saved = "
               "every storage autograd packs in the forward (benchmarks.measure, parameters excluded); kept = what "
               "the graph still holds when the forward returns; of which output = the layer's own output y (no "
               "copy: the next layer holds it too)."))
    print(saved_table(rows))
    print()
    for key in GPU_KEYS:
        gpu = roofline.GPUS[key]
        print(wrap(f"[3/3] MODELED {gpu.name} (not measured), benchmarks.roofline's model: fused_dora from its plans "
                   "(with dropout both base products in one loop), fused_lora from its plans, peft_dora from "
                   "its aten ops on meta tensors. fwd+bwd us, IDEAL (Triton efficiency 1.0; the targets refer to "
                   "this table):"))
        for r_ in model.ranks[:1] if HEADLINE.r not in model.ranks else (HEADLINE.r,):
            print(modeled_table(rows, key, r_))
            print()
            print(wrap(f"  The same at a Triton GEMM efficiency of {roofline.TRITON_GEMM_EFFICIENCY:g} on the FLOP "
                       f"rate of Triton launches ({gpu.name}, r={r_}):"))
            print(modeled_table(rows, key, r_, at_efficiency=True))
            print()
    if HEADLINE in model.points():
        print(f"  modeled at the headline point ({HEADLINE.shape}, {HEADLINE.tokens} tokens, r={HEADLINE.r}, "
              f"dropout 0, bf16), H100:")
        print(detail_table(rows, HEADLINE, "h100"))
        if args.verbose:
            print(launch_lines(HEADLINE, providers))
        print()
    heads = [headline(rows, key) for key in GPU_KEYS] if set(providers) == set(PROVIDERS) else []
    for h in heads:
        print(wrap(headline_text(h)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dora.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "headline": heads,
                                               "modeled_assumptions": roofline.assumptions()}, indent=1))
    print(f"wrote dora.json to {out}/")
    return 0
