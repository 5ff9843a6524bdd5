"""The `splan` command: estimate a deployment, plan strategies, list the catalog."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from service.catalog.loader import load_catalog, load_hf_model_config, read_structured_file
from service.cli_service import ServiceCliError, add_service_commands, run_service_command
from service.planning.catalog import Catalog
from service.planning.deployment import Mode
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.specs import PlanningError
from service.planning.workload import LengthDistribution

SERVICE_COMMANDS = ("serve", "worker", "submit", "status", "db", "openapi", "place")


class CliError(Exception):
    """Bad input on the command line: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def _length(value: str) -> LengthDistribution:
    """--isl/--osl: N, a distribution, or file:PATH[:COLUMN] sampling a CSV/JSONL column."""
    if value.startswith("file:"):
        parts = value[5:].rsplit(":", 1)
        path = Path(parts[0])
        column = parts[1] if len(parts) == 2 and not Path(value[5:]).exists() else None
        return LengthDistribution.from_samples(read_length_column(Path(value[5:]) if column is None else path, column))
    return LengthDistribution.parse(value)


def read_length_column(path: Path, column: str | None) -> list[int]:
    """Token counts from a CSV (header row) or JSONL file; the first numeric column unless named."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanningError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows: list[dict[str, Any]]
    if path.suffix in (".jsonl", ".json"):
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise PlanningError(f"cannot parse {path}: {exc.msg} at line {exc.lineno}") from None
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise PlanningError(f"{path} holds no rows")
    name = column or next((k for k, v in rows[0].items() if _is_number(v)), None)
    if name is None or name not in rows[0]:
        raise PlanningError(f"{path} has no column {column!r}" if column else f"{path} has no numeric column")
    try:
        return [int(float(row[name])) for row in rows]
    except (TypeError, ValueError):
        raise PlanningError(f"column {name!r} of {path} is not all numbers") from None


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `splan`."""
    parser = _Parser(prog="splan", description="Plan how to serve large language models.")
    parser.add_argument("--catalog", type=Path, action="append", default=[], help="extra catalog directory")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    est = sub.add_parser("estimate", help="latency and throughput of one deployment")
    est.add_argument("--model", help="catalog model name")
    est.add_argument("--model-config", type=Path, help="a Hugging Face config.json (file or directory)")
    est.add_argument("--gpu", required=True)
    est.add_argument("--engine", default="vllm")
    est.add_argument("--weight-dtype", default="bf16")
    est.add_argument("--kv-dtype", default=None)
    est.add_argument("--mode", choices=["collocated", "disagg", "disaggregated"], default="collocated")
    est.add_argument("--moe-weight-dtype", default=None, help="dtype of the routed experts (default: --weight-dtype)")
    est.add_argument("--tp", type=int, default=1, help="attention tensor parallelism per data-parallel rank")
    est.add_argument("--pp", type=int, default=1)
    est.add_argument("--attention-dp", type=int, default=1, help="attention data-parallel ranks per replica")
    est.add_argument("--moe-tp", type=int, default=None, help="slices per expert (default: tp x dp / moe-ep)")
    est.add_argument("--moe-ep", type=int, default=None, help="expert-parallel groups (default 1)")
    est.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    est.add_argument("--replicas", type=int, default=1)
    for pool in ("prefill", "decode"):
        est.add_argument(f"--{pool}-tp", type=int, default=1)
        est.add_argument(f"--{pool}-pp", type=int, default=1)
        est.add_argument(f"--{pool}-attention-dp", type=int, default=1)
        est.add_argument(f"--{pool}-moe-tp", type=int, default=None)
        est.add_argument(f"--{pool}-moe-ep", type=int, default=None)
        est.add_argument(f"--{pool}-workers", type=int, default=1)
    est.add_argument("--isl", required=True, help="N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEAN:STD, file:PATH")
    est.add_argument("--osl", required=True, help="same forms as --isl")
    load = est.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int)
    load.add_argument("--rate", type=float)
    est.add_argument("--arrival", choices=["poisson", "gamma", "constant"], default=None)
    est.add_argument("--cv", type=float, default=1.0)
    est.add_argument(
        "--client-start",
        choices=["benchmark", "burst", "staggered"],
        default="benchmark",
        help="closed loop: the benchmark client's protocol (20 requests per client, all start at t=0), "
        "all clients at t=0 (burst) or spread over one request lifetime (staggered)",
    )
    est.add_argument("--requests", type=int, default=None)
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--max-batched-tokens", type=int, default=None)
    est.add_argument("--max-seqs", type=int, default=None)
    est.add_argument("--gpu-price", type=float, default=None, help="USD per GPU-hour")
    est.add_argument("--json", action="store_true")

    pl = sub.add_parser("plan", help="rank serving strategies for a spec file")
    pl.add_argument("spec", type=Path)
    pl.add_argument("--json", action="store_true")

    cat = sub.add_parser("catalog", help="list models, GPUs or engines")
    cat.add_argument("kind", choices=["models", "gpus", "engines"])
    cat.add_argument("--json", action="store_true")
    add_service_commands(sub)
    return parser


