"""Helpers shared by the tests and the fault bench: processes, ports, waiting for plans, throwaway PostgreSQL/Redis."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from starlette.testclient import TestClient

REPO = Path(__file__).resolve().parents[1]
SPLAN = [sys.executable, "-m", "service.cli"]
FINAL_STATUSES = ("succeeded", "failed", "canceled")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05, what: str = "") -> float:
    """Poll until `condition()` holds; the seconds it took (AssertionError past the timeout)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s:g} s waiting for {what or condition}"
        time.sleep(interval_s)
    return time.monotonic() - start


def wait_final(client: httpx.Client | TestClient, plan_id: str, timeout_s: float = 120.0, **get: Any) -> dict[str, Any]:
    """Poll a plan until it is succeeded, failed or canceled (httpx.Client or FastAPI's TestClient)."""
    deadline = time.monotonic() + timeout_s
    while True:
        plan: dict[str, Any] = client.get(f"/v1/plans/{plan_id}", **get).json()
        if plan["status"] in FINAL_STATUSES:
            return plan
        assert time.monotonic() < deadline, f"plan {plan_id} still {plan['status']}"
        time.sleep(0.1)


def wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until the server answers /readyz with 200 (RuntimeError if it exits or never does)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def start_quiet(command: list[str], env: Mapping[str, str], cwd: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a `splan` subcommand with its output discarded; `serve` gets a free loopback port."""
    port = free_port()
    argv = [*SPLAN, *command, *(["--port", str(port)] if command[0] == "serve" else [])]
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started with `start_new_session=True` and every child in its group."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def postgres_bin() -> Path | None:
    """The directory of this machine's PostgreSQL server binaries (initdb, pg_ctl), newest version first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]), reverse=True)
    if found:
        return Path(found[0]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _run_as_postgres_owner(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    # initdb and the server refuse to run as root: drop to the `postgres` user when this process is root.
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own in a temporary directory, on its own port: it can be stopped and started."""

    def __init__(self, port: int) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bin = binaries
        # Its own directory right under the temporary root: the `postgres` user must be able to reach it.
        self.directory = Path(tempfile.mkdtemp(prefix=f"splan-pg-{port}-"))
        self.data = self.directory / "data"
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        _run_as_postgres_owner(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.directory / "log")
        pg_ctl = [str(self.bin / "pg_ctl"), "-D", str(self.data)]
        _run_as_postgres_owner([*pg_ctl, "-o", options, "-l", log, "-w", "start"])

    def stop(self) -> None:
        """Stop the server now (fast shutdown: open connections are closed)."""
        _run_as_postgres_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def running(self) -> bool:
        """Whether the server accepts connections."""
        done = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"], check=False
        )
        return done.returncode == 0

    def destroy(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class ThrowawayRedis:
    """A Redis server of its own (append-only file in a temporary directory) that can be stopped and started."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        # The append-only file keeps queued messages across a restart, as a production Redis does.
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)]
        argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.running, timeout_s=10, what="redis")

    def stop(self) -> None:
        """Stop the server (SIGTERM: it closes every connection and exits)."""
        if self.process is not None:
            stop(self.process)
            self.process = None

    def running(self) -> bool:
        """Whether the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
