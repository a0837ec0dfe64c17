"""Dataset inputs: a folder of images with sidecars, webdataset tar shards, or a URL table (paper A.1).

Planning lists every input once, in a fixed order, as an :class:`InputRef` (where its image, caption and
metadata bytes live); workers later read one ref with :func:`read_input`. The order only depends on the
input's content, so a rerun plans the same shards:

- folder: every image file under the folder (recursively, paths sorted); ``NAME.txt`` next to it holds
  its caption, ``NAME.json`` its metadata (``caption``, ``aesthetic``, ``pwatermark``, ...). Files our
  own folder format writes beside an image (``NAME.mask.png``, ``NAME.face.png``, ``NAME.face.mask.png``)
  are not inputs.
- webdataset: uncompressed ``.tar`` files (a folder of them, one file, a ``{000..009}`` brace pattern or
  a glob), sorted; in each, the samples in tar order. A sample is the members sharing a key (the name up
  to the first dot of the file name); its ``jpg|jpeg|png|webp`` member is the image, ``txt`` the caption,
  ``json`` the metadata; samples without an image are skipped.
- URL table (``.parquet``, ``.csv``, ``.tsv``): downloaded by ``img2dataset`` into webdataset shards,
  then read as above. ``img2dataset`` pins ``opencv-python-headless``, which cannot share an environment
  with mediapipe's ``opencv-contrib-python``; when it is not installed the build stops with
  :class:`~omniportrait.errors.MissingDependencyError` explaining the two-step recipe.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from omniportrait.data.shards import iter_named_members
from omniportrait.errors import ConfigError, MissingDependencyError

__all__ = [
    "IMAGE_SUFFIXES",
    "SHARD_IMAGE_FIELDS",
    "Part",
    "InputRef",
    "RawInput",
    "InputReadError",
    "detect_input_kind",
    "plan_folder",
    "plan_tar_shards",
    "expand_shard_paths",
    "plan_digest",
    "read_input",
    "url_table_columns",
    "require_img2dataset",
    "download_url_table",
    "DOWNLOAD_RECIPE",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""File name endings read as images in a folder input."""

DERIVED_SUFFIXES = (".mask.png", ".face.png", ".face.mask.png")
"""Files the folder output format writes beside an image; never inputs themselves."""

SHARD_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
"""Webdataset fields read as the sample's image, first present wins."""

URL_TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}

DOWNLOAD_RECIPE = (
    "downloading a URL table needs img2dataset, which must not be installed next to mediapipe "
    "(it pins opencv-python-headless and both OpenCV wheels own cv2); run the download step in a separate "
    "environment: python -m venv dl && dl/bin/pip install img2dataset && dl/bin/img2dataset --url_list TABLE "
    "--input_format parquet --url_col url --caption_col caption --output_format webdataset "
    "--output_folder SHARDS --save_additional_columns '[\"aesthetic\",\"pwatermark\"]', "
    "then run: omniportrait build-dataset --input SHARDS --output DIR"
)


@dataclass(frozen=True)
class Part:
    """Bytes of one input field: a whole file (``size == -1``) or a byte range of a tar file."""

    field: str
    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        """The field's bytes (raises ``OSError`` when the file is gone or unreadable)."""
        with open(self.path, "rb") as stream:
            if self.size < 0:
                return stream.read()
            stream.seek(self.offset)
            data = stream.read(self.size)
        if len(data) != self.size:
            raise OSError(f"'{self.path}' ends inside member '{self.field}'")
        return data


@dataclass(frozen=True)
class InputRef:
    """One planned input: a name for reports and the :class:`Part`s holding its image and sidecars."""

    source: str
    parts: tuple[Part, ...]

    @property
    def has_caption_source(self) -> bool:
        """Whether a caption sidecar (``txt``) or metadata (``json``) comes with the image."""
        return any(part.field in ("txt", "json") for part in self.parts)

    def part(self, field: str) -> Part | None:
        """The part named ``field``, or ``None``."""
        return next((part for part in self.parts if part.field == field), None)


