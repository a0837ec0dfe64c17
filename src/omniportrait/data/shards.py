"""Shard files: atomic writers for webdataset tars and record folders, and their readers.

Every file a build leaves is complete or absent: writers fill a hidden temporary name in the target's
folder and ``os.replace`` it onto the final name, so a killed build leaves at most a ``.*.tmp`` file that
the next run deletes. Tar members get fixed metadata (mtime 0, mode 0644, no owner) so the same records
give byte-identical shards, which is how a resumed build is checked against an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = [
    "TarShardWriter",
    "FolderShardWriter",
    "iter_tar_samples",
    "iter_folder_samples",
    "write_bytes_atomic",
    "write_json_atomic",
    "remove_stale_temporaries",
    "TEMP_SUFFIX",
]

TEMP_SUFFIX = ".tmp"
"""Ending of every temporary file or folder a writer creates (always hidden: the name starts with a dot)."""


def _publishable(path: str | os.PathLike, is_dir: bool = False) -> None:
    """Give a temporary file or folder the permissions a normally created one gets (``mkstemp`` makes
    them private, which would hide the shards from the other users of a shared cluster)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_UMASK)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _current_umask()


class TarShardWriter:
    """Writes samples into ``path`` (a ``.tar``) through a temporary file; :meth:`commit` publishes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, self._temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX)
        _publishable(self._temp)
        self._stream = os.fdopen(handle, "wb")
        self._tar = tarfile.open(fileobj=self._stream, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        """Append one sample: a member ``KEY.FIELD`` per field, in the dict's order."""
        for field, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))

    def commit(self) -> Path:
        """Finish the tar, flush it to disk and move it onto its final name."""
        self._tar.close()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self._temp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (nothing is published)."""
        self._tar.close()
        self._stream.close()
        Path(self._temp).unlink(missing_ok=True)


class FolderShardWriter:
    """Writes samples as plain files ``KEY.FIELD`` into the folder ``path``, published by renaming."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX))
        _publishable(self._temp, is_dir=True)

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        """Write one record's files."""
        for field, data in fields.items():
            (self._temp / f"{key}.{field}").write_bytes(data)

    def commit(self) -> Path:
        """Move the finished folder onto its final name (replacing an unfinished earlier copy)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self._temp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the temporary folder."""
        shutil.rmtree(self._temp, ignore_errors=True)


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {field: bytes})`` for each sample of a tar, consecutive members grouped by key."""
    key, fields = None, {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, _, base = info.name.rpartition("/")
            if "." not in base or base.startswith("."):
                continue
            stem, field = base.split(".", 1)
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and fields:
                yield key, fields
                fields = {}
            key = member_key
            fields[field] = tar.extractfile(info).read()
    if fields:
        yield key, fields


def iter_folder_samples(folder: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {field: bytes})`` for each ``KEY.json`` of a record folder, keys sorted.

    A key is a file name up to its first dot, so record names must not contain dots.
    """
    groups: dict[str, dict[str, Path]] = {}
    for path in Path(folder).iterdir():
        if path.is_file() and not path.name.startswith(".") and "." in path.name:
            key, field = path.name.split(".", 1)
            groups.setdefault(key, {})[field] = path
    for key in sorted(groups):
        if "json" in groups[key]:
            yield key, {field: path.read_bytes() for field, path in sorted(groups[key].items())}


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        _publishable(temp)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as indented, key-sorted JSON, atomically."""
    return write_bytes_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the ``.*.tmp`` files and folders a killed build left in ``folder``; return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(stale)
