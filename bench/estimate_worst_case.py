"""Issue 16: the heaviest estimates the API accepts, timed through POST /v1/estimates on the embedded app.

Usage: python -m bench.estimate_worst_case
Each case sits at or beyond the accepted bounds (requests, lengths, concurrency, token budget); the API prices it
before simulating (422 naming the budget) or runs it within the step budget (`truncated` says when it was cut).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.migrate import upgrade
from service.settings import Settings

BASE: dict[str, Any] = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "tp": 1, "requests": 1000}
CASES: dict[str, dict[str, Any]] = {
    "long prompts, budget 1 token": {"isl": 100_000, "osl": 16, "concurrency": 4096, "max_batched_tokens": 1},
    "long prompts, budget 16 tokens": {"isl": 32_000, "osl": 4, "rate": 1000, "max_batched_tokens": 16},
    "8k/8k, 1000 clients": {"isl": 8192, "osl": 8192, "concurrency": 1000},
    "1k/8k, 0.5 req/s": {"isl": 1024, "osl": 8192, "rate": 0.5},
    "1k/8k, one client": {"isl": 1024, "osl": 8192, "concurrency": 1},
    "32k/32k, 4096 clients": {"isl": 32_000, "osl": 32_000, "concurrency": 4096},
    "1k/1k, 50 req/s": {"isl": 1024, "osl": 1024, "rate": 50},
    "lognormal 4k/2k, 20 req/s": {"isl": "lognormal:4000:3000", "osl": "lognormal:2000:1500", "rate": 20},
    "70B tp8, 1k/8k, 256 clients": {"model": "llama-3.1-70b", "tp": 8, "isl": 1024, "osl": 8192, "concurrency": 256},
}


def main() -> int:
    """One row per case: status, wall seconds, completed of requests, truncated."""
    data_dir = Path(tempfile.mkdtemp(prefix="splan-worst-"))
    settings = Settings(database_url=f"sqlite:///{data_dir / 'splan.db'}", broker_url=None, data_dir=data_dir)
    upgrade(settings)
    print(f"{'case':32s} {'status':>6s} {'wall s':>7s} {'completed':>10s} {'truncated':>9s}  detail")
    worst_s = 0.0
    with TestClient(create_app(settings)) as client:
        client.post("/v1/estimates", json={**BASE, "isl": 128, "osl": 8, "rate": 1, "requests": 4})  # warm imports
        for name, case in CASES.items():
            started = time.perf_counter()
            response = client.post("/v1/estimates", json={**BASE, **case})
            wall_s = time.perf_counter() - started
            worst_s = max(worst_s, wall_s)
            body = response.json()
            if response.status_code == 200:
                done = f"{body['completed']}/{body['requests']}"
                detail = body.get("truncated_reason") or ""
                truncated = str(body["truncated"])
            else:
                done, truncated, detail = "-", "-", body.get("detail", "")
            print(f"{name:32s} {response.status_code:6d} {wall_s:7.2f} {done:>10s} {truncated:>9s}  {detail[:90]}")
    print(f"worst: {worst_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
