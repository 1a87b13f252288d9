"""The files of a run: points.csv, modeled.csv, saved_bytes.csv, points.json (and host.json)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

# The metadata every CSV row is tagged with.
_TAGS = ("mode", "device", "torch", "triton", "git_commit", "date_utc")


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """Every row tagged with the run's device, versions, commit and date (CSVs get concatenated)."""
    tagged = [{**row, **{k: meta[k] for k in _TAGS}} for row in rows]
    fields: list[str] = []
    for row in tagged:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(tagged)


def write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")


def write_files(out: Path, meta: dict, *, measured: list[dict], saved: list[dict], modeled: list[dict],
                detailed, payload: dict) -> list[str]:
    """points.csv (measured), modeled.csv, saved_bytes.csv and points.json (all of it plus payload).

    The JSON lists each modeled fwd and bwd row's launches as [name, flops, bytes], plus the
    launch's tensors and grid where detailed(row) (the printed points: the detail is large).
    """
    json_modeled = []
    for row in modeled:
        clean = {k: v for k, v in row.items() if k != "_launches"}
        if row["direction"] != "fwd+bwd":  # fwd+bwd is the two lists one after the other
            clean["launches"] = [[launch.name, launch.flops, launch.bytes]
                                 + ([launch.detail] if detailed(row) else []) for launch in row["_launches"]]
        json_modeled.append(clean)
    write_csv(out / "points.csv", measured, meta)
    write_csv(out / "modeled.csv", [{k: v for k, v in row.items() if k != "_launches"} for row in modeled], meta)
    write_csv(out / "saved_bytes.csv", saved, meta)
    write_json(out / "points.json", {"metadata": meta, **payload, "measured": measured, "saved_bytes": saved,
                                     "modeled": json_modeled})
    return ["points.csv", "points.json", "modeled.csv", "saved_bytes.csv"]
