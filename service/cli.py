"""The `splan` command: estimate a deployment, plan strategies, list the catalog."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TextIO

from service.catalog.loader import load_catalog, load_hf_model_config, read_structured_file, read_text_file
from service.cli_service import ServiceCliError, add_command, add_service_commands, run_service_command
from service.planning.catalog import Catalog
from service.planning.deployment import Mode
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.moe_cost import MOE_BACKEND_HELP, MOE_BACKENDS, MOE_ROUTING_HELP, SERVED_ROUTINGS
from service.planning.specs import PlanningError, SpeculativeDecoding, spec_kind
from service.planning.workload import LengthDistribution

SERVICE_COMMANDS = ("serve", "worker", "submit", "status", "db", "openapi", "place", "keys", "tenants")


class CliError(Exception):
    """Bad input on the command line: one line on stderr, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" where the help text does not already give the default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        # Flags (nargs 0) default to off, and a None default needs words that only the help text can give.
        if "default" in text or action.nargs == 0 or action.required or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                # Each line is its own document: the decoder's line is always 1, the file's is this one.
                raise PlanningError(f"cannot parse {path}: {exc.msg} at line {number}") from None
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
    parser.add_argument(
        "--catalog",
        type=Path,
        action="append",
        default=[],
        help="extra catalog directory, repeatable (default: none; also $SPLAN_CATALOG_PATH)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    est = add_command(sub, "estimate", "latency and throughput of one deployment")
    est.add_argument("--model", help="catalog model name (default: none; give --model or --model-config)")
    est.add_argument("--model-config", type=Path, help="a Hugging Face config.json, file or directory (default: none)")
    est.add_argument("--gpu", required=True, help="catalog GPU name (see `splan catalog gpus`)")
    est.add_argument("--engine", default="vllm", help="catalog engine (see `splan catalog engines`)")
    est.add_argument("--weight-dtype", default="bf16", help="dtype of the weights")
    est.add_argument("--kv-dtype", default=None, help="dtype of the KV cache (default: the engine's for the weights)")
    est.add_argument(
        "--mode",
        choices=["collocated", "disagg", "disaggregated"],
        default="collocated",
        help="prefill and decode on the same GPUs, or in separate pools",
    )
    est.add_argument("--moe-weight-dtype", default=None, help="dtype of the routed experts (default: --weight-dtype)")
    est.add_argument("--tp", type=int, default=1, help="attention tensor parallelism per data-parallel rank")
    est.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    est.add_argument("--attention-dp", type=int, default=1, help="attention data-parallel ranks per replica")
    est.add_argument("--moe-tp", type=int, default=None, help="slices per expert (default: tp x dp / moe-ep)")
    est.add_argument("--moe-ep", type=int, default=None, help="expert-parallel groups (default: 1)")
    est.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    est.add_argument("--replicas", type=int, default=1, help="identical replicas behind a round-robin router")
    for pool in ("prefill", "decode"):
        est.add_argument(f"--{pool}-tp", type=int, default=1, help=f"disagg: {pool} workers' attention TP")
        est.add_argument(f"--{pool}-pp", type=int, default=1, help=f"disagg: {pool} workers' pipeline stages")
        est.add_argument(
            f"--{pool}-attention-dp", type=int, default=1, help=f"disagg: {pool} workers' attention-DP ranks"
        )
        est.add_argument(
            f"--{pool}-moe-tp", type=int, default=None, help=f"disagg: {pool} slices per expert (default: as --moe-tp)"
        )
        est.add_argument(
            f"--{pool}-moe-ep", type=int, default=None, help=f"disagg: {pool} expert-parallel groups (default: 1)"
        )
        est.add_argument(f"--{pool}-workers", type=int, default=1, help=f"disagg: {pool} workers")
    est.add_argument(
        "--isl",
        help="input tokens: N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEAN:STD or file:PATH[:COLUMN] (resamples "
        "one column; --trace keeps each request's pair) (no default: give --isl and --osl, or --trace)",
    )
    est.add_argument("--osl", help="output tokens, same forms as --isl (no default)")
    load = est.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=int, help="closed loop: this many clients (no default: give --concurrency or --rate)"
    )
    load.add_argument(
        "--rate",
        type=float,
        help="open loop: requests per second; with --trace, the mean rate to rescale it to "
        "(no default: give --concurrency or --rate)",
    )
    est.add_argument(
        "--trace",
        type=Path,
        default=None,
        metavar="FILE",
        help="replay requests as recorded (CSV/JSONL: arrival_s, input_tokens, output_tokens, optional prefix_id or "
        "session_id; common other names accepted) instead of --isl/--osl and a load (default: none)",
    )
    est.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="with --trace: factor on its time offsets, 0.5 = twice the recorded rate (default: 1)",
    )
    est.add_argument(
        "--shared-prefix-tokens",
        type=int,
        default=0,
        help="leading prompt tokens that requests share (a system prompt), reused when prefix caching is on",
    )
    est.add_argument(
        "--prefix-hit-rate",
        type=float,
        default=1.0,
        help="share of the requests that start with the shared prefix",
    )
    est.add_argument(
        "--prefix-cache-warm",
        action="store_true",
        help="the prefix cache starts holding every shared prefix, as on a server that served this traffic before "
        "(default: a fresh server, whose first request of each prefix prefills it whole)",
    )
    est.add_argument(
        "--arrival",
        choices=["poisson", "gamma", "constant"],
        default=None,
        help="open loop: inter-arrival law (default: poisson)",
    )
    est.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma inter-arrival times")
    est.add_argument(
        "--client-start",
        choices=["benchmark", "burst", "staggered"],
        default="benchmark",
        help="closed loop: the benchmark client's protocol (20 requests per client, all start at t=0), "
        "all clients at t=0 (burst) or spread over one request lifetime (staggered)",
    )
    est.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests to simulate (default: 20 per client in the benchmark protocol, 8 per client in other "
        "closed loops (64 to 2000), 600 open loop)",
    )
    est.add_argument(
        "--requests-per-client",
        type=int,
        default=None,
        help="closed loop, benchmark protocol: requests each client sends (default: 20 as aiperf sweeps; 10 for "
        "`vllm bench serve --num-prompts 10C` / InferenceX sweeps)",
    )
    est.add_argument("--seed", type=int, default=0, help="random seed of lengths and arrivals")
    est.add_argument(
        "--max-batched-tokens", type=int, default=None, help="engine token budget per step (default: the engine's)"
    )
    est.add_argument("--max-seqs", type=int, default=None, help="engine sequences per step (default: the engine's)")
    est.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="share of GPU memory the engine takes (default: the engine's, 0.9 for vLLM)",
    )
    est.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest request (prompt + output) the engine accepts; longer ones are refused, and one must fit in the "
        "KV cache (default: the longest request of the workload)",
    )
    est.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="automatic prefix caching (default: the engine's; on for vLLM V1, SGLang and TRT-LLM)",
    )
    est.add_argument("--kv-block-size", type=int, default=None, help="tokens per KV-cache block (default: 16)")
    est.add_argument(
        "--speculative",
        default=None,
        metavar="METHOD:DRAFT_TOKENS:ACCEPTANCE_LENGTH",
        help="speculative decoding as the engine runs it, e.g. mtp:3:2.4 (methods mtp, eagle, eagle3; acceptance "
        "length = mean tokens gained per step, as the engine logs it) (default: off)",
    )
    est.add_argument(
        "--router",
        choices=["round_robin", "random", "least_loaded"],
        default="round_robin",
        help="how --replicas (and attention-DP ranks) share the requests",
    )
    est.add_argument(
        "--moe-routing",
        choices=list(SERVED_ROUTINGS),
        default=None,
        help=f"{MOE_ROUTING_HELP} (default: random)",
    )
    est.add_argument(
        "--moe-backend", choices=list(MOE_BACKENDS), default=None, help=f"{MOE_BACKEND_HELP} (default: auto)"
    )
    est.add_argument("--gpu-price", type=float, default=None, help="USD per GPU-hour (default: the catalog's)")
    est.add_argument(
        "--profile", type=Path, default=None, help="calibration profile from `splan calibrate` (default: none)"
    )
    est.add_argument("--json", action="store_true", help="print the result as JSON")

    pl = add_command(
        sub,
        "plan",
        "rank serving strategies for a plan spec, or size and pack a fleet spec (kind: fleet)",
    )
    pl.add_argument("spec", type=Path, help="plan or fleet spec, YAML or JSON (see examples/)")
    pl.add_argument("--json", action="store_true", help="print the result as JSON (as the API stores it)")
    pl.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="calibration profile from `splan calibrate`; replaces the spec's `profile` (default: the spec's)",
    )
    pl.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="FILE.html",
        help="also write a self-contained HTML report of the plan (or fleet plan) to this file (default: none)",
    )
    pl.add_argument(
        "--emit-launch",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write launch scripts (vLLM, SGLang, TRT-LLM) and Kubernetes manifests for the chosen strategy "
        "(default: none)",
    )
    pl.add_argument(
        "--strategy",
        type=int,
        default=1,
        metavar="N",
        help="with --emit-launch: the rank of the strategy to launch",
    )
    pl.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="fleet specs: run the candidate searches on N local processes (default: 1, in this process)",
    )
    pl.add_argument(
        "--no-cache",
        action="store_true",
        help="fleet specs: neither read nor store candidate searches in the embedded database (default: both, in "
        "the database of DATABASE_URL, else $SPLAN_DATA_DIR/splan.db)",
    )

    pw = add_command(sub, "prewarm", "which checkpoints to copy into which server tier now, and keep-alive per model")
    pw.add_argument("--cluster", type=Path, required=True, help="cluster state, YAML or JSON")
    pw.add_argument(
        "--rates",
        type=Path,
        required=True,
        help="YAML or JSON list of {model, checkpoint, tp, rate_per_s} (recent rates or a forecast)",
    )
    pw.add_argument("--copy-s", type=float, default=120.0, help="seconds of copying each server may do now")
    pw.add_argument("--keep-alive-s", type=float, default=60.0, help="keep-alive whose idle GPU-seconds are the budget")
    pw.add_argument("--json", action="store_true", help="print the advice as JSON")

    cat = add_command(sub, "catalog", "list models, GPUs or engines")
    cat.add_argument("kind", choices=["models", "gpus", "engines"], help="which table")
    cat.add_argument("--json", action="store_true", help="print the table as JSON")
    cat.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="FILE",
        help="gpus: check a GPU catalog file (gpus.yaml shape) for missing or implausible numbers (default: none)",
    )

    cal = add_command(sub, "calibrate", "fit a calibration profile on your own measurements")
    cal.add_argument(
        "measured",
        type=Path,
        nargs="+",
        metavar="MEASURED",
        help="benchmark rows (CSV/JSONL: model, isl, osl, concurrency or rate, layout, ttft_ms, tpot_ms), per-request "
        "records (CSV/JSONL, `vllm bench serve --save-detailed` JSON, aiperf profile_export.jsonl) or kernel tables "
        "(NAME_gemm.csv, ... as in the reference data)",
    )
    cal.add_argument("-o", "--out", type=Path, required=True, metavar="PROFILE.yaml", help="where to write the profile")
    cal.add_argument("--gpu", required=True, help="catalog GPU the measurements ran on")
    cal.add_argument("--engine", default=None, help="catalog engine (default: the rows' backend, else vllm)")
    cal.add_argument("--model", default=None, help="catalog model (default: the rows' model; required for records)")
    cal.add_argument(
        "--fit",
        default=None,
        help="comma-separated parameters to fit, each must be identifiable (default: the identifiable ones of "
        "memory_bandwidth, compute, request_overhead_s, step_overhead_s, per_sequence_overhead_s, step_gap_s, "
        "collective_bandwidth)",
    )
    cal.add_argument("--tp", type=int, default=1, help="records: tensor parallelism of the measured deployment")
    cal.add_argument("--pp", type=int, default=1, help="records: pipeline stages of the measured deployment")
    cal.add_argument("--weight-dtype", default="bf16", help="records: dtype of the weights")
    cal.add_argument(
        "--max-batched-tokens",
        type=int,
        default=None,
        help="records: engine token budget per step (default: the engine's)",
    )
    cal.add_argument(
        "--max-seqs", type=int, default=None, help="records: engine sequences per step (default: the engine's)"
    )
    cal.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget of the fit in seconds (default 20; reading, reporting and the simulation under way when "
        "it runs out come on top)",
    )
    cal.add_argument(
        "--budget-steps",
        type=int,
        default=None,
        help="bound the fit by simulated work (sequence-steps) instead of time: the same result on any machine "
        "(default: none, --budget-s applies)",
    )
    cal.add_argument("--json", action="store_true", help="print the fit report as JSON")
    add_service_commands(sub)
    return parser


