"""Read training records back for the Pivot ID Encoder (paper §3.2): shards of a build, or plain folders.

Every reader yields :class:`~omniportrait.data.records.TrainingRecord` (re-exported here):

- ``image``: PIL RGB; ``caption``: str; ``class_word`` with ``class_span = (start, end)`` character offsets
  into ``caption`` and its singular ``class_lemma``;
- ``face_crop``: PIL RGB aligned crop (224² by default) and ``face_crop_mask`` (bool, crop frame);
- ``face_mask``: bool ``H×W`` in the image frame (the localization loss target M, eq. 5);
- ``face_box``, ``person_box``: ``(x0, y0, x1, y1)`` image pixels; ``face_score``; ``crop_matrix`` (2×3,
  image → crop); ``aesthetic``, ``watermark``, ``source``, ``metadata``.

Sources (one, or a list of them):

- a build folder (it holds ``build.json``): its ``shards/``;
- webdataset ``.tar`` shards: a folder of them, one file, a ``{000..009}`` brace pattern or a glob;
- a folder in the plain folder format (see ``docs/dataset.md``): ``NAME.jpg|png`` + ``NAME.json`` +
  ``NAME.mask.png``, optionally ``NAME.face.png`` and ``NAME.face.mask.png``; searched recursively.
  ``NAME.json`` needs ``caption``, ``class_word`` and ``face_box``; ``class_span`` defaults to the first
  whole-word occurrence of the class word, the crop to ``crop_matrix`` or else a square crop around the
  face box with :data:`~omniportrait.faces.DEFAULT_MARGIN` margin, ``face_score`` to 1.

:class:`TrainingRecordDataset` is a ``torch.utils.data.IterableDataset``: shards (for folders: records)
are split between distributed ranks and DataLoader workers, optionally shuffled per epoch
(:meth:`~TrainingRecordDataset.set_epoch`). Use ``collate_fn=collate_records`` (records are not tensors)
or a ``transform`` that turns a record into tensors.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from omniportrait.data.records import TrainingRecord, decode_image, decode_mask, encode_mask, record_from_sample
from omniportrait.data.shards import iter_tar_samples
from omniportrait.errors import ConfigError

__all__ = [
    "TrainingRecord",
    "TrainingRecordDataset",
    "collate_records",
    "iter_records",
    "list_units",
    "read_unit",
    "record_from_fields",
]

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
RECORD_FIELDS = (*IMAGE_FIELDS, "json", "txt", "mask.png", "face.png", "face.mask.png")
DEFAULT_CROP_SIZE = 224


def list_units(source: Source) -> list[tuple[str, str]]:
    """The readable units of ``source``: ``("tar", path)`` per shard, ``("record", json path)`` per
    plain-folder record, in a fixed order."""
    if not isinstance(source, (str, os.PathLike)):
        return [unit for item in source for unit in list_units(item)]
    text = os.fspath(source)
    if any(char in text for char in "{*?["):
        from omniportrait.data.sources import expand_shard_paths

        return [("tar", path) for path in expand_shard_paths(text)]
    path = Path(text)
    if path.is_file():
        if path.suffix != ".tar":
            raise ConfigError(f"'{path}' is not a .tar shard; pass a build folder, shards or a record folder")
        return [("tar", str(path))]
    if not path.is_dir():
        raise ConfigError(f"dataset '{path}' does not exist; pass a build folder, shards or a record folder")
    if (path / "build.json").is_file() and (path / "shards").is_dir():
        path = path / "shards"
    tars = sorted(str(p) for p in path.rglob("*.tar") if not p.name.startswith("."))
    if tars:
        return [("tar", p) for p in tars]
    return [("record", str(p)) for p in sorted(path.rglob("*.json"))
            if not p.name.startswith(".") and not _in_hidden_folder(p, path) and _has_image(p)]


def _in_hidden_folder(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


def _has_image(json_path: Path) -> bool:
    stem = json_path.name[: -len(".json")]
    return "." not in stem and any((json_path.parent / f"{stem}.{ext}").is_file() for ext in IMAGE_FIELDS)


def read_unit(unit: tuple[str, str]) -> Iterator[TrainingRecord]:
    """The records of one unit from :func:`list_units`."""
    kind, path = unit
    if kind == "tar":
        for key, fields in iter_tar_samples(path):
            if "json" in fields:
                yield record_from_fields(key, fields, name=f"{path}:{key}")
        return
    json_path = Path(path)
    stem = json_path.name[: -len(".json")]
    fields = {}
    for field in RECORD_FIELDS:
        candidate = json_path.parent / f"{stem}.{field}"
        if candidate.is_file():
            fields[field] = candidate.read_bytes()
    yield record_from_fields(stem, fields, name=str(json_path))


def record_from_fields(key: str, fields: dict[str, bytes], *, name: str | None = None) -> TrainingRecord:
    """Decode a sample of a shard or a plain-folder record, filling the optional parts (see module doc)."""
    name = name or key
    try:
        meta = json.loads(fields["json"])
    except (KeyError, ValueError) as err:
        raise ConfigError(f"record '{name}' has no readable .json ({err})") from err
    missing = [f for f in ("caption", "class_word", "face_box") if f not in meta]
    if missing:
        raise ConfigError(f"record '{name}': its .json lacks {', '.join(missing)}; see docs/dataset.md")
    if not any(f in fields for f in IMAGE_FIELDS) or "mask.png" not in fields:
        raise ConfigError(f"record '{name}' needs an image (.jpg/.png) and a face mask (.mask.png)")
    if all(f in fields for f in ("face.png", "face.mask.png")) and "class_span" in meta and "crop_matrix" in meta:
        return record_from_sample(fields, key=meta.get("key", key))
    return record_from_sample(_completed(key, fields, meta, name), key=meta.get("key", key))


def _completed(key: str, fields: dict[str, bytes], meta: dict, name: str) -> dict[str, bytes]:
    """Fields of a hand-made record with span, score, crop and crop mask filled in."""
    meta = dict(meta)
    meta.setdefault("key", key)
    meta.setdefault("face_score", 1.0)
    meta.setdefault("person_box", None)
    if "class_span" not in meta:
        meta["class_span"] = list(_find_word(meta["caption"], meta["class_word"], name))
    size = int(meta.get("crop_size", DEFAULT_CROP_SIZE))
    image = decode_image(next(fields[f] for f in IMAGE_FIELDS if f in fields))
    if "crop_matrix" not in meta:
        meta["crop_matrix"] = _box_crop_matrix(meta["face_box"], size).tolist()
    matrix = np.asarray(meta["crop_matrix"], dtype=np.float64)
    completed = dict(fields)
    completed["json"] = json.dumps(meta).encode("utf-8")
    if "face.png" not in completed:
        completed["face.png"] = _png(_warp(image, matrix, size, Image.BICUBIC))
    if "face.mask.png" not in completed:
        mask = Image.fromarray(decode_mask(fields["mask.png"]).astype(np.uint8) * 255, "L")
        completed["face.mask.png"] = encode_mask(np.asarray(_warp(mask, matrix, size, Image.BILINEAR)) >= 128)
    return completed


def _find_word(caption: str, word: str, name: str) -> tuple[int, int]:
    """Span of the first whole-word, case-insensitive occurrence of ``word`` in ``caption``."""
    match = re.search(rf"\b{re.escape(word)}\b", caption, flags=re.IGNORECASE)
    if match is None:
        raise ConfigError(f"record '{name}': class word '{word}' is not in its caption; fix class_word or class_span")
    return match.start(), match.end()


def _box_crop_matrix(box: Sequence[float], size: int) -> np.ndarray:
    """Image → crop affine of a square crop centred on ``box``, margin DEFAULT_MARGIN of its longer side."""
    from omniportrait.faces.align import DEFAULT_MARGIN

    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * DEFAULT_MARGIN)
    scale = size / max(side, 1e-6)
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([[scale, 0.0, size / 2 - scale * centre_x], [0.0, scale, size / 2 - scale * centre_y]])


def _warp(image: Image.Image, matrix: np.ndarray, size: int, resample: int) -> Image.Image:
    """Resample ``image`` through the image → crop ``matrix`` into a ``size×size`` crop."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    return image.transform((size, size), Image.AFFINE, tuple(inverse.ravel()), resample=resample, fillcolor=0)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def iter_records(source: Source) -> Iterator[TrainingRecord]:
    """Every record of ``source`` in order (no shuffling, no splitting)."""
    for unit in list_units(source):
        yield from read_unit(unit)