def _estimate(args: argparse.Namespace, catalog: Catalog) -> int:
    if not args.model and not args.model_config:
        raise CliError("give --model NAME or --model-config PATH")
    model_spec = load_hf_model_config(args.model_config) if args.model_config else None
    request = EstimateRequest(
        model=args.model or (model_spec.name if model_spec else ""),
        model_spec=model_spec,
        gpu=args.gpu,
        engine=args.engine,
        weight_dtype=args.weight_dtype,
        kv_dtype=args.kv_dtype,
        mode=Mode.COLLOCATED if args.mode == "collocated" else Mode.DISAGGREGATED,
        moe_weight_dtype=args.moe_weight_dtype,
        tp=args.tp,
        pp=args.pp,
        attention_dp=args.attention_dp,
        moe_tp=args.moe_tp,
        moe_ep=args.moe_ep,
        ep=args.ep,
        replicas=args.replicas,
        prefill_tp=args.prefill_tp,
        prefill_pp=args.prefill_pp,
        prefill_attention_dp=args.prefill_attention_dp,
        prefill_moe_tp=args.prefill_moe_tp,
        prefill_moe_ep=args.prefill_moe_ep or 1,
        prefill_workers=args.prefill_workers,
        decode_tp=args.decode_tp,
        decode_pp=args.decode_pp,
        decode_attention_dp=args.decode_attention_dp,
        decode_moe_tp=args.decode_moe_tp,
        decode_moe_ep=args.decode_moe_ep,
        decode_workers=args.decode_workers,
        isl=_length(args.isl),
        osl=_length(args.osl),
        concurrency=args.concurrency,
        rate=args.rate,
        arrival=args.arrival,
        cv=args.cv,
        client_start=args.client_start,
        requests=args.requests,
        seed=args.seed,
        max_batched_tokens=args.max_batched_tokens,
        max_sequences=args.max_seqs,
        gpu_price_per_hour=args.gpu_price,
    )
    result = run_estimate(request, catalog=catalog).as_dict()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']} on {result['gpus']} x {result['gpu']} ({result['engine']}, {result['mode']})")
    print(f"layout: {json.dumps(result['layout'])}   weights {result['weight_dtype']}, KV {result['kv_dtype']}")
    print(f"{'metric':8s} {'mean':>10s} {'p50':>10s} {'p90':>10s} {'p99':>10s}")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s = result[key]
        print(f"{key:8s} {s['mean']:10.1f} {s['p50']:10.1f} {s['p90']:10.1f} {s['p99']:10.1f}")
    th = result["throughput"]
    print(
        f"throughput: {th['requests_per_s']:.2f} req/s, {th['output_tokens_per_s']:.0f} output tok/s "
        f"({th['output_tokens_per_s_per_gpu']:.0f} per GPU); bottleneck: {result['bottleneck']}"
    )
    return 0


def _plan(args: argparse.Namespace, catalog: Catalog) -> int:
    # Imported here: the plan spec's pydantic models cost a fifth of a second that estimates do not need.
    from service.planning.plan_spec import parse_plan_spec
    from service.planning.search import plan

    raw = read_structured_file(args.spec)
    request = parse_plan_spec(raw, catalog=catalog, base_dir=args.spec.parent, model_loader=load_hf_model_config)
    result = plan(request, catalog=catalog).as_dict()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    header = f"{'#':>2s} {'strategy':34s} {'gpus':>4s} {'goodput':>9s} {'/GPU':>7s} {'$/Mtok':>8s} "
    header += f"{'TTFT p90':>9s} {'TPOT p90':>9s}  bottleneck"
    print(header)
    for s in result["strategies"]:
        cost = s["cost_per_million_output_tokens_usd"]
        star = "*" if s["on_frontier"] else " "
        ttft = s.get("ttft_ms", {}).get("p90", float("nan"))
        tpot = s.get("tpot_ms", {}).get("p90", float("nan"))
        print(
            f"{s['rank']:2d}{star}{s['label']:34s} {s['gpus']:4d} {s['goodput_rps']:9.2f} {s['goodput_per_gpu']:7.3f} "
            f"{(cost if cost is not None else float('nan')):8.2f} {ttft:9.1f} {tpot:9.1f}  {s.get('bottleneck', '-')}"
        )
    print(
        f"* = Pareto frontier (goodput per GPU vs median TPOT); {result['strategies_evaluated']} simulated, "
        f"{len(result['rejected'])} pruned of {result['strategies_enumerated']} enumerated"
    )
    return 0


def _catalog(args: argparse.Namespace, catalog: Catalog) -> int:
    tables: dict[str, dict[str, Any]] = {
        "models": dict(catalog.models),
        "gpus": dict(catalog.gpus),
        "engines": dict(catalog.engines),
    }
    table = tables[args.kind]
    if args.json:
        print(json.dumps(catalog.table(args.kind), indent=2))
        return 0
    for name, spec in sorted(table.items()):
        if args.kind == "models":
            kind = "moe" if spec.moe else "dense"
            print(
                f"{name:20s} {spec.num_layers:4d} layers  hidden {spec.hidden_size:6d}  "
                f"heads {spec.num_attention_heads:3d}/"
                f"{spec.num_kv_heads:<3d} {kind}{' mla' if spec.mla else ''}"
            )
        elif args.kind == "gpus":
            print(
                f"{name:12s} {spec.memory_bytes / 1e9:6.0f} GB  {spec.hbm_bandwidth_bytes_per_s / 1e12:5.2f} TB/s  "
                f"bf16 {spec.peak_flops_per_s.get('bf16', 0) / 1e12:6.0f} TF  ${spec.price_per_hour_usd:.2f}/h"
            )
        else:
            print(f"{name:8s} {spec.description}")
    return 0


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's input: one line and exit 2 (evaluated only when something is raised)."""
    # The placement package loads only when needed: it would add a third of a second to every estimate.
    from service.placement.cluster import ClusterError

    return (CliError, PlanningError, ServiceCliError, ClusterError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `splan` console script."""
    try:
        args = build_parser().parse_args(argv)
        if args.command in SERVICE_COMMANDS:
            return run_service_command(args)
        catalog = load_catalog(tuple(args.catalog))
        handler = {"estimate": _estimate, "plan": _plan, "catalog": _catalog}[args.command]
        return handler(args, catalog)
    except _expected_errors() as exc:
        print(f"splan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
