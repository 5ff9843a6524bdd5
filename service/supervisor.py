"""Keep a worker process running: restart it when it dies of an error, stop it when told to."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

# prctl(2) option that signals a child when its parent dies (Linux).
PR_SET_PDEATHSIG = 1

# A child that ran this long before dying was healthy (a crash loop dies while starting, in 2-3 s): the restart
# delay starts again from the first step.
HEALTHY_RUN_S = 5.0
FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0


def restart_delay_s(previous_s: float, ran_s: float) -> float:
    """Wait before the next start: doubled after each quick death, reset after a healthy run."""
    if ran_s >= HEALTHY_RUN_S or previous_s <= 0:
        return FIRST_RESTART_DELAY_S
    return min(previous_s * 2.0, MAX_RESTART_DELAY_S)


def _die_with_parent() -> None:
    """In the child, before exec: a SIGTERM when the supervisor dies, so a killed supervisor leaves no worker."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def supervise(
    command: Sequence[str],
    *,
    report: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``command`` until it exits by itself with status 0 or SIGTERM/SIGINT arrives; its exit status."""
    say = report or (lambda line: print(line, file=sys.stderr, flush=True))
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        delay_s = 0.0
        while True:
            started = time.monotonic()
            child = subprocess.Popen(list(command), preexec_fn=_die_with_parent)
            code = child.wait()
            if stopping or code == 0:
                return code
            # Celery ends a worker on errors it calls unrecoverable (kombu's Redis transport can raise one while it
            # reconnects after a broker outage); the plans it held are requeued, so a fresh worker picks them up.
            delay_s = restart_delay_s(delay_s, time.monotonic() - started)
            say(f"splan worker: the worker exited with status {code}; starting a new one in {delay_s:g} s")
            sleep(delay_s)
            if stopping:
                return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
