"""DeepSeek-R1 H100 rows scored under the configurations InferenceX ran them with (issue 11).

Usage: python -m bench.deepseek_configs [--reference DIR] [--jobs 2] [--acceptance-rate 0.85]

The 92 DeepSeek-R1 rows of e2e_h100_sxm.csv (Dynamo SGLang and TRT-LLM, disaggregated) record neither speculative
decoding nor worker counts, and bench/e2e_accuracy.py runs them without MTP, one worker per pool and the engines'
defaults. bench/data/inferencex_deepseek_r1_h100.yaml holds what InferenceX ran at the measurement dates (its
config and the recipes it names): per (engine, ISL, OSL, concurrency) one or two variants, STP and MTP, with their
worker counts, layouts, token budgets, batch limits and draft tokens. A row is scored under its variant when the
config names one; where it names STP and MTP and the row's configuration was measured twice with different TPOT,
the faster run is the MTP one; where it names both and only one value was kept, the row is ambiguous and shown
under both. SGLang's dp-attention variants are left out: every SGLang row records a TP decode layout. MTP runs
take an acceptance length from a per-draft acceptance rate a (1 + a + a^2 + ...; the DeepSeek-V3 report gives 85-90%
for the second token), not fitted on these rows.
"""

from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from bench.e2e_accuracy import ape, default_reference_dir, request_for_row
from service.catalog.loader import default_catalog
from service.planning.catalog import Catalog
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.specs import SpeculativeDecoding

VARIANTS = Path(__file__).resolve().parent / "data" / "inferencex_deepseek_r1_h100.yaml"


def acceptance_length(draft_tokens: int, rate: float) -> float:
    """Mean tokens gained per step when each draft is accepted with ``rate`` given the ones before it."""
    return sum(rate**i for i in range(draft_tokens + 1))


def variant_engine(catalog: Catalog, variant: dict[str, Any], index: int) -> tuple[Catalog, str]:
    """The catalog with this variant's engine settings as an engine of its own, and that engine's name."""
    base = catalog.engine(variant["backend"])
    engine = replace(
        base,
        name=f"{base.name}-inferencex-{index}",
        cuda_graph_max_batch=variant["decode"]["cuda_graph_max_batch"] or base.cuda_graph_max_batch,
        speculative_overlap=bool(variant["overlap_with_speculation"]) or base.speculative_overlap,
    )
    return replace(catalog, engines={**catalog.engines, engine.name: engine}), engine.name


def variant_request(row: dict[str, str], variant: dict[str, Any], engine: str, rate: float) -> EstimateRequest:
    """The row's request (client protocol and lengths as in e2e_accuracy) under the variant's configuration."""
    prefill, decode, drafts = variant["prefill"], variant["decode"], int(variant["draft_tokens"])
    return replace(
        request_for_row(row),
        engine=engine,
        kv_dtype=None if variant["kv_dtype"] == "auto" else str(variant["kv_dtype"]),
        prefill_workers=prefill["workers"],
        prefill_tp=prefill["tp"],
        prefill_attention_dp=prefill["attention_dp"],
        prefill_moe_ep=prefill["moe_ep"],
        prefill_moe_tp=prefill["tp"] * prefill["attention_dp"] // prefill["moe_ep"],
        decode_workers=decode["workers"],
        decode_tp=decode["tp"],
        decode_attention_dp=decode["attention_dp"],
        decode_moe_ep=decode["moe_ep"],
        decode_moe_tp=decode["tp"] * decode["attention_dp"] // decode["moe_ep"],
        max_batched_tokens=prefill["max_batched_tokens"],
        max_sequences=decode["max_sequences"],
        speculative=SpeculativeDecoding("mtp", drafts, acceptance_length(drafts, rate)) if drafts else None,
    )


def predict(job: tuple[int, dict[str, str], int, float]) -> tuple[int, int, float, float]:
    """(row, variant, TTFT ms, TPOT ms) of one row under one variant (-1: the headline assumptions)."""
    row_index, row, variant_index, rate = job
    catalog = default_catalog()
    if variant_index < 0:
        result = run_estimate(request_for_row(row), catalog=catalog).result
    else:
        variant = load_variants()[variant_index]
        catalog, engine = variant_engine(catalog, variant, variant_index)
        result = run_estimate(variant_request(row, variant, engine, rate), catalog=catalog).result
    return row_index, variant_index, result.ttft.mean, result.tpot.mean


@functools.cache
def load_variants() -> list[dict[str, Any]]:
    """The InferenceX variants, SGLang's dp-attention ones left out."""
    variants: list[dict[str, Any]] = yaml.safe_load(VARIANTS.read_text(encoding="utf-8"))["variants"]
    return [v for v in variants if not (v["backend"] == "sglang" and v["decode"]["attention_dp"] > 1)]


