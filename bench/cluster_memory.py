"""Issue 16: RSS of an embedded `splan serve` after PUTs of many maximum-size cluster documents.

Usage: python -m bench.cluster_memory [--clusters 64]
Each document is as large as the API's body limit allows (1 MiB): servers of 8 H100s with two storage tiers,
about 3,000 servers and 25,000 GPUs. RSS is read from /proc after each eighth PUT and after the last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import start_quiet, stop, wait_ready

BODY_LIMIT_BYTES = 1_048_576


def big_cluster(tag: str) -> dict[str, Any]:
    """The largest cluster document of this shape under the body limit."""
    server = {
        "network_bandwidth_bytes_per_s": 3.125e9,
        "pcie_bandwidth_bytes_per_s": 25.0e9,
        "tiers": [
            {"kind": "dram", "capacity_bytes": 1e12, "read_bandwidth_bytes_per_s": 2e11, "checkpoints": ["qwen3-32b"]},
            {"kind": "ssd", "capacity_bytes": 7.68e12, "read_bandwidth_bytes_per_s": 1.2e10, "checkpoints": []},
        ],
        "gpus": [{"id": i, "type": "h100-sxm"} for i in range(8)],
    }
    one = len(json.dumps({**server, "name": f"{tag}-00000"})) + 2
    count = (BODY_LIMIT_BYTES - 200) // one
    return {
        "remote_store_bandwidth_bytes_per_s": 1e10,
        "servers": [{**server, "name": f"{tag}-{i:05d}"} for i in range(count)],
    }


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    """Print RSS before and during the PUTs, and the cache's document bytes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clusters", type=int, default=64)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="splan-rss-"))
    env = {"SPLAN_DATA_DIR": str(workdir), "PATH": "/usr/bin:/bin"}
    api, base_url = start_quiet(["serve"], {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, workdir)
    try:
        wait_ready(base_url, api)
        print(f"{'PUTs':>5s} {'RSS MiB':>8s} {'doc KiB':>8s} {'GPUs':>6s} {'status':>6s}")
        print(f"{0:5d} {rss_mib(api.pid):8.0f}")
        with httpx.Client(base_url=base_url, timeout=120) as client:
            for index in range(args.clusters):
                document = big_cluster(f"c{index}")
                body = json.dumps(document)
                response = client.put(
                    f"/v1/clusters/big-{index}", content=body, headers={"content-type": "application/json"}
                )
                gpus = 8 * len(document["servers"])
                if (index + 1) % 8 == 0 or index == args.clusters - 1 or response.status_code >= 300:
                    print(
                        f"{index + 1:5d} {rss_mib(api.pid):8.0f} {len(body) / 1024:8.0f} {gpus:6d} "
                        f"{response.status_code:6d}",
                        flush=True,
                    )
    finally:
        stop(api)
    return 0


if __name__ == "__main__":
    sys.exit(main())
