"""Workers die with their parent: kill -9 the main process, then poll for its build-dataset pool workers
and DataLoader workers (omniportrait.processes)."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 10.0


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def read_pids(process: subprocess.Popen, count: int, timeout: float = 120.0) -> list[int]:
    pids: list[int] = []
    deadline = time.monotonic() + timeout
    while len(pids) < count:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"the workers did not report within {timeout} s")
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the parent exited: {process.stderr.read()}")
        pids += [int(word) for word in line.split()]
    return pids


def seconds_until_gone(pids: list[int], deadline: float = DEADLINE_S) -> float:
    started = time.monotonic()
    while any(alive(pid) for pid in pids) and time.monotonic() - started < deadline + 5:
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kind", ["pool", "dataloader", "ray"])
def test_workers_exit_when_their_parent_is_killed(kind):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    process = subprocess.Popen([sys.executable, "-m", "tests._orphans", kind, "2"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = read_pids(process, 2)
        assert all(alive(pid) for pid in pids) and process.pid not in pids
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        took = seconds_until_gone(pids)
        print(f"{kind}: workers gone {took:.2f} s after kill -9 of their parent")
        assert not any(alive(pid) for pid in pids), f"workers {pids} outlived their parent"
        assert took < DEADLINE_S
    finally:
        process.kill()
        process.wait()
        for pid in pids:  # workers that outlived the parent (the test failed): do not leave them running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
