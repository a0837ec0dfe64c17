"""Atomic file writes: write to a hidden temporary file in the same folder, fsync, then ``os.replace``.

A reader never sees half a file and a killed process leaves no partial output (DESIGN §5). Files get the
permissions a normally created file gets (``mkstemp`` alone would make them private).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

TEMP_SUFFIX = ".tmp"
"""Ending of every temporary file or folder (the name also starts with a dot, so it is hidden)."""


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _current_umask()


def make_publishable(path: str | os.PathLike, is_dir: bool = False) -> None:
    """Give a temporary file or folder the permissions a normally created one gets."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_UMASK)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary stream that becomes ``path`` when the block ends without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        make_publishable(temp)
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as stream:
        stream.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8") if isinstance(text, str) else text)


def write_json_atomic(path: str | os.PathLike, value, indent: int = 2, sort_keys: bool = False) -> Path:
    """``value`` as JSON (``default=str`` for paths and the like), atomically."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, default=str) + "\n"
    return write_text_atomic(path, text)