def _estimate_trace(args: argparse.Namespace) -> Any:
    """The --trace file read (None without one); refuses --trace beside --isl/--osl/--concurrency, or neither."""
    if args.trace is None:
        if args.isl is None or args.osl is None:
            raise CliError("the following arguments are required: --isl and --osl (or --trace FILE)")
        if args.concurrency is None and args.rate is None:
            raise CliError("one of the arguments --concurrency --rate is required (or --trace FILE)")
        return None
    if args.isl is not None or args.osl is not None or args.concurrency is not None:
        raise CliError("--trace brings each request's lengths and arrival: leave out --isl, --osl and --concurrency")
    from service.planning.trace import read_trace

    return read_trace(args.trace)


def _trace_lines(result: Mapping[str, Any]) -> list[str]:
    """What the output says about a replayed trace, prefix caching and refused requests."""
    lines = []
    trace = result.get("trace")
    if trace:
        columns = ", ".join(f"{role}={name}" for role, name in trace["columns"].items())
        lines.append(
            f"trace: {trace['source']}, {trace['requests']} requests over {trace['duration_s']:.1f} s "
            f"({trace['rate_per_s']:.3g} req/s recorded, time scale {trace['time_scale']:.3g}); columns {columns}"
        )
    cache = result.get("prefix_cache") or {}
    if cache.get("hit_tokens"):
        lines.append(
            f"prefix cache: {cache['hit_tokens']} prompt tokens reused ({cache['hit_rate']:.0%} of the prompts "
            "that share a prefix)"
        )
    if result.get("refused_requests"):
        lines.append(f"refused: {result['refused_requests']} requests longer than max_model_len")
    return lines


