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
