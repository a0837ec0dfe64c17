"""Import ``mediapipe`` lazily, quietly, with a clear error when the ``faces`` extra is missing.

MediaPipe's native code logs start-up chatter to the process's stderr (TFLite's XNNPACK notice, absl's
"log messages before InitializeLog" banner, a feedback-tensor warning per model) and protobuf warns about
a deprecated call. :func:`native_stderr_filtered` drops those lines (and absl INFO lines) and passes
every other line through, so real native warnings and errors still reach the user.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np

from omniportrait.errors import MissingDependencyError

_NOISE = re.compile(
    rb"^(INFO: Created TensorFlow Lite XNNPACK delegate"
    rb"|WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|W0000 .*inference_feedback_manager\.cc"
    rb"|I0000 )"
)
_PROTOBUF_DEPRECATION = r"SymbolDatabase\.GetPrototype\(\) is deprecated"
_STDERR_LOCK = threading.Lock()
_SETTLE_S = 0.05
_WARM_UP_SIDE = 64


def import_mediapipe() -> ModuleType:
    """Return the ``mediapipe`` module, or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        return _import_quietly()
    except ImportError as err:
        raise MissingDependencyError(
            f"face analysis needs mediapipe ({err}); install it with: pip install 'omniportrait[faces]'"
        ) from err


def _import_quietly() -> ModuleType:
    """Import mediapipe with its native log level lowered and protobuf's deprecation warning filtered."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _ignore_protobuf_deprecation()
    import mediapipe

    return mediapipe


def _ignore_protobuf_deprecation() -> None:
    """Hide protobuf's "GetPrototype() is deprecated" warning, which MediaPipe triggers on every result."""
    warnings.filterwarnings("ignore", message=_PROTOBUF_DEPRECATION, category=UserWarning)


@functools.lru_cache(maxsize=None)
def face_mesh_connections() -> ModuleType:
    """MediaPipe's Face Mesh topology constants (``FACEMESH_FACE_OVAL``, ``FACEMESH_LEFT_EYE``, ...)."""
    return import_mediapipe().solutions.face_mesh_connections


def create_solution(factory: Callable[[], Any]) -> Any:
    """Build a MediaPipe solution and run it once on a blank image, with its start-up chatter filtered.

    Model loading logs from graph threads; the warm-up run and a short settle time let those lines land
    inside the filter instead of surfacing later.
    """
    with native_stderr_filtered(settle_s=_SETTLE_S):
        solution = factory()
        solution.process(np.zeros((_WARM_UP_SIDE, _WARM_UP_SIDE, 3), np.uint8))
    return solution


@contextlib.contextmanager
def native_stderr_filtered(settle_s: float = 0.0) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2, then re-emit all but MediaPipe's chatter.

    ``settle_s`` keeps the capture open that much longer, for lines that native threads log late. The
    protobuf deprecation warning is also ignored inside the block (test runners reset global filters).
    """
    stderr_fd = 2
    with _STDERR_LOCK, warnings.catch_warnings(), tempfile.TemporaryFile() as capture:
        _ignore_protobuf_deprecation()
        _flush_python_stderr()
        saved_fd = os.dup(stderr_fd)
        os.dup2(capture.fileno(), stderr_fd)
        try:
            yield
            if settle_s > 0:
                time.sleep(settle_s)
        finally:
            _flush_python_stderr()
            os.dup2(saved_fd, stderr_fd)
            os.close(saved_fd)
            capture.seek(0)
            _reemit(capture.read(), stderr_fd)


def _flush_python_stderr() -> None:
    """Flush Python's buffered stderr so its text lands on the right side of the redirection."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()


def _reemit(captured: bytes, stderr_fd: int) -> None:
    """Write the captured lines that are not known MediaPipe chatter back to stderr."""
    kept = [line for line in captured.splitlines(keepends=True) if not _NOISE.match(line)]
    if kept:
        os.write(stderr_fd, b"".join(kept))