def _speculative(text: str) -> SpeculativeDecoding:
    """METHOD:DRAFT_TOKENS:ACCEPTANCE_LENGTH as given to --speculative."""
    parts = text.split(":")
    try:
        method, drafts, accepted = parts
        return SpeculativeDecoding(method.strip().lower(), int(drafts), float(accepted))
    except ValueError:
        raise CliError(
            f"--speculative takes METHOD:DRAFT_TOKENS:ACCEPTANCE_LENGTH, e.g. mtp:3:2.4 (got {text!r})"
        ) from None


def _estimate(args: argparse.Namespace, catalog: Catalog) -> int:
    trace = _estimate_trace(args)
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
        isl=None if args.isl is None else _length(args.isl),
        osl=None if args.osl is None else _length(args.osl),
        trace=trace,
        time_scale=args.time_scale,
        shared_prefix_tokens=args.shared_prefix_tokens,
        prefix_hit_rate=args.prefix_hit_rate,
        prefix_cache_warm=args.prefix_cache_warm,
        memory_fraction=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        prefix_caching=args.enable_prefix_caching,
        kv_block_tokens=args.kv_block_size,
        speculative=None if args.speculative is None else _speculative(args.speculative),
        router=args.router,
        moe_routing=args.moe_routing,
        moe_backend=args.moe_backend,
        concurrency=args.concurrency,
        rate=args.rate,
        arrival=args.arrival,
        cv=args.cv,
        client_start=args.client_start,
        requests_per_client=args.requests_per_client,
        requests=args.requests,
        seed=args.seed,
        max_batched_tokens=args.max_batched_tokens,
        max_sequences=args.max_seqs,
        gpu_price_per_hour=args.gpu_price,
        profile=_read_profile(args.profile) if args.profile else None,
    )
    result = run_estimate(request, catalog=catalog).as_dict()
    _print_warnings(result.get("warnings", []))
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
    for line in _trace_lines(result):
        print(line)
    if result.get("truncated"):
        print(f"truncated: {result['truncated_reason']}")
    return 0


