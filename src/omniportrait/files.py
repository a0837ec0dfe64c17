"""Atomic file writes: write to a hidden temporary file in the same folder, fsync, then ``os.replace``.

A reader never sees half a file and a killed process leaves no partial output (DESIGN §5). Files get the
permissions a normally created file gets (``mkstemp`` alone would make them private).
"""

from __future__ import annotations

import json
import math
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


def strict_json_value(value):
    """``value`` with every non-finite float (NaN, ±Infinity) replaced by ``None``: what strict JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def write_json_atomic(path: str | os.PathLike, value, indent: int = 2, sort_keys: bool = False) -> Path:
    """``value`` as strict JSON (``default=str`` for paths and the like; NaN and infinities become ``null``, so
    every reader, not only Python's, can parse the file), atomically."""
    text = json.dumps(strict_json_value(value), indent=indent, sort_keys=sort_keys, default=str,
                      allow_nan=False) + "\n"
    return write_text_atomic(path, text)


# -- checks before work starts: is this path usable for what it is asked to be? ---------------------------


def check_input_file(path: str | os.PathLike) -> Path:
    """An existing regular file; ``ConfigError`` naming what the path is instead."""
    from omniportrait.errors import ConfigError

    given = Path(os.path.expanduser(str(path)))
    if not str(path).strip():
        raise ConfigError("the file path is empty")
    if not given.exists():
        raise ConfigError(f"{path} does not exist")
    if given.is_dir():
        raise ConfigError(f"{path} is a folder; give a file")
    if not given.is_file():
        raise ConfigError(f"{path} is not a regular file")
    return given


def check_input_folder(path: str | os.PathLike) -> Path:
    """An existing folder; ``ConfigError`` naming what the path is instead."""
    from omniportrait.errors import ConfigError

    given = Path(os.path.expanduser(str(path)))
    if not str(path).strip():
        raise ConfigError("the folder path is empty")
    if not given.exists():
        raise ConfigError(f"{path} does not exist")
    if not given.is_dir():
        raise ConfigError(f"{path} is a file, not a folder")
    return given


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest folder above it that exists (the one a ``mkdir -p`` would start from)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(os.sep)


def _check_creatable_below(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` is a folder we may write into."""
    from omniportrait.errors import ConfigError

    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be created: {existing} is not writable (read-only or no permission)")


def check_output_file(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """A file this process can create or replace: the right ``suffix``, not a folder or device, and its folder
    writable or creatable. Nothing is written; the check runs before any model loads (DESIGN §5)."""
    from omniportrait.errors import ConfigError

    if not str(path).strip():
        raise ConfigError("the output path is empty")
    given = Path(os.path.expanduser(str(path)))
    if suffix and given.suffix.lower() != suffix:
        raise ConfigError(f"{path!s} must end in {suffix}")
    if given.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name ending in {suffix or 'a file name'}")
    if os.path.lexists(given) and not given.is_file():
        raise ConfigError(f"{path} is a device or special file; give a regular file name")
    if given.is_file() and not os.access(given, os.W_OK):
        raise ConfigError(f"{path} exists and is not writable")
    _check_creatable_below(given, "output file")
    return given


def check_output_folder(path: str | os.PathLike) -> Path:
    """A folder this process can create or write into; ``ConfigError`` otherwise. Nothing is written."""
    from omniportrait.errors import ConfigError

    if not str(path).strip():
        raise ConfigError("the output folder path is empty")
    given = Path(os.path.expanduser(str(path)))
    if given.is_dir():
        if not os.access(given, os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {path} is not writable (read-only or no permission)")
        return given
    if os.path.lexists(given):
        raise ConfigError(f"output folder {path} is a file or device; give a folder")
    _check_creatable_below(given, "output folder")
    return given
