"""The files of a run: points.csv, modeled.csv, saved_bytes.csv, points.json (and host.json)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .rows import MeasuredRow, ModeledRow, SavedBytesRow

# The metadata every CSV row is tagged with.
_TAGS = ("mode", "device", "torch", "triton", "git_commit", "date_utc")


def write_csv(path: Path, records: list[dict], meta: dict) -> None:
    """Every record (a row's as_record()) tagged with the run's device, versions, commit and date (CSVs get
    concatenated)."""
    tagged = [{**record, **{k: meta[k] for k in _TAGS}} for record in records]
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


def write_files(out: Path, meta: dict, *, measured: list[MeasuredRow], saved: list[SavedBytesRow],
                modeled: list[ModeledRow], detailed, payload: dict) -> list[str]:
    """points.csv (measured), modeled.csv, saved_bytes.csv and points.json (all of it plus payload).

    The JSON lists each modeled fwd and bwd row's launches as [name, flops, bytes], plus the
    launch's tensors and grid where detailed(row) (the printed points: the detail is large).
    """
    measured_records = [row.as_record() for row in measured]
    saved_records = [row.as_record() for row in saved]
    modeled_records = [row.as_record() for row in modeled]
    json_modeled = []
    for row, record in zip(modeled, modeled_records):
        if row.direction != "fwd+bwd":  # fwd+bwd is the two lists one after the other
            record = {**record, "launches": [[launch.name, launch.flops, launch.bytes]
                                             + ([launch.detail] if detailed(row) else []) for launch in row.launches]}
        json_modeled.append(record)
    write_csv(out / "points.csv", measured_records, meta)
    write_csv(out / "modeled.csv", modeled_records, meta)
    write_csv(out / "saved_bytes.csv", saved_records, meta)
    write_json(out / "points.json", {"metadata": meta, **payload, "measured": measured_records,
                                     "saved_bytes": saved_records, "modeled": json_modeled})
    return ["points.csv", "points.json", "modeled.csv", "saved_bytes.csv"]