def _read_profile(path: Path) -> dict[str, Any]:
    """A profile file, validated (one-line error otherwise)."""
    from service.plans_service import read_profile

    return read_profile(path)


def _print_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"splan: warning: {warning}", file=sys.stderr)


def _plan(args: argparse.Namespace, catalog: Catalog) -> int:
    from service.plans_service import inline_spec_files

    raw = read_structured_file(args.spec)
    if not isinstance(raw, dict):
        raise PlanningError(f"{args.spec} must hold a mapping (a plan spec or a fleet spec)")
    if args.profile is not None:
        raw["profile"] = _read_profile(args.profile)
    config_path = raw.get("model_config") if isinstance(raw.get("model_config"), str) else None
    # Paths in a spec file (trace, profile, model_config) are read here and stored inline with the plan, as
    # `splan submit` sends them: the worker never reads files.
    raw = inline_spec_files(raw, args.spec.parent)
    if spec_kind(raw) == "fleet":
        return _plan_fleet(args, catalog, raw)
    return _plan_strategies(args, catalog, {k: v for k, v in raw.items() if k != "kind"}, config_path)


def _plan_strategies(
    args: argparse.Namespace, catalog: Catalog, raw: dict[str, Any], config_path: str | None = None
) -> int:
    # Imported here: the plan spec's pydantic models and the job runner cost time that estimates do not need.
    from service.jobs import execute_spec
    from service.planning.plan_spec import PlanSpec, parse_plan_spec

    request = parse_plan_spec(raw, catalog=catalog)
    run_catalog = catalog
    if raw.get("model_config"):
        # Launch files and reports look the model up by name: the inline config joins this run's catalog.
        run_catalog = replace(catalog, models={**catalog.models, request.model.name.strip().lower(): request.model})
    with ProgressReporter(f"planning {request.model.name} on {request.gpu}") as progress:
        result, _ = execute_spec("strategy", raw, catalog=run_catalog, progress=progress)
    _print_warnings(result.get("warnings", []))
    _write_plan_outputs(args, raw, result, catalog=run_catalog)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    shown = PlanSpec.model_validate(raw)
    best = result["strategies"][0] if result["strategies"] else None
    kv = shown.kv_dtype or (f"{best['kv_dtype']} (the engine's default)" if best else "the engine's default")
    model = request.model.name + (f" (config {config_path})" if config_path else "")
    print(
        f"model:    {model} on {shown.gpu}, at most {shown.max_gpus} GPUs; engine {shown.engine}, "
        f"weights {shown.weight_dtype}, KV cache {kv}"
    )
    print(f"workload: {_workload_text(shown.workload)}, {shown.search.requests} requests per simulation")
    print(f"SLOs:     {_slo_text(shown.slo)} (goodput: the highest request rate that meets them)")
    search = shown.search
    extra = f"; attention DP {_join(search.attention_dp)}" if search.attention_dp else ""
    print(f"searched: modes {_join(search.modes)}; TP {_join(search.tp)}; PP {_join(search.pp)}{extra}")
    print()
    for line in strategy_table(result["strategies"]):
        print(line)
    for line in plan_verdict(result):
        print(line)
    return 0


