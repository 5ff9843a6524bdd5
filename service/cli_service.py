"""`splan serve|worker|submit|status|db|openapi`: run the service and talk to it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

from service.catalog.loader import read_structured_file
from service.cli_keys import add_key_commands, run_key_command
from service.planning.specs import PlanningError, spec_kind

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
FINAL = ("succeeded", "failed", "canceled")


class ServiceCliError(Exception):
    """A service command failed in a way the user can fix: one line on stderr, exit code 2."""


def add_command(sub: Any, name: str, text: str) -> Any:
    """A subcommand whose help line in `splan --help` is also its description in `splan NAME --help`."""
    return sub.add_parser(name, help=text, description=text)


def add_service_commands(sub: Any) -> None:
    """Register the service subcommands on the `splan` parser."""
    serve = add_command(sub, "serve", "run the HTTP API (embedded SQLite + in-process unless configured)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve keyless on a non-loopback address: anyone who reaches the port acts as the default tenant",
    )

    worker = add_command(sub, "worker", "run a Celery worker (needs BROKER_URL and DATABASE_URL)")
    worker.add_argument(
        "--concurrency", type=int, default=None, help="plans at once (default: $SPLAN_WORKER_CONCURRENCY, 2)"
    )
    worker.add_argument("--no-beat", action="store_true", help="do not run the stale-plan sweeper schedule")
    worker.add_argument("--loglevel", default="INFO", help="Celery log level")
    worker.add_argument(
        "--no-supervise",
        action="store_true",
        help="run the Celery worker in this process and exit when it dies (default: restart it after an error)",
    )

    server_help = "the planning service's URL, e.g. http://127.0.0.1:8765 (default: $SPLAN_SERVER)"
    key_help = "API key sent as Authorization: Bearer (default: $SPLAN_API_KEY; none for a keyless local server)"
    submit = add_command(sub, "submit", "submit a plan or fleet spec to a server; prints the plan id and a summary")
    submit.add_argument("spec", type=Path, help="plan or fleet spec, YAML or JSON")
    submit.add_argument("--server", default=None, help=server_help)
    submit.add_argument("--wait", action="store_true", help="poll until the plan finishes, with progress on stderr")
    submit.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait")
    submit.add_argument(
        "--idempotency-key", default=None, help="same key and body give back the same plan (default: none)"
    )
    submit.add_argument("--json", action="store_true", help="print the plan as the API returns it")
    submit.add_argument("--api-key", default=None, help=key_help)

    status = add_command(sub, "status", "show a plan's status, and a summary of its result once finished")
    status.add_argument("plan_id", help="the id `splan submit` printed")
    status.add_argument("--server", default=None, help=server_help)
    status.add_argument("--json", action="store_true", help="print the plan (with its whole result) as JSON")
    status.add_argument("--api-key", default=None, help=key_help)

    db = add_command(sub, "db", "database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=sub._parser_class, metavar="COMMAND")
    add_command(db_sub, "upgrade", "apply the Alembic migrations to DATABASE_URL (or the embedded SQLite file)")

    place = add_command(sub, "place", "where to start new instances on a cluster file (no server needed)")
    place.add_argument("--cluster", type=Path, required=True, help="cluster state, YAML or JSON")
    place.add_argument("--model", required=True, help="catalog model name")
    place.add_argument("--weight-dtype", default="bf16", help="dtype of the weights")
    place.add_argument("--tp", type=int, default=1, help="tensor parallelism per instance")
    place.add_argument("--pp", type=int, default=1, help="pipeline stages per instance")
    place.add_argument("--gpus", type=int, default=None, help="GPUs per instance (default: tp x pp)")
    place.add_argument("--instances", type=int, default=1, help="instances to place")
    place.add_argument("--gpu-type", default=None, help="only GPUs of this type (default: any)")
    place.add_argument("--engine", default="vllm", help="catalog engine (its start-up costs)")
    place.add_argument("--checkpoint", default=None, help="checkpoint name in the tiers (default: the model)")
    place.add_argument("--no-migration", action="store_true", help="never move running instances")
    place.add_argument("--candidates", type=int, default=8, help="ranked candidates to show")
    place.add_argument("--json", action="store_true", help="print the decision as JSON")

    add_key_commands(sub, add_command)

    openapi = add_command(sub, "openapi", "write the OpenAPI document")
    openapi.add_argument("--out", type=Path, default=OPENAPI_PATH, help="where to write it")
    openapi.add_argument("--check", action="store_true", help="exit 2 if the file differs from the app")


def openapi_document() -> str:
    """The app's OpenAPI document as stable, sorted JSON."""
    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(database_url="sqlite://", broker_url=None), start_executor=False)
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


