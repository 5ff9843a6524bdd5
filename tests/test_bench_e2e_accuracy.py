"""The e2e bench's layout corrections: applied only where every match column agrees, each with its source."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from bench.e2e_accuracy import apply_corrections

REPO = Path(__file__).resolve().parents[1]


def test_a_correction_sets_its_columns_only_where_every_match_column_agrees() -> None:
    doc = {"corrections": [{"match": {"model": "m", "measured_date": "d1"}, "set": {"moe_ep_size": "4"}}]}
    rows = [
        {"model": "m", "measured_date": "d1", "moe_ep_size": "16"},
        {"model": "m", "measured_date": "d2", "moe_ep_size": "16"},
        {"model": "n", "measured_date": "d1", "moe_ep_size": "16"},
    ]
    fixed, changed = apply_corrections(rows, doc)
    assert changed == 1
    assert [r["moe_ep_size"] for r in fixed] == ["4", "16", "16"]
    assert rows[0]["moe_ep_size"] == "16"
    # An empty corrections file changes nothing.
    assert apply_corrections(rows, None) == (rows, 0)


def test_the_committed_corrections_give_consistent_layouts_with_a_source(reference_dir: Path) -> None:
    doc = yaml.safe_load((REPO / "bench" / "data" / "reference_corrections.yaml").read_text(encoding="utf-8"))
    assert all(entry["why"].strip() for entry in doc["corrections"])
    with (reference_dir / "e2e_h100_sxm.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    fixed, changed = apply_corrections(rows, doc)
    assert changed == 15
    for before, after in zip(rows, fixed, strict=True):
        if before != after:
            assert after["model"] == "MiniMax-M2.5"
            gpus = float(after["tp_size"]) * float(after["attention_dp_size"])
            assert gpus == float(after["moe_tp_size"]) * float(after["moe_ep_size"]) == 4.0
