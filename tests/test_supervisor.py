"""The worker supervisor: restart after an error, with growing delays; stop when told to."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from service.supervisor import FIRST_RESTART_DELAY_S, HEALTHY_RUN_S, MAX_RESTART_DELAY_S, restart_delay_s, supervise


def test_restart_delays_double_after_quick_deaths_and_reset_after_a_healthy_run() -> None:
    assert restart_delay_s(0.0, 0.5) == FIRST_RESTART_DELAY_S == 1.0
    assert restart_delay_s(1.0, 0.5) == 2.0
    assert restart_delay_s(16.0, 0.5) == MAX_RESTART_DELAY_S == 30.0
    assert restart_delay_s(30.0, 0.5) == 30.0
    assert restart_delay_s(30.0, HEALTHY_RUN_S) == 1.0


def test_a_child_that_dies_of_an_error_is_started_again(tmp_path: Path) -> None:
    marker = tmp_path / "ran-once"
    # Exits 3 the first time, 0 the second.
    script = "import os, sys; p = sys.argv[1]; first = not os.path.exists(p); open(p, 'w').close(); sys.exit(3 * first)"
    lines: list[str] = []
    waits: list[float] = []
    code = supervise([sys.executable, "-c", script, str(marker)], report=lines.append, sleep=waits.append)
    assert code == 0
    assert waits == [1.0]
    assert lines == ["splan worker: the worker exited with status 3; starting a new one in 1 s"]


def test_sigterm_is_forwarded_and_ends_the_supervision() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers live on the main thread")
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    lines: list[str] = []
    try:
        code = supervise([sys.executable, "-c", "import time; time.sleep(30)"], report=lines.append)
    finally:
        timer.cancel()
    assert code == -signal.SIGTERM
    assert lines == []  # stopped, not restarted
    assert signal.getsignal(signal.SIGTERM) == before