def run_service_command(args: argparse.Namespace) -> int:
    """Dispatch a service subcommand."""
    handler = {
        "serve": _serve,
        "worker": _worker,
        "submit": _submit,
        "status": _status,
        "db": _db,
        "openapi": _openapi,
        "place": _place,
        "keys": run_key_command,
        "tenants": run_key_command,
    }[args.command]
    return handler(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.auth import is_loopback_host
    from service.settings import get_settings

    settings = get_settings()
    if not settings.api_keys_required and not is_loopback_host(args.host) and not (args.insecure or settings.insecure):
        raise ServiceCliError(
            f"refusing to serve without API keys on {args.host}, which is not loopback: set SPLAN_REQUIRE_API_KEYS=1 "
            "and create keys with `splan keys create`, or pass --insecure"
        )
    if args.insecure:
        # The app is built by uvicorn (in each worker process) from the environment.
        os.environ["SPLAN_INSECURE"] = "1"
    if settings.database_url is None:
        # Embedded mode must work on a fresh machine: create or update the SQLite file first.
        _upgrade(settings)
    print(
        f"splan: serving on http://{args.host}:{args.port} (database {settings.sqlalchemy_url().split('://')[0]}, "
        f"plans run {settings.execution.value})",
        file=sys.stderr,
    )
    uvicorn.run(
        "service.api.asgi:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.settings import get_settings

    settings = get_settings()
    if not settings.broker_url or not settings.database_url:
        raise ServiceCliError(
            "splan worker needs BROKER_URL and DATABASE_URL (the embedded mode runs plans in-process)"
        )
    if not args.no_supervise:
        from service.supervisor import supervise

        child = [sys.executable, "-m", "service.cli", "worker", "--no-supervise", f"--loglevel={args.loglevel}"]
        if args.concurrency:
            child.append(f"--concurrency={args.concurrency}")
        if args.no_beat:
            child.append("--no-beat")
        return supervise(child)
    from workers.celery_app import app

    if settings.worker_nice:
        # Inherited by the pool's processes.
        os.nice(settings.worker_nice)
    argv = ["worker", f"--loglevel={args.loglevel}", "--queues", settings.queue_name, "--without-gossip"]
    argv += ["--without-mingle", f"--concurrency={args.concurrency or settings.worker_concurrency}"]
    if not args.no_beat:
        argv.append("--beat")
    # worker_main drops the worker's exit status, so a worker Celery ended on an unrecoverable error (status 1)
    # would exit 0 and look like a clean stop to the supervisor and to a container runtime: take it from the
    # worker_shutdown signal, whose sender is the stopping worker.
    from celery.signals import worker_shutdown

    exit_codes: list[int] = []

    def remember(sender: Any = None, **_: Any) -> None:
        exit_codes.append(int(getattr(sender, "exitcode", 0) or 0))

    worker_shutdown.connect(remember, weak=False)
    app.worker_main(argv)
    return max(exit_codes, default=0)


def _db(args: argparse.Namespace) -> int:
    from service.settings import get_settings

    _upgrade(get_settings())
    print("splan: database schema is up to date", file=sys.stderr)
    return 0


def _upgrade(settings: Any) -> None:
    """Apply the migrations; an unreachable or unwritable database is one line, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.migrate import upgrade

    try:
        upgrade(settings)
    except (SQLAlchemyError, OSError) as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ServiceCliError(f"cannot upgrade the database at {settings.sqlalchemy_url()}: {first}") from None


def _openapi(args: argparse.Namespace) -> int:
    document = openapi_document()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != document:
            raise ServiceCliError(f"{args.out} is out of date; run `splan openapi`")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document, encoding="utf-8")
    print(f"splan: wrote {args.out}", file=sys.stderr)
    return 0


def _server(args: argparse.Namespace) -> str:
    """--server, else $SPLAN_SERVER; neither is a one-line error."""
    server = args.server or os.environ.get("SPLAN_SERVER")
    if not server:
        raise ServiceCliError(f"splan {args.command} needs a server: give --server URL or set SPLAN_SERVER")
    return str(server)


def _client(server: str, api_key: str | None = None) -> httpx.Client:
    # Imported here: the HTTP client is only needed by the service commands, not by estimate or plan.
    import httpx

    key = api_key or os.environ.get("SPLAN_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.rstrip("/"), timeout=30.0, headers=headers)


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail") or body.get("title") or response.text
        except ValueError:
            detail = response.text.strip()[:200]
        raise ServiceCliError(f"server answered {response.status_code}: {detail}")
    payload: dict[str, Any] = response.json()
    return payload


def _submit(args: argparse.Namespace) -> int:
    import httpx

    server = _server(args)
    from service.plans_service import inline_spec_files

    # The server reads no files: the trace, profile and model config a spec names travel inline.
    spec = inline_spec_files(_mapping(read_structured_file(args.spec), args.spec), args.spec.parent)
    if "cluster_file" in spec:
        raise ServiceCliError(
            "cluster_file is read by `splan plan` only; store the cluster with PUT /v1/clusters/NAME and give "
            "`cluster: NAME`"
        )
    if spec_kind(spec) == "fleet" and "kind" not in spec:
        # The API reads the kind from the body: say what `splan plan` would have decided.
        spec = {**spec, "kind": "fleet"}
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    try:
        with _client(server, args.api_key) as client:
            plan = _check(client.post("/v1/plans", json=spec, headers=headers))
            if args.wait:
                plan = _wait(client, plan, args.timeout)
    except httpx.HTTPError as exc:
        raise ServiceCliError(f"cannot reach {server}: {exc}") from None
    if args.json:
        print(json.dumps(plan if args.wait else {k: plan[k] for k in ("id", "status", "created_at")}, indent=2))
    else:
        for line in plan_summary(plan):
            print(line)
        if not args.wait:
            print(f"follow it with: splan status {plan['id']}" + ("" if args.server is None else f" --server {server}"))
    if args.wait and plan["status"] == "failed":
        detail = (plan.get("error") or {}).get("detail", "failed")
        raise ServiceCliError(f"plan {plan['id']} failed: {detail}")
    return 0


def _wait(client: httpx.Client, plan: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Poll until the plan is final, with its status and progress on stderr."""
    from service.cli import ProgressReporter

    deadline = time.monotonic() + timeout_s
    status = None
    with ProgressReporter(f"plan {plan['id']}") as progress:
        while True:
            if plan["status"] != status:
                status = plan["status"]
                progress.note(f"plan {plan['id']} {status}")
            if status != "queued":
                progress(int(plan["progress"]["done"]), int(plan["progress"]["total"]))
            if status in FINAL:
                return plan
            if time.monotonic() > deadline:
                raise ServiceCliError(f"plan {plan['id']} still {status} after {timeout_s:g} s")
            time.sleep(0.25)
            plan = _check(client.get(f"/v1/plans/{plan['id']}"))


def _status(args: argparse.Namespace) -> int:
    import httpx

    server = _server(args)
    try:
        with _client(server, args.api_key) as client:
            plan = _check(client.get(f"/v1/plans/{args.plan_id}"))
    except httpx.HTTPError as exc:
        raise ServiceCliError(f"cannot reach {server}: {exc}") from None
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    for line in plan_summary(plan):
        print(line)
    return 0


def plan_summary(plan: dict[str, Any]) -> list[str]:
    """One screen on a plan resource: its status, progress or outcome, and how to get the whole result."""
    from service.cli import fleet_summary, plan_verdict

    lines = [f"plan {plan['id']}: {plan['status']} ({plan['kind']}: {plan['model']} on {plan['gpu']})"]
    progress = plan.get("progress") or {}
    result = plan.get("result")
    if plan["status"] in ("queued", "running") and progress.get("total"):
        done, total = int(progress["done"]), int(progress["total"])
        lines.append(f"progress: {done}/{total} ({done / total:.0%})")
    elif plan["status"] == "failed":
        error = plan.get("error") or {}
        lines.append(f"error: {error.get('title', 'failed')}: {error.get('detail', '')}".rstrip(": "))
    elif result is not None and plan["kind"] == "fleet":
        lines += fleet_summary(result, on_cluster=str(plan["gpu"]).startswith("cluster:"))
    elif result is not None:
        best = result["strategies"][0] if result["strategies"] else None
        if best is not None:
            cost = best.get("cost_per_million_output_tokens_usd")
            lines.append(
                f"best: {best['label']} ({best['mode']}) on {best['gpus']} GPUs: goodput {best['goodput_rps']:.2f} "
                f"req/s ({best['goodput_per_gpu']:.3f} req/s/GPU)"
                + ("" if cost is None else f", ${cost:.2f} per million output tokens")
            )
            latency = [
                f"{name} p50 {best[key]['p50']:.1f} ms, p90 {best[key]['p90']:.1f} ms"
                for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))
                if best.get(key)
            ]
            if latency:
                lines.append("latency at that rate: " + "; ".join(latency))
        lines.append(f"strategies ranked: {len(result['strategies'])}")
        lines += plan_verdict(result)
    times = [f"{name} {plan[key]}" for name, key in (("created", "created_at"), ("finished", "finished_at"))]
    lines.append("; ".join(t for t in times if not t.endswith("None")))
    if result is not None:
        lines.append(f"the whole result: splan status {plan['id']} --json")
    return lines


