"""Latency of POST /v1/placements at a fixed request rate on a 64-server / 512-GPU cluster, on loopback.

Usage: python bench/placement_load.py [--rate 200] [--seconds 20] [--pg-admin URL]

Starts `splan serve` on a throw-away PostgreSQL database (no broker: placements never touch it), stores a
synthetic busy cluster (64 servers x 8 h100-sxm, 200 running instances, cached checkpoints, queued loads) with
PUT /v1/clusters/bench, then sends placements open-loop at --rate for --seconds, twice: dry runs, then real
placements that reserve GPUs (ttl 2 s, so reservations expire and the cluster does not fill up). Latency is
measured from each request's scheduled send time (no coordinated omission); the server's CPU time per request
(user + system, from /proc) is printed beside it, since latency on a shared machine also measures the neighbours.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.api_load import BenchError, check_services, free_port, fresh_database, splan_executable, start
from service.catalog.loader import default_catalog
from service.placement.replay import synthetic_cluster

TARGET_P99_MS = 10.0


class Connection:
    """One keep-alive HTTP/1.1 connection for JSON POSTs."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        """POST on the kept-alive connection; once more on a new one if the server closed it while idle."""
        if self.writer is not None:
            try:
                return await self._post(path, body)
            except (OSError, asyncio.IncompleteReadError):
                self.writer.close()
                self.reader = self.writer = None
        return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        response = await self.reader.readuntil(b"\r\n\r\n")
        lines = response.decode("latin-1").split("\r\n")
        length = next(int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length")
        payload = await self.reader.readexactly(length)
        status = int(lines[0].split(" ", 2)[1])
        # An answer without a placement (the cluster is full) counts apart: it is cheaper than a real one.
        return status if b'"placements":[]' not in payload else -status


async def open_loop(port: int, bodies: list[bytes], rate: float) -> tuple[list[float], dict[int | str, int]]:
    """Send bodies at `rate` per second; latency in ms from each scheduled send time."""
    idle: list[Connection] = []
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    start_s = time.perf_counter() + 0.05

    async def one(index: int, body: bytes) -> None:
        scheduled = start_s + index / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        conn = idle.pop() if idle else Connection("127.0.0.1", port)
        status = await conn.post("/v1/placements", body)
        latencies.append((time.perf_counter() - scheduled) * 1e3)
        label = status if status > 0 else f"{-status} unplaced"
        statuses[label] = statuses.get(label, 0) + 1
        idle.append(conn)

    await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    for conn in idle:
        if conn.writer is not None:
            conn.writer.close()
    return latencies, statuses


def bodies_for(cluster: Any, count: int, *, dry_run: bool, seed: int, ttl_s: float = 2.0) -> list[bytes]:
    """Placement requests for checkpoints the cluster knows, in popularity-like proportions."""
    rng = np.random.default_rng(seed)
    instances = cluster.instances
    out = []
    for _ in range(count):
        pick = instances[int(rng.integers(len(instances)))]
        body = {
            "cluster": "bench",
            "model": pick.model,
            "checkpoint": pick.checkpoint_name,
            "tp": pick.tp,
            "weight_dtype": pick.weight_dtype.value,
            "dry_run": dry_run,
            "ttl_s": ttl_s,
        }
        out.append(json.dumps(body).encode())
    return out


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far; None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(
    name: str, latencies: list[float], statuses: dict[int | str, int], seconds: float, server_cpu_s: float | None
) -> str:
    values = np.array(latencies)
    p50, p90, p99 = (float(np.percentile(values, q)) for q in (50, 90, 99))
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0])))
    cpu = f"{server_cpu_s * 1e3 / len(values):.2f}" if server_cpu_s is not None else "-"
    return (
        f"| {name} | {len(values)} | {len(values) / seconds:.0f} | {p50:.2f} | {p90:.2f} | {p99:.2f} | "
        f"{values.max():.1f} | {cpu} | {codes} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Run both phases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--reserve-rates", default="200,100", help="comma-separated rates of the reserving phase")
    parser.add_argument(
        "--ttls",
        default="2",
        help="comma-separated hold lifetimes (s) of the reserving phase; at 200/s, 2 s of holds (about 800 GPUs) "
        "outnumber the cluster's ~130 free GPUs, so most answers find it full",
    )
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    try:
        check_services(args.pg_admin, "redis://127.0.0.1:6379/0")
    except BenchError as exc:
        print(f"placement_load: {exc}", file=sys.stderr)
        return 2
    cluster = synthetic_cluster(catalog=default_catalog(), servers=64, gpus_per_server=8, instances=200)
    rows: list[str] = []
    try:
        run_phases(args, cluster, rows)
    except BenchError as exc:
        print(f"placement_load: {exc}", file=sys.stderr)
        return 1
    print(
        f"Date {dt.date.today()}, {os.cpu_count()} cores; command: `python -m bench.placement_load --rate "
        f"{args.rate:g} --seconds {args.seconds:g} --reserve-rates {args.reserve_rates} --ttls {args.ttls}`; "
        f"target p99 <= {TARGET_P99_MS:g} ms.\n"
    )
    print("| placements | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU ms/req | statuses |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(row)
    return 0


def run_phases(args: argparse.Namespace, cluster: Any, rows: list[str]) -> None:
    """Start the server on a fresh database and run the warm-up and both measured phases."""
    with fresh_database(args.pg_admin) as db_url, tempfile.TemporaryDirectory() as logs:
        # Keyless (loopback) mode: this measures placement, not the API-key check in front of it.
        env = {**os.environ, "DATABASE_URL": db_url, "SPLAN_REQUIRE_API_KEYS": "false"}
        env.pop("BROKER_URL", None)
        splan = splan_executable()
        import subprocess

        subprocess.run([splan, "db", "upgrade"], env=env, check=True, capture_output=True)
        port = free_port()
        server = start("serve", [splan, "serve", "--port", str(port)], env, Path(logs))
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                server.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise BenchError("server not ready")
                time.sleep(0.2)
            put = httpx.put(f"{base}/v1/clusters/bench", json=cluster.model_dump(mode="json"), timeout=30)
            put.raise_for_status()
            warm = bodies_for(cluster, 200, dry_run=True, seed=99)
            asyncio.run(open_loop(port, warm, args.rate))
            phases = [("dry run", True, args.rate, 2.0)]
            phases += [
                (f"reserve (ttl {float(t):g} s)", False, float(r), float(t))
                for t in args.ttls.split(",")
                if t
                for r in args.reserve_rates.split(",")
                if r
            ]
            for name, dry_run, rate, ttl_s in phases:
                bodies = bodies_for(
                    cluster, int(rate * args.seconds), dry_run=dry_run, seed=1 if dry_run else 2, ttl_s=ttl_s
                )
                before = cpu_s(server.popen.pid)
                latencies, statuses = asyncio.run(open_loop(port, bodies, rate))
                after = cpu_s(server.popen.pid)
                used = after - before if before is not None and after is not None else None
                rows.append(summary(name, latencies, statuses, args.seconds, used))
                time.sleep(3.0)  # let this phase's holds expire
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise BenchError(f"{type(exc).__name__}: {exc}; server log:\n{server.tail(40)}") from None
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