def _write_plan_outputs(
    args: argparse.Namespace, spec: dict[str, Any], result: dict[str, Any], *, catalog: Catalog, fleet: bool = False
) -> None:
    """Write the HTML report and the launch bundle a plan command asked for; say where on stderr."""
    if args.report is not None:
        # Imported here: matplotlib costs half a second that plans without a report do not need.
        from service.reporting import render_fleet_report, render_plan_report

        render = render_fleet_report if fleet else render_plan_report
        try:
            args.report.write_text(render(spec, result), encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write the report to {args.report}: {exc.strerror}") from None
        print(f"splan: wrote the report to {args.report}", file=sys.stderr)
    if args.emit_launch is not None:
        from service.launch import launch_bundle, write_launch_bundle

        bundle = launch_bundle(spec, result, strategy_rank=args.strategy, catalog=catalog)
        try:
            written = write_launch_bundle(bundle, args.emit_launch)
        except OSError as exc:
            raise CliError(f"cannot write the launch files to {args.emit_launch}: {exc.strerror}") from None
        print(f"splan: wrote {len(written)} launch files to {args.emit_launch}", file=sys.stderr)


STRATEGY_HEADERS = (
    "#",
    "strategy",
    "GPUs",
    "goodput (req/s)",
    "goodput/GPU (req/s)",
    "cost ($/M out tok)",
    "TTFT p90 (ms)",
    "TPOT p90 (ms)",
    "bottleneck",
)
PRUNE_CATEGORIES = (
    ("does_not_fit", "does not fit"),
    ("tpot_floor", "TPOT floor above the SLO"),
    ("analytic_bound", "analytic bound below the leaders"),
)


def strategy_table(strategies: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ranked strategies as a plain-text table with units in the headers."""
    if not strategies:
        return ["no strategy was simulated"]
    rows = []
    for s in strategies:
        cost = s.get("cost_per_million_output_tokens_usd")
        rows.append(
            (
                f"{s['rank']}{'*' if s.get('on_frontier') else ' '}",
                str(s["label"]),
                str(s["gpus"]),
                f"{s['goodput_rps']:.2f}",
                f"{s['goodput_per_gpu']:.3f}",
                "-" if cost is None else f"{cost:.2f}",
                _ms(s.get("ttft_ms")),
                _ms(s.get("tpot_ms")),
                str(s.get("bottleneck", "-")),
            )
        )
    lines = text_table(STRATEGY_HEADERS, rows, left=(1, 8))
    lines.append("* on the Pareto frontier (goodput per GPU vs median TPOT)")
    return lines


def plan_verdict(result: Mapping[str, Any]) -> list[str]:
    """Why the first strategy wins, and how many were pruned for which reason."""
    strategies = result["strategies"]
    lines = []
    best = strategies[0] if strategies else None
    if best is None or best["goodput_rps"] <= 0:
        lines.append("why: no strategy meets the SLOs at any request rate")
    else:
        why = f"why {best['label']} wins: highest goodput per GPU, {best['goodput_per_gpu']:.3f} req/s/GPU"
        if len(strategies) > 1:
            second = strategies[1]
            if second["goodput_per_gpu"] > 0:
                margin = best["goodput_per_gpu"] / second["goodput_per_gpu"] - 1
                why += f", {margin:.1%} above the runner-up {second['label']} ({second['goodput_per_gpu']:.3f})"
            else:
                why += f"; the runner-up {second['label']} meets the SLOs at no rate"
        else:
            why += " (the only strategy simulated)"
        why += f"; bottleneck: {_bottleneck_text(best)}"
        lines.append(why)
    counts = {key: 0 for key, _ in PRUNE_CATEGORIES}
    for rejected in result["rejected"]:
        counts[rejected.get("category", "does_not_fit")] = counts.get(rejected.get("category", "does_not_fit"), 0) + 1
    names = dict(PRUNE_CATEGORIES)
    parts = ", ".join(f"{names.get(key, key)}: {count}" for key, count in counts.items())
    lines.append(
        f"pruned: {len(result['rejected'])} of {result['strategies_enumerated']} enumerated ({parts}); "
        f"simulated: {result['strategies_evaluated']}"
    )
    return lines


def _bottleneck_text(strategy: Mapping[str, Any]) -> str:
    bottleneck = str(strategy.get("bottleneck", "unknown"))
    shares = strategy.get("step_time_shares") or {}
    if not shares:
        return bottleneck
    part, share = max(shares.items(), key=lambda item: float(item[1]))
    name = {"gemm": "GEMMs", "cpu_dispatch": "CPU dispatch"}.get(part, part.replace("_", " "))
    return f"{bottleneck} ({name} {float(share):.0%} of step time)"


def _ms(stats: Mapping[str, float] | None) -> str:
    return "-" if not stats else f"{stats['p90']:.1f}"


def _join(values: Sequence[Any] | str) -> str:
    return values if isinstance(values, str) else ", ".join(str(v) for v in values)


def _workload_text(workload: Any) -> str:
    """One line for a workload spec: arrivals, lengths, rate or concurrency."""
    if workload.arrival == "closed":
        load = f"closed loop ({workload.client_start} clients)"
    else:
        cv = f" (cv {workload.cv:g})" if workload.arrival == "gamma" else ""
        load = f"{workload.arrival} arrivals{cv}"
        if workload.rate is not None:
            load += f" at {workload.rate:g} req/s"
    if workload.trace is not None:
        scale = f", time scale {workload.time_scale:g}" if workload.time_scale is not None else ""
        return f"trace of {len(workload.trace)} requests replayed as recorded{scale}"
    return f"{load}, input {workload.isl} tokens, output {workload.osl} tokens"


def _slo_text(slo: Any) -> str:
    share = f"{slo.percentile:g}%" if slo.percentile is not None else f"{slo.attainment:.0%}"
    return f"TTFT <= {slo.ttft_ms:g} ms and TPOT <= {slo.tpot_ms:g} ms for {share} of requests"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: Sequence[int] = ()) -> list[str]:
    """A plain-text table: columns as wide as their widest cell, numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _plan_fleet(args: argparse.Namespace, catalog: Catalog, raw: dict[str, Any]) -> int:
    # Imported here: the job runner and placement cost time that estimates do not need.
    from service.fleet_jobs import FleetSearches
    from service.jobs import execute_spec
    from service.placement.cluster import Cluster, parse_cluster
    from service.placement.fleet_plan import parse_fleet_spec

    spec = dict(raw)
    cluster_file = spec.pop("cluster_file", None)
    cluster_path: Path | None = None
    if cluster_file is not None:
        if spec.get("cluster") is not None:
            raise PlanningError("give `cluster_file` (read by splan plan) or `cluster` (stored on a server), not both")
        if not isinstance(cluster_file, str) or not cluster_file:
            raise PlanningError("cluster_file must be a path to a cluster YAML or JSON file")
        path = Path(cluster_file)
        cluster_path = path if path.is_absolute() else args.spec.parent / path
        # execute_spec hands this name back to the loader below.
        spec["cluster"] = str(cluster_path)

    fleet = parse_fleet_spec(spec)
    # Input errors surface before the progress starts, so that they stay one line on stderr.
    for deployment in fleet.deployments:
        catalog.model(deployment.model)
        catalog.engine(deployment.engine)
    if fleet.cluster is not None and cluster_path is None:
        raise PlanningError(
            f"cluster {fleet.cluster!r} is stored on a server: use `splan submit`, or give `cluster_file: PATH` "
            "for `splan plan`"
        )
    cluster: Cluster | None = None
    if cluster_path is not None:
        document = read_structured_file(cluster_path)
        if not isinstance(document, dict):
            raise PlanningError(f"{cluster_path} must hold a mapping")
        cluster = parse_cluster(document)

    def load_cluster(name: str) -> Cluster:
        assert cluster is not None, name
        return cluster

    if args.emit_launch is not None:
        raise PlanningError("--emit-launch takes a strategy plan; a fleet plan's deployments each have their own")
    if not 1 <= args.jobs <= 256:
        raise PlanningError(f"--jobs must be between 1 and 256 (got {args.jobs})")
    searches = FleetSearches(
        catalog=catalog, session_factory=None if args.no_cache else _cache_sessions(), jobs=args.jobs
    )
    with ProgressReporter(f"planning a fleet of {len(fleet.deployments)} deployments") as progress:
        result, _ = execute_spec(
            "fleet", spec, catalog=catalog, progress=progress, cluster_loader=load_cluster, fleet_searches=searches
        )
    _write_plan_outputs(args, raw, result, catalog=catalog, fleet=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    gpus = ", ".join(f"{name} x{count}" for name, count in (fleet.gpus or {}).items())
    where = f"the free GPUs of cluster {cluster_path}" if cluster_path is not None else gpus
    print(f"fleet:    {len(fleet.deployments)} deployments on {where}")
    width = max(len(d.name) for d in fleet.deployments)
    for d in fleet.deployments:
        types = f", on {_join(d.gpu_types)}" if d.gpu_types else ""
        print(
            f"  {d.name:{width}s}  {d.model} ({d.engine}, weights {d.weight_dtype}{types}): "
            f"{_workload_text(d.workload)}; {_slo_text(d.slo)}"
        )
    print()
    for line in fleet_summary(result, on_cluster=cluster_path is not None):
        print(line)
    return 0


def _cache_sessions() -> Any:
    """Sessions on the service's database (the embedded SQLite file unless DATABASE_URL says otherwise), migrated."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.migrate import alembic_config, upgrade
    from service.db.session import make_engine, make_session_factory
    from service.settings import Settings

    settings = Settings()
    engine = make_engine(settings)
    heads = set(ScriptDirectory.from_config(alembic_config(settings)).get_heads())
    try:
        with engine.connect() as connection:
            current = {row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))}
    except SQLAlchemyError:
        current = set()
    if current != heads:
        upgrade(settings)
    return make_session_factory(engine)


FLEET_HEADERS = (
    "deployment",
    "model",
    "GPU type",
    "strategy",
    "instances",
    "GPUs",
    "needed (req/s)",
    "capacity (req/s)",
    "rate share (%)",
    "TTFT p90 (ms)",
    "TPOT p90 (ms)",
    "cost ($/h)",
    "placed",
)


def fleet_summary(result: Mapping[str, Any], *, on_cluster: bool) -> list[str]:
    """A fleet result: per deployment its strategies and sizes, where it went, the totals and what was not met."""
    lines: list[str] = []
    deployments = result["deployments"]
    rows: list[tuple[str, ...]] = []
    for d in deployments:
        # One line per option of the deployment (several when instances of several strategies share its rate,
        # split by the router in proportion to goodput); the deployment's own cells on its first line only.
        for k, o in enumerate(d.get("options") or [d]):
            first = k == 0
            cost = o.get("cost_per_hour_usd")
            rows.append(
                (
                    str(d["name"]) if first else "",
                    str(d["model"]) if first else "",
                    str(o["gpu_type"]),
                    str(o["strategy"]),
                    str(o["instances"]),
                    str(o["gpus"]),
                    f"{d['required_rps']:.2f}" if first else "",
                    f"{o['instances'] * o['goodput_per_instance_rps']:.2f}",
                    f"{100 * o.get('rate_share', 1.0):.0f}",
                    _ms(o.get("ttft_ms")),
                    _ms(o.get("tpot_ms")),
                    f"{cost:.2f}" if cost is not None else "-",
                    ("yes" if d["placed"] else "no") if first else "",
                )
            )
    if rows:
        lines += text_table(FLEET_HEADERS, rows, left=(0, 1, 2, 3, 12))
    for d in deployments:
        for i, instance in enumerate(d.get("instances_placed") or [], 1):
            if instance.get("server") is None:
                continue
            gpus = ",".join(str(g) for g in instance.get("gpu_ids", []))
            load = instance.get("load_s")
            loads = f", loads from {instance.get('tier')} in {load:.1f} s" if load is not None else ""
            lines.append(f"  {d['name']} #{i}: {instance['server']} GPUs {gpus}{loads}")
    used = result["gpus_used_by_type"]
    available = result["gpus_available_by_type"]
    by_type = ", ".join(f"{name} {used.get(name, 0)} of {count}" for name, count in available.items())
    verdict = "all SLOs met" if result["all_slos_met"] else f"{len(result['unmet'])} not met"
    free = " free" if on_cluster else ""
    lines.append(
        f"total:    {result['total_gpus']} GPUs used of {sum(available.values())}{free} ({by_type}); {verdict}"
    )
    lines += _fleet_cost_lines(result)
    for miss in result["unmet"]:
        lines.append(f"not met:  {miss['name']}: {miss['reason']}")
    return lines


def _fleet_cost_lines(result: Mapping[str, Any]) -> list[str]:
    """The fleet's cost against the greedy baseline, the solver's gap, and the candidate searches reused."""
    if result.get("cost_per_hour_usd") is None:
        return []
    greedy, solver = result["greedy"], result["solver"]
    periods = int(result.get("periods", 1))
    horizon = f", ${result['cost_usd']:.2f} over {periods} periods" if periods > 1 else ""
    skipped = f" and leaves {len(greedy['unserved'])} unserved" if greedy["unserved"] else ""
    gap = f"{solver['mip_gap']:.2%}" if solver.get("mip_gap") is not None else "unknown"
    searches = result.get("candidate_searches", {})
    return [
        f"cost:     ${result['cost_per_hour_usd']:.2f}/hour{horizon}; the greedy rule costs "
        f"${greedy['cost_per_hour_usd']:.2f}/hour{skipped}; optimality gap {gap} ({solver['status']})",
        f"searches: {searches.get('total', 0)} candidate searches, {searches.get('reused', 0)} reused from the cache",
    ]


class ProgressReporter:
    """Progress on stderr: a bar on a terminal, else a plain line per 10% done, at most one a second."""

    def __init__(self, label: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.stream: TextIO = sys.stderr
        self.clock = clock
        self.started = clock()
        self._last_line_at = -math.inf
        self._last_bucket = -1
        self._finished = False
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        if _is_terminal(self.stream):
            # Imported here: only a terminal's bar needs Rich, and estimates must start fast.
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream, force_terminal=True)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._bar = Progress(*columns, console=console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def note(self, text: str) -> None:
        """Say what is going on now (queued, running, succeeded): the bar's caption, or a line of its own."""
        if self._bar is not None:
            self._bar.update(self._task, description=text)
        else:
            self._line(text)

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=max(total, 1))
            return
        if total <= 0 or self._finished:
            return
        now = self.clock()
        bucket = min(10, done * 10 // total)
        self._finished = done >= total
        if self._finished or (bucket > self._last_bucket and now - self._last_line_at >= 1.0):
            self._last_bucket = bucket
            self._line(f"{self.label}: {done}/{total} ({done / total:.0%}) after {now - self.started:.1f} s")

    def _line(self, text: str) -> None:
        self._last_line_at = self.clock()
        print(f"splan: {text}", file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _read_rows(path: Path) -> Any:
    """A measurement file: a JSON document, JSONL objects, or CSV rows with a header."""
    if path.suffix == ".json":
        return read_structured_file(path)
    text = read_text_file(path)
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PlanningError(f"cannot parse {path}: {exc.msg} at line {exc.lineno}") from None
    return list(csv.DictReader(text.splitlines()))


def _kernel_table(path: Path) -> str | None:
    """The kernel table a CSV file holds, by its name (h100_sxm_gemm.csv -> gemm), or None."""
    from service.planning.kernel_accuracy import MOE_TABLES, TABLES

    if path.suffix != ".csv":
        return None
    stem = path.stem
    return next(
        (t for t in sorted(TABLES + MOE_TABLES, key=len, reverse=True) if stem == t or stem.endswith(f"_{t}")), None
    )


def _calibrate(args: argparse.Namespace, catalog: Catalog) -> int:
    # Imported here: scipy and the fit are for this command only.
    import numpy as np
    import yaml

    from service.planning import user_calibration as uc
    from service.planning.profile import Profile

    gpu = catalog.gpu(args.gpu).name
    if args.engine:
        catalog.engine(args.engine)
    defaults = {
        "tp": args.tp,
        "pp": args.pp,
        "weight_dtype": args.weight_dtype,
        "max_batched_tokens": args.max_batched_tokens,
        "max_sequences": args.max_seqs,
    }
    points: list[Any] = []
    tables: dict[str, Any] = {}
    for path in args.measured:
        table = _kernel_table(path)
        if table is not None:
            tables[table] = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding=None)
            continue
        content = _read_rows(path)
        kind = uc.measurement_kind(content)
        if kind == "rows":
            points += uc.points_from_benchmark_rows(
                content, gpu=gpu, model=args.model, engine=args.engine, source=path.name
            )
            continue
        if not args.model:
            raise CliError(f"{path} holds per-request records, which do not name the model: give --model")
        readers: dict[str, Callable[[Any], list[Any]]] = {
            "vllm": uc.records_from_vllm_bench,
            "aiperf": uc.records_from_aiperf,
            "records": uc.records_from_rows,
        }
        records = readers[kind]
        points += uc.points_from_records(
            records(content),
            gpu=gpu,
            model=args.model,
            engine=args.engine or "vllm",
            source=path.name,
            defaults=defaults,
        )
    kernel_values: dict[str, Any] = {}
    if tables:
        kernel_values, kernel_summary = uc.fit_kernel_tables(tables, catalog=catalog, gpu=gpu)
        for kind, rows, before, after in kernel_summary:
            print(f"kernel {kind:24s} {rows:6d} rows: median error {before:.1f}% -> {after:.1f}%")
    engines = sorted({p.request.engine for p in points})
    if len(engines) > 1:
        raise CliError(f"the measurements cover engines {', '.join(engines)}: calibrate one at a time (--engine)")
    engine = catalog.engine(engines[0] if engines else args.engine or "vllm").name
    if points:
        fit = [name.strip() for name in args.fit.split(",") if name.strip()] if args.fit else None
        result = uc.fit_profile(
            points,
            catalog=catalog,
            gpu=gpu,
            engine=engine,
            fit=fit,
            time_budget_s=uc.DEFAULT_TIME_BUDGET_S if args.budget_s is None else args.budget_s,
            kernel_calibration=kernel_values,
            work_budget_sequence_steps=args.budget_steps,
        )
        profile = result.profile
        lines = uc.report_lines(result)
    elif tables:
        models = (uc.catalog_model_name(args.model),) if args.model else ()
        profile = Profile(gpu=gpu, engine=engine, models=models, kernel_calibration=kernel_values)
        lines = [f"calibrated {gpu} kernels on {len(tables)} tables (no end-to-end measurements: factors stay 1)"]
    else:
        raise CliError("no measurements to calibrate on")
    document = profile.as_document()
    try:
        args.out.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write the profile to {args.out}: {exc.strerror}") from None
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        for line in lines:
            print(line)
    print(f"splan: wrote the profile to {args.out}", file=sys.stderr)
    return 0


def _catalog(args: argparse.Namespace, catalog: Catalog) -> int:
    if args.check is not None:
        from service.catalog.loader import check_gpu_catalog

        if args.kind != "gpus":
            raise CliError("--check takes a GPU catalog file: `splan catalog gpus --check FILE`")
        findings = check_gpu_catalog(read_structured_file(args.check))
        for finding in findings:
            print(f"{args.check}: {finding}")
        errors = sum(1 for f in findings if f.severity == "error")
        print(f"{args.check}: {errors} errors, {len(findings) - errors} warnings")
        return 2 if errors else 0
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


def _prewarm(args: argparse.Namespace, catalog: Catalog) -> int:
    """Prewarming advice for a cluster file and request rates."""
    # Imported here: the placement package would slow every `splan estimate`.
    from service.placement.cluster import parse_cluster, validated
    from service.placement.prewarm import PrewarmRequest, advise_prewarm

    document = read_structured_file(args.cluster)
    if not isinstance(document, dict):
        raise PlanningError(f"{args.cluster} must hold a mapping")
    cluster = parse_cluster(document)
    rates = read_structured_file(args.rates)
    models = rates.get("models", rates) if isinstance(rates, dict) else rates
    body = {"models": models, "max_copy_s_per_server": args.copy_s, "default_keep_alive_s": args.keep_alive_s}
    request = validated("invalid rates", lambda: PrewarmRequest.model_validate(body, strict=False))
    advice = advise_prewarm(cluster, request, catalog=catalog, now_s=time.time())
    if args.json:
        print(advice.model_dump_json(indent=2))
        return 0
    print(
        f"expected cold start {advice.expected_cold_start_s_before:.2f} s -> "
        f"{advice.expected_cold_start_s_after:.2f} s (busy share {advice.busy_share:.0%})"
    )
    for c in advice.copies:
        print(
            f"copy  {c.checkpoint} -> {c.server} {c.to_tier.value} from {c.from_tier.value} ({c.copy_s:.1f} s, "
            f"saves {c.startup_s_saved_per_hour:.1f} s/h)"
        )
    for e in advice.evictions:
        print(f"evict {e.checkpoint} from {e.server} {e.tier.value} (costs {e.startup_s_lost_per_hour:.1f} s/h)")
    for k in advice.keep_alive:
        print(f"keep-alive {k.checkpoint}: {k.keep_alive_s:.0f} s ({k.rate_per_s:.3f} req/s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `splan` console script."""
    try:
        args = build_parser().parse_args(argv)
        if args.command in SERVICE_COMMANDS:
            return run_service_command(args)
        catalog = load_catalog(tuple(args.catalog))
        handler = {
            "estimate": _estimate,
            "plan": _plan,
            "catalog": _catalog,
            "calibrate": _calibrate,
            "prewarm": _prewarm,
        }[args.command]
        return handler(args, catalog)
    except _expected_errors() as exc:
        print(f"splan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