@dataclass(frozen=True)
class RawInput:
    """An input's bytes as read by a worker: image bytes, sidecar caption, metadata dict."""

    source: str
    data: bytes
    caption: str | None
    metadata: dict


class InputReadError(Exception):
    """An input's image or sidecar could not be read or parsed; the input counts as ``corrupt``."""


def detect_input_kind(path: str) -> str:
    """``"folder"``, ``"webdataset"`` or ``"urls"`` for ``--input-format auto``."""
    if any(char in path for char in "{*?["):
        return "webdataset"
    target = Path(path)
    if not target.exists():
        raise ConfigError(f"--input '{path}' does not exist; pass a folder of images, .tar shards or a URL table")
    if target.is_file():
        if target.suffix.lower() in URL_TABLE_SUFFIXES:
            return "urls"
        if target.suffix.lower() == ".tar":
            return "webdataset"
        raise ConfigError(
            f"--input '{path}' is neither a folder, a .tar shard nor a .parquet/.csv/.tsv URL table"
        )
    if _has_files(target, IMAGE_SUFFIXES):
        return "folder"
    if _has_files(target, (".tar",)):
        return "webdataset"
    raise ConfigError(f"--input '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")


def _has_files(folder: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether any file below ``folder`` ends in one of ``suffixes``."""
    for _, _, names in os.walk(folder):
        if any(name.lower().endswith(suffixes) for name in names):
            return True
    return False


def plan_folder(root: str, exclude: str | None = None) -> list[InputRef]:
    """Every image under ``root`` (sorted relative paths) with its ``.txt`` / ``.json`` sidecars.

    ``exclude`` is a folder to skip (the build's own output, when it lives inside the input).
    """
    root_path = Path(root)
    refs = []
    for folder, dirs, names in os.walk(root_path):
        dirs[:] = sorted(d for d in dirs if exclude is None or os.path.abspath(os.path.join(folder, d)) != exclude)
        present = set(names)
        for name in sorted(names):
            lower = name.lower()
            if not lower.endswith(IMAGE_SUFFIXES) or lower.endswith(DERIVED_SUFFIXES) or name.startswith("."):
                continue
            stem = name[: name.rfind(".")]
            parts = [Part("image", os.path.join(folder, name))]
            parts += [Part(ext, os.path.join(folder, f"{stem}.{ext}")) for ext in ("txt", "json") if f"{stem}.{ext}" in present]
            refs.append(InputRef(os.path.relpath(os.path.join(folder, name), root_path), tuple(parts)))
    refs.sort(key=lambda ref: ref.source)
    return refs


def expand_shard_paths(spec: str) -> list[str]:
    """The ``.tar`` files named by a folder, a file, a ``{a..b}`` brace pattern or a glob, sorted."""
    if "{" in spec:
        from braceexpand import braceexpand

        paths = [p for pattern in braceexpand(spec) for p in (sorted(glob.glob(pattern)) if _is_glob(pattern) else [pattern])]
    elif _is_glob(spec):
        paths = glob.glob(spec)
    elif os.path.isdir(spec):
        paths = [os.path.join(folder, name) for folder, _, names in os.walk(spec) for name in names if name.endswith(".tar")]
    else:
        paths = [spec]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"shard '{missing[0]}' does not exist; check the --input pattern")
    return sorted(dict.fromkeys(paths))


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def plan_tar_shards(paths: Iterable[str]) -> list[InputRef]:
    """Every sample with an image in the given uncompressed tar files, in file then tar order."""
    refs = []
    for path in paths:
        refs += _plan_one_tar(path)
    return refs


def _plan_one_tar(path: str) -> list[InputRef]:
    """Samples of one tar: consecutive members sharing a key form one sample."""
    try:
        with tarfile.open(path, "r:") as tar:
            groups = _group_members(tar)
    except (tarfile.TarError, OSError) as err:
        raise ConfigError(f"cannot read shard '{path}' ({err}); shards must be uncompressed .tar files") from err
    name = os.path.basename(path)
    refs = []
    for key, members in groups:
        image_field = next((f for f in SHARD_IMAGE_FIELDS if f in members), None)
        if image_field is None:
            continue
        parts = [Part("image", path, *members[image_field])]
        parts += [Part(f, path, *members[f]) for f in ("txt", "json") if f in members]
        refs.append(InputRef(f"{name}:{key}", tuple(parts)))
    return refs


def _group_members(tar: tarfile.TarFile) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {field: (offset, size)})]`` for the regular files of a tar, in order."""
    groups: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for info, key, field in iter_named_members(tar):
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        groups[-1][1][field.lower()] = (info.offset_data, info.size)
    return groups


def plan_digest(refs: list[InputRef]) -> str:
    """A sha256 over the planned inputs' names and sizes: a rerun on changed input is detected."""
    digest = hashlib.sha256()
    for ref in refs:
        sizes = ",".join(f"{p.field}={p.size if p.size >= 0 else _file_size(p.path)}" for p in ref.parts)
        digest.update(f"{ref.source}\t{sizes}\n".encode())
    return digest.hexdigest()


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def read_input(ref: InputRef) -> RawInput:
    """Read an input's image bytes, caption sidecar and metadata; :class:`InputReadError` when unreadable."""
    try:
        data = ref.part("image").read()
        txt = ref.part("txt")
        meta = ref.part("json")
        caption = txt.read().decode("utf-8").strip() if txt is not None else None
        metadata = json.loads(meta.read().decode("utf-8")) if meta is not None else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputReadError(f"{ref.source}: {err}") from err
    if not isinstance(metadata, dict):
        raise InputReadError(f"{ref.source}: the .json sidecar is not an object")
    return RawInput(ref.source, data, caption or None, metadata)


def url_table_columns(path: str) -> list[str]:
    """Column names of a ``.parquet``, ``.csv`` or ``.tsv`` URL table (reads the header only)."""
    kind = URL_TABLE_SUFFIXES[Path(path).suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError subclasses
            raise ConfigError(f"cannot read the parquet table '{path}' ({err}); check the file") from err
    with open(path, encoding="utf-8", errors="replace") as stream:
        header = stream.readline().rstrip("\r\n")
    return [name.strip().strip('"') for name in header.split("\t" if kind == "tsv" else ",")]


def require_img2dataset():
    """The ``img2dataset`` module, or :class:`MissingDependencyError` with the two-step recipe."""
    if importlib.util.find_spec("img2dataset") is None:
        raise MissingDependencyError(DOWNLOAD_RECIPE)
    return importlib.import_module("img2dataset")


def download_url_table(
    table: str,
    folder: str,
    *,
    url_col: str,
    caption_col: str | None,
    extra_columns: list[str],
    processes: int,
    shard_size: int,
) -> list[str]:
    """Download ``table`` with img2dataset into webdataset shards under ``folder``; return the shard paths.

    Images are stored as downloaded (``resize_mode="no"``), so the size filter sees the original size;
    img2dataset's incremental mode skips shards a killed run already finished.
    """
    img2dataset = require_img2dataset()
    kind = URL_TABLE_SUFFIXES[Path(table).suffix.lower()]
    img2dataset.download(
        url_list=table,
        input_format=kind,
        url_col=url_col,
        caption_col=caption_col,
        output_format="webdataset",
        output_folder=folder,
        processes_count=max(1, processes),
        number_sample_per_shard=shard_size,
        resize_mode="no",
        save_additional_columns=extra_columns or None,
        incremental_mode="incremental",
        enable_wandb=False,
    )
    return expand_shard_paths(folder)
