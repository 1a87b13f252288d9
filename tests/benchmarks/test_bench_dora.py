"""fused-lora-bench --family dora: its rows (measured on CPU, saved bytes, modeled H100 / H200), the modeled fused
DoRA launches against the plans, and the exact saved bytes."""
import json

import pytest
import torch

from fused_lora.benchmarks import cli, dora
from fused_lora.benchmarks.sweep import Point
from fused_lora.kernels import plans


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dora")
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert cli.main(["--family", "dora", "--tiny", "--out", str(out)]) == 0
    return json.loads((out / "dora.json").read_text()), text.getvalue()


def test_dora_family_rows(tiny_run):
    data, text = tiny_run
    rows = data["rows"]
    parts = {(r["part"], r["provider"]) for r in rows}
    assert parts == {(part, p) for part in ("measured", "saved", "modeled") for p in dora.PROVIDERS}
    measured = [r for r in rows if r["part"] == "measured"]
    assert {r["direction"] for r in measured} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["p20"] <= r["ms"] <= r["p80"] and r["ms"] > 0 for r in measured)
    modeled = [r for r in rows if r["part"] == "modeled"]
    assert {r["gpu"] for r in modeled} == {"h100", "h200"}
    assert all(r["us"] > 0 and r["us_at_efficiency"] >= r["us"] for r in modeled)
    # the headline point is in the tiny sweep; the headline of both presets is in the file and printed
    assert [h["gpu"] for h in data["headline"]] == ["h100", "h200"]
    h100 = data["headline"][0]
    assert h100["dora_over_lora"] == pytest.approx(h100["fused_dora_us"] / h100["fused_lora_us"])
    assert "HEADLINE (modeled H100 SXM" in text and "HEADLINE (modeled H200 SXM" in text
    assert "[1/3] Measured CPU times (not GPU)" in text


def test_headline_targets_h100():
    """The targets on the ideal H100 table: fused DoRA within 10% of fused LoRA, PEFT's DoRA >= 2x fused DoRA."""
    h = dora.headline(gpu="h100")
    assert h["dora_over_lora"] <= dora.TARGET_DORA_OVER_LORA
    assert h["peft_over_dora"] >= dora.TARGET_PEFT_OVER_FUSED


@pytest.mark.parametrize("tokens", [1, 16, 8192])
def test_modeled_fused_dora_launches_are_the_plans(tokens):
    point = Point(4096, 4096, tokens, 16, 0.0, "bfloat16")
    M, N, K, r, dt = tokens, 4096, 4096, 16, torch.bfloat16
    fwd = plans.plan_dora_weight_norm(N, K, r, dt) + plans.plan_lora_fwd(M, N, K, r, dt, dropout=False, bias=False,
                                                                       dora=True)
    # 8192 tokens: the dX launch with the dS / dB jobs inside, then dm; 1 and 16: dy, dX, dA, dm.
    bwd = plans.plan_dora_bwd(M, N, K, r, dt, dropout=False, bias=False, deterministic=False, num_sms=132)
    assert [l.kernel for l in bwd][0] == ("_lora_bwd_dx_kernel" if tokens == 8192 else "_lora_bwd_dy_kernel")
    for direction, plan in (("fwd", fwd), ("bwd", bwd)):
        got = dora.fused_dora_launches(point, direction)
        kernels = [launch.name for launch in got if not launch.name.startswith("to(")]
        assert kernels == [launch.kernel for launch in plan]
        for launch, planned in zip(got, plan):
            assert (launch.flops, launch.bytes) == (planned.flops, planned.hbm_bytes)
    assert any(launch.kernel == "_dora_weight_norm_kernel" for launch in fwd)
    rows = {(r.provider, r.direction, r.gpu): r for r in dora.modeled(point, ("fused_dora",))}
    assert rows[("fused_dora", "fwd", "h100")].launches == len(fwd)
    casts = len(dora.fused_dora_launches(point, "bwd")) - len(bwd)
    assert rows[("fused_dora", "fwd+bwd", "h200")].launches == len(fwd) + len(bwd) + casts


def test_saved_bytes_exact():
    M, K, N, r = 256, 4096, 1024, 16
    point = Point(K, N, M, r, 0.0, "bfloat16")
    fused = dora.saved("fused_dora", point)
    # x (M x K) and S (M x r) in bf16, the output y (M x N, shared: no copy) and the fp32 norm n (N,)
    assert fused.kept_bytes == fused.saved_bytes == M * K * 2 + M * r * 2 + M * N * 2 + N * 4
    assert fused.output_bytes == M * N * 2
    peft = dora.saved("peft_dora", point)
    assert peft.kept_bytes > fused.kept_bytes
    assert peft.kept_bytes - peft.output_bytes > fused.kept_bytes - fused.output_bytes
    assert peft.saved_bytes >= peft.kept_bytes + K * K * 2  # packs eye(K) for lora_weight, dropped after forward
    lora = dora.saved("fused_lora", point)
    assert lora.kept_bytes == M * K * 2 + M * r * 2
    # with dropout: x, S' and Z = x' W^T + s S' B^T (M x N), not the output
    with_dropout = dora.saved("fused_dora", Point(K, N, M, r, 0.1, "bfloat16"))
    assert with_dropout.kept_bytes == M * K * 2 + M * r * 2 + M * N * 2 + N * 4
    assert with_dropout.output_bytes == 0


def test_peft_dora_trace_has_the_lora_weight_build():
    point = Point(256, 128, 64, 8, 0.0, "bfloat16")
    per = dora.traced_launches("peft_dora", point)
    names = [launch.name for launch in per["fwd"]]
    assert "aten.eye" in names and "aten.linalg_vector_norm" in names
    mms = [launch.flops for launch in per["fwd"] if launch.name == "aten.mm"]
    assert 2 * 256 * 256 * 8 in mms  # A(eye(K)): K x K x r
    assert sum(mms) == 2 * 64 * 128 * 256 + 2 * 256 * 256 * 8 + 2 * 256 * 8 * 128 + 2 * 64 * 8 * (256 + 128)


def test_fused_dora_with_dropout_is_modeled_from_its_plans():
    point = Point(256, 128, 64, 8, 0.1, "bfloat16")
    names = [launch.name for launch in dora.launches("fused_dora", point)["fwd+bwd"]]
    assert not any(name.startswith("aten.") for name in names)
    assert "_lora_fwd_kernel" in names and "_dora_magnitude_grad_kernel" in names


def test_unknown_provider_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--family", "dora", "--providers", "fused", "--model-only"])
    assert e.value.code == 2
    assert "fused_dora" in capsys.readouterr().err