def collate_records(batch: list) -> list:
    """DataLoader ``collate_fn`` that keeps a batch of records as a list."""
    return list(batch)


class TrainingRecordDataset(torch.utils.data.IterableDataset):
    """Training records as a ``torch`` iterable dataset, split between ranks and DataLoader workers.

    Args:
        source: a build folder, shards, a record folder, or a list of them (see the module docstring).
        shuffle: shuffle the unit order per epoch, and records through a buffer of ``shuffle_buffer``.
        seed: base seed of the shuffling; the epoch (:meth:`set_epoch`) is added to it.
        shuffle_buffer: records held for shuffling (0: shuffle units only).
        transform: applied to each record (e.g. to tensors); the record itself when ``None``.
        rank, world_size: this process's share in distributed training; read from
            ``torch.distributed`` when initialised and not given.

    Units (shards, or records of a plain folder) are dealt round-robin to ``world_size × num_workers``
    readers, so give at least that many shards to keep every reader busy.
    """

    def __init__(
        self,
        source: Source,
        *,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        transform: Callable[[TrainingRecord], object] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.units = list_units(source)
        if not self.units:
            raise ConfigError(f"no training records found in {source!r}")
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently for each epoch (call before iterating, on every rank)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[object]:
        reader, readers = self._reader_slot()
        units = list(self.units)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(units)
        records = (record for unit in units[reader::readers] for record in read_unit(unit))
        if self.shuffle and self.shuffle_buffer > 0:
            records = _buffer_shuffled(records, self.shuffle_buffer, random.Random(f"{self.seed}:{self.epoch}:{reader}"))
        for record in records:
            yield self.transform(record) if self.transform is not None else record

    def _reader_slot(self) -> tuple[int, int]:
        """``(index, count)`` of this reader among all ranks × DataLoader workers."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            world = torch.distributed.get_world_size() if distributed else 1
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers


def _buffer_shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of ``size`` items."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
