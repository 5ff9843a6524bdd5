"""CPU of the API app per POST /v1/plans under a burst, without HTTP parsing, a client or a worker.

Usage: python -m bench.front_door_cpu [--plans 200] [--rounds 5] [--pg-admin postgresql://postgres@127.0.0.1/postgres]

It creates a throw-away PostgreSQL database, builds the production app (keys required, quotas out of the way)
and calls it as an ASGI application with --plans POSTs at once, each with its own Idempotency-Key and the
bench key, --rounds times (the key cache cleared before each round, so each burst pays one key lookup). The
executor's hand-off is replaced by a no-op, so what is measured is the door: parsing, key, validation, the
group commit on PostgreSQL and the answer. Prints wall and CPU time per burst and per POST; the database is
dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import psycopg

from bench.api_load import SPEC
from service.api.app import create_app
from service.auth import create_key
from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory
from service.settings import Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--plans", type=int, default=200, help="POSTs at once per round")
    parser.add_argument("--rounds", type=int, default=5, help="bursts measured")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1/postgres")
    return parser.parse_args(argv)


async def _post(app: Any, body: bytes, token: str) -> int:
    """One POST /v1/plans through the ASGI interface; its status."""
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", f"Bearer {token}".encode()),
        (b"idempotency-key", uuid.uuid4().hex.encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/plans",
        "raw_path": b"/v1/plans",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await app(scope, receive, send)
    return status


async def measure(settings: Settings, token: str, plans: int, rounds: int) -> list[tuple[float, float, set[int]]]:
    """(wall s, CPU s, statuses) of each burst."""
    app = create_app(settings)
    body = json.dumps(SPEC).encode()
    results = []
    async with app.router.lifespan_context(app):
        app.state.admission.dispatch = lambda outcomes: None
        for _ in range(5):
            await _post(app, body, token)
        for _ in range(rounds):
            app.state.principal_cache.entries.clear()
            cpu, wall = time.process_time(), time.perf_counter()
            statuses = await asyncio.gather(*(_post(app, body, token) for _ in range(plans)))
            results.append((time.perf_counter() - wall, time.process_time() - cpu, set(statuses)))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = f"splan_bench_door_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg_admin, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        url = args.pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
        settings = Settings(
            database_url=url,
            broker_url="redis://127.0.0.1:6379/15",
            queue_name=f"splan-bench-door-{name[-8:]}",
            require_api_keys=True,
            quota_plans_in_flight=10**6,
            quota_plans_per_hour=10**6,
        )
        upgrade(settings)
        engine = make_engine(settings)
        with make_session_factory(engine)() as session:
            token = create_key(session, tenant="bench", scopes=("plans:write",)).token
        engine.dispose()
        rounds = asyncio.run(measure(settings, token, args.plans, args.rounds))
    finally:
        with psycopg.connect(args.pg_admin, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    print("| round | POSTs | wall ms | CPU ms | CPU ms per POST | answers |")
    print("|---:|---:|---:|---:|---:|---|")
    for i, (wall_s, cpu_s, statuses) in enumerate(rounds, 1):
        answers = ",".join(str(s) for s in sorted(statuses))
        per_post_ms = cpu_s * 1000 / args.plans
        print(f"| {i} | {args.plans} | {wall_s * 1000:.0f} | {cpu_s * 1000:.0f} | {per_post_ms:.2f} | {answers} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