def _place(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.catalog.loader import load_catalog
    from service.placement.cluster import parse_cluster
    from service.placement.optimizer import PlacementRequest, place

    cluster = parse_cluster(_mapping(read_structured_file(args.cluster), args.cluster))
    try:
        request = PlacementRequest(
            model=args.model,
            weight_dtype=args.weight_dtype,
            tp=args.tp,
            pp=args.pp,
            gpus=args.gpus,
            instances=args.instances,
            allow_migration=not args.no_migration,
            gpu_type=args.gpu_type,
            engine=args.engine,
            checkpoint=args.checkpoint,
            max_candidates=args.candidates,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ServiceCliError(f"invalid --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    decision = place(cluster, request, now_s=time.time(), catalog=load_catalog(tuple(args.catalog)))
    if args.json:
        print(decision.model_dump_json(indent=2))
        return 0
    print(
        f"{'#':>2s} {'server':16s} {'GPUs':14s} {'tier':6s} {'startup s':>9s} {'queue s':>8s} {'load s':>7s}  migration"
    )
    chosen = {(c.server, tuple(c.gpu_ids)) for c in decision.placements}
    for rank, c in enumerate(decision.candidates, 1):
        moves = ", ".join(f"{m.instance_id} -> {m.to_server}" for m in c.migrations) or "-"
        mark = "*" if (c.server, tuple(c.gpu_ids)) in chosen else " "
        gpus = ",".join(str(g) for g in c.gpu_ids)
        print(
            f"{rank:2d}{mark}{c.server:16s} {gpus:14s} {c.tier.value:6s} {c.startup_latency_s:9.2f} "
            f"{c.load.queue_wait_s:8.2f} {c.load.transfer_s:7.2f}  {moves}"
        )
    for ex in decision.excluded:
        print(f"   excluded {ex.server}: {ex.reason}")
    if decision.unplaced_reason:
        print(f"unplaced: {decision.unplaced_reason}")
    return 0


def _mapping(document: Any, path: Path) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise PlanningError(f"{path} must hold a mapping")
    return document