def assign(rows: list[dict[str, str]]) -> dict[int, tuple[str, list[int]]]:
    """Per row: how its variant was found (config, order, ambiguous) and the variant indexes it is scored under."""
    by_key: dict[tuple[str, int, int, int], list[int]] = defaultdict(list)
    for index, variant in enumerate(load_variants()):
        for concurrency in variant["concurrencies"]:
            by_key[(variant["backend"], variant["isl"], variant["osl"], concurrency)].append(index)
    groups: dict[tuple[str, int, int, int], list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        key = (row["backend"], int(row["isl"]), int(row["osl"]), int(float(row["concurrency"])))
        groups[key].append(index)
    out: dict[int, tuple[str, list[int]]] = {}
    for key, members in groups.items():
        candidates = by_key.get(key, [])
        if len(candidates) == 1:
            out.update(dict.fromkeys(members, ("config", candidates)))
            continue
        speculative = [c for c in candidates if load_variants()[c]["draft_tokens"] > 0]
        plain = [c for c in candidates if load_variants()[c]["draft_tokens"] == 0]
        values = sorted({round(float(rows[m]["tpot_ms"]), 6) for m in members})
        if len(speculative) == 1 and len(plain) == 1 and len(values) == 2:
            for m in members:
                faster = round(float(rows[m]["tpot_ms"]), 6) == values[0]
                out[m] = ("order", speculative if faster else plain)
        else:
            out.update(dict.fromkeys(members, ("ambiguous", candidates)))
    return out


def main() -> int:
    """Print each row's measured and predicted TPOT/TTFT, then median errors per engine and assignment."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--acceptance-rate", type=float, default=0.85)
    args = parser.parse_args()
    path = args.reference / "e2e_h100_sxm.csv"
    rows = [r for r in csv.DictReader(path.open()) if r["model"] == "DeepSeek-R1"]
    assigned = assign(rows)
    jobs = [(i, row, -1, args.acceptance_rate) for i, row in enumerate(rows)]
    jobs += [(i, row, v, args.acceptance_rate) for i, row in enumerate(rows) for v in assigned[i][1]]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        predictions = pool.map(predict, jobs, chunksize=1)
    elapsed = time.perf_counter() - started
    got = {(r, v): (ttft, tpot) for r, v, ttft, tpot in predictions}
    print(
        "engine  isl/osl    conc  how        measured TPOT/TTFT ms  headline TPOT/TTFT ms  "
        "recovered (draft tokens, P x D workers): TPOT/TTFT ms"
    )
    errors: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["backend"], rows[i]["isl"], float(rows[i]["concurrency"])))
    for i in order:
        row, (how, variants) = rows[i], assigned[i]
        tpot, ttft = float(row["tpot_ms"]), float(row["ttft_ms"])
        head_ttft, head_tpot = got[(i, -1)]
        cells = []
        for v in variants:
            variant = load_variants()[v]
            p_ttft, p_tpot = got[(i, v)]
            workers = f"{variant['prefill']['workers']}x{variant['decode']['workers']}"
            cells.append(f"(k{variant['draft_tokens']}, {workers}): {p_tpot:6.2f}/{p_ttft:8.1f}")
            if how != "ambiguous":
                errors[(row["backend"], how, "recovered tpot")].append(ape(p_tpot, tpot))
                errors[(row["backend"], how, "recovered ttft")].append(ape(p_ttft, ttft))
        errors[(row["backend"], how, "headline tpot")].append(ape(head_tpot, tpot))
        errors[(row["backend"], how, "headline ttft")].append(ape(head_ttft, ttft))
        print(
            f"{row['backend']:7s} {row['isl']:>4s}/{row['osl']:<5s} {float(row['concurrency']):5.0f}  {how:9s}  "
            f"{tpot:8.2f}/{ttft:10.1f}  {head_tpot:8.2f}/{head_ttft:10.1f}  {'; '.join(cells)}"
        )
    print()
    print("engine  rows found by  rows  headline TPOT  recovered TPOT  headline TTFT  recovered TTFT (median APE)")
    for backend in ("sglang", "trtllm"):
        for how in ("config", "order", "ambiguous"):
            head = errors.get((backend, how, "headline tpot"), [])
            if not head:
                continue
            rec_tpot = errors.get((backend, how, "recovered tpot"), [])
            rec_ttft = errors.get((backend, how, "recovered ttft"), [])
            print(
                f"{backend:7s} {how:13s} {len(head):5d}  {statistics.median(head):12.1f}%  "
                f"{(statistics.median(rec_tpot) if rec_tpot else float('nan')):13.1f}%  "
                f"{statistics.median(errors[(backend, how, 'headline ttft')]):12.1f}%  "
                f"{(statistics.median(rec_ttft) if rec_ttft else float('nan')):13.1f}%"
            )
    resolved = [e for (_, how, what), v in errors.items() if how != "ambiguous" and what == "recovered tpot" for e in v]
    headline = [e for (_, how, what), v in errors.items() if how != "ambiguous" and what == "headline tpot" for e in v]
    resolved_ttft = [
        e for (_, how, what), v in errors.items() if how != "ambiguous" and what == "recovered ttft" for e in v
    ]
    headline_ttft = [
        e for (_, how, what), v in errors.items() if how != "ambiguous" and what == "headline ttft" for e in v
    ]
    print(
        f"all resolved  {len(resolved):5d}  {statistics.median(headline):12.1f}%  "
        f"{statistics.median(resolved):13.1f}%  "
        f"{statistics.median(headline_ttft):12.1f}%  {statistics.median(resolved_ttft):13.1f}%"
    )
    print(f"{len(jobs)} estimates in {elapsed:.1f} s ({args.jobs} jobs), acceptance rate {args.acceptance_rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
