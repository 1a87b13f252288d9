"""fused-lora-bench --family embedding: its rows (measured on CPU, saved bytes, modeled) at the tiny preset."""
import json

from fused_lora.benchmarks import cli, embedding


def test_embedding_family_rows(tmp_path, capsys):
    assert cli.main(["--family", "embedding", "--tiny", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "embedding.json").read_text())
    parts = {(r["part"], r["provider"]) for r in rows}
    assert parts == {(part, p) for part in ("measured", "saved", "modeled") for p in embedding.PROVIDERS}
    assert all(r["ms"] > 0 for r in rows if r["part"] == "measured" and r["provider"] != "embedding")
    saved = {(r["provider"], r["tokens"], r["r"]): r["saved_bytes"] for r in rows if r["part"] == "saved"}
    for (provider, M, r), n in saved.items():
        if provider == "fused":  # ids (int64) and S = A^T[ids] (bf16): nothing else
            assert n == M * 8 + M * r * 2
    modeled = {(r["provider"], r["direction"], r["tokens"]): r for r in rows if r["part"] == "modeled"}
    fwd = modeled[("fused", "fwd", 4096)]
    assert fwd["launches"] == 1
    # One pass: the fused forward moves about what a plain nn.Embedding gather does (+ the rank-r terms).
    assert fwd["modeled_bytes"] < 1.1 * modeled[("embedding", "fwd", 4096)]["modeled_bytes"]
    assert fwd["ms"] < modeled[("peft", "fwd", 4096)]["ms"]
    assert "LoRA for Embedding" in capsys.readouterr().out
