"""Worker processes that die with their parent.

A dataset-build pool worker or a DataLoader worker whose main process is killed (``kill -9``, the OOM killer)
must not live on: an orphan keeps its memory and, in a build, goes on writing into a folder a rerun now owns.
:func:`die_with_parent` runs first in every such worker: on Linux it asks the kernel to send it ``SIGKILL``
when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere it also starts a thread that exits the
process once its parent has changed (the orphan is adopted by another process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 1.0
"""How often the watch thread looks at the parent: a worker outlives its parent by at most this long."""


def _set_parent_death_signal() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)``; ``False`` where the call is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def die_with_parent(parent: int, *_ignored) -> None:
    """Make this process exit when process ``parent`` (the one that started it) dies.

    Pass the parent's pid as seen by the parent (``os.getpid()`` there): a worker whose parent died before
    this call ran exits at once. Extra arguments (a DataLoader's worker id) are ignored, so the function
    serves as a pool ``initializer`` and as a ``worker_init_fn`` alike.
    """
    _set_parent_death_signal()
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="omniportrait-parent-watch", daemon=True).start()


def _state_and_start(pid: int) -> tuple[str, str] | None:
    """The process's state and start time (clock ticks since boot) from ``/proc``; None if it is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _running(pid: int) -> bool:
    found = _state_and_start(pid)
    return found is not None and found[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def reap_when_gone(parent: int, pids: list[int]):
    """Start a watcher, in a session of its own, that kills ``pids`` once ``parent`` is gone.

    For processes the parent did not start itself and so cannot make die with it: a local Ray instance's GCS,
    raylet and agents (Ray stops its workers when the driver dies, but its agents live on, adopted by init). Each pid
    is killed only if it is still the process that was running when the watcher started (same start time)."""
    import subprocess

    known = [f"{pid}:{found[1]}" for pid in pids if (found := _state_and_start(pid)) is not None]
    return subprocess.Popen([sys.executable, "-m", "omniportrait.processes", str(parent), *known],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _reap(parent: int, known: list[str]) -> None:
    while _running(parent):
        time.sleep(PARENT_POLL_S / 4)
    for item in known:
        pid, start = item.split(":")
        found = _state_and_start(int(pid))
        if found is not None and found[1] == start:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    _reap(int(sys.argv[1]), sys.argv[2:])
