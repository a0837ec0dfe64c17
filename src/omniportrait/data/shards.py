"""Shard files: atomic writers for webdataset tars and record folders, and their readers.

Every file a build leaves is complete or absent: writers fill a hidden temporary name in the target's
folder and ``os.replace`` it onto the final name, so a killed build leaves at most a ``.*.tmp`` file that
the next run deletes. Tar members get fixed metadata (mtime 0, mode 0644, no owner) so the same records
give byte-identical shards, which is how a resumed build is checked against an uninterrupted one.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from omniportrait.files import TEMP_SUFFIX, make_publishable

__all__ = [
    "TarShardWriter",
    "FolderShardWriter",
    "iter_tar_samples",
    "iter_folder_samples",
    "remove_stale_temporaries",
    "TEMP_SUFFIX",
]


class TarShardWriter:
    """Writes samples into ``path`` (a ``.tar``) through a temporary file; :meth:`commit` publishes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, self._temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX)
        make_publishable(self._temp)
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
        make_publishable(self._temp, is_dir=True)

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


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset naming: ``dir/KEY.FIELD`` -> ``("dir/KEY", "FIELD")``; ``None`` for hidden or field-less names."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, field = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), field


def iter_named_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """``(info, key, field)`` for each regular, webdataset-named member of an open tar, in order."""
    for info in tar:
        parsed = split_member_name(info.name) if info.isfile() else None
        if parsed is not None:
            yield info, *parsed


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {field: bytes})`` for each sample of a tar, consecutive members grouped by key."""
    key, fields = None, {}
    with tarfile.open(path, "r:") as tar:
        for info, member_key, field in iter_named_members(tar):
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


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the ``.*.tmp`` files and folders a killed build left in ``folder``; return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(stale)
