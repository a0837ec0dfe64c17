"""Training records -> tensors, in a fixed, resumable order, split between processes.

Records come from :mod:`omniportrait.data.loader`: the webdataset shards the dataset builder writes, or
the plain folder format (``NAME.jpg|png`` + ``NAME.json`` + ``NAME.mask.png``, ``docs/dataset.md``).
The loader's *units* (one per shard, one per folder record) are shuffled per epoch with a fixed seed and
dealt round-robin to the processes; each process reads only its units. Process ``r``'s micro-batch
``m`` is the ``m``-th run of ``batch_size`` usable records of its stream, and DataLoader workers take
micro-batches in turn. The data position saved in checkpoints is ``m`` (the micro-batches each process
has consumed): a run resumed on the same number of processes sees exactly the records an uninterrupted
run would. Skipped records are read (their JSON, or their tar bytes) but not decoded.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from omniportrait.errors import ClassWordError, ConfigError, OmniPortraitError
from omniportrait.identity import locate_class_word

REQUIRED_FIELDS = ("caption", "class_word", "face_box")


@dataclass
class RecordRef:
    """A record of a process's stream: the JSON fields to check it, and how to decode it."""

    key: str
    meta: dict
    load: Callable[[], object]


def _loader():
    try:
        from omniportrait.data import loader
    except ImportError as err:  # pragma: no cover - the dataset extra brings what the loader imports
        raise ConfigError(f"reading training records needs the dataset reader ({err}); "
                          "pip install 'omniportrait[dataset]'") from err
    return loader


def _parse_meta(raw: bytes | str) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def unit_refs(unit: tuple[str, str]) -> Iterator[RecordRef]:
    """The records of one loader unit (a shard, or a folder record), not yet decoded."""
    loader = _loader()
    kind, path = unit
    if kind == "tar":
        from omniportrait.data.shards import iter_tar_samples

        for key, fields in iter_tar_samples(path):
            if "json" in fields:
                yield RecordRef(key, _parse_meta(fields["json"]),
                                partial(loader.record_from_fields, key, fields, name=f"{path}:{key}"))
        return
    json_path = Path(path)
    try:
        meta = _parse_meta(json_path.read_bytes())
    except OSError:
        meta = {}
    yield RecordRef(json_path.name[: -len(".json")], meta, lambda: next(iter(loader.read_unit(unit))))


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of ``range(size)`` used for ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(size)


class RecordSource:
    """The units of a record folder, build folder or shards, and each process's share of them."""

    def __init__(self, data: str, seed: int = 0):
        self.data = data
        self.seed = seed
        self.units = _loader().list_units(data)
        if not self.units:
            raise ConfigError(
                f"no training records in {data}: expected webdataset shards or NAME.jpg|png + NAME.json + "
                "NAME.mask.png per record (docs/dataset.md)"
            )

    def __len__(self) -> int:
        return len(self.units)

    def check_processes(self, world_size: int) -> None:
        if len(self.units) < world_size:
            raise ConfigError(
                f"{self.data} has {len(self.units)} shard(s) for {world_size} processes; each process reads "
                "whole shards, so write at least as many shards as processes (smaller shards)"
            )

    def stream(self, rank: int = 0, world_size: int = 1) -> Iterator[RecordRef]:
        """Process ``rank``'s records, epoch after epoch, forever."""
        self.check_processes(world_size)
        for epoch in itertools.count():
            for unit_index in epoch_order(len(self.units), self.seed, epoch)[rank::world_size]:
                yield from unit_refs(self.units[int(unit_index)])

    def first(self):
        """The first record of the first unit (the default reference of the samples)."""
        for ref in unit_refs(self.units[0]):
            return ref.load()
        raise ConfigError(f"the first unit of {self.data} holds no record")


# ---------------------------------------------------------------------------------------------- record -> tensors


def class_word_positions(tokenizer, caption: str, word: str, span: tuple[int, int] | None) -> list[int]:
    """Token positions of the class word; with a character span, of that occurrence only."""
    if span is None:
        return locate_class_word(tokenizer, caption, word)
    start, end = (int(v) for v in span)
    spelled = caption[start:end]
    if not spelled.strip():
        raise ClassWordError(f"class span {span} is empty in caption {caption!r}")
    pattern = re.compile(rf"(?<!\w){re.escape(spelled.lower())}(?!\w)")
    occurrence = sum(1 for match in pattern.finditer(caption.lower()) if match.start() < start) + 1
    return locate_class_word(tokenizer, caption, spelled, occurrence)


def meta_is_usable(meta: dict, tokenizer) -> bool:
    """Whether a record's JSON has what training needs and its class word can be bound."""
    if any(name not in meta for name in REQUIRED_FIELDS):
        return False
    try:
        span = meta.get("class_span")
        class_word_positions(tokenizer, str(meta["caption"]), str(meta["class_word"]),
                             tuple(span) if span is not None else None)
    except (TypeError, ValueError, OmniPortraitError):
        return False
    return True


def resize_and_center_crop(image: Image.Image, resolution: int, resample) -> tuple[Image.Image, int, int]:
    """Shorter side to ``resolution``, centre square crop; returns the crop and its (top, left) corner."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, resample)
    top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution)), top, left


@dataclass
class TrainExample:
    key: str
    pixel_values: torch.Tensor  # (3, R, R) in [-1, 1]
    mask: torch.Tensor  # (1, R, R) in [0, 1]
    face: Image.Image
    caption: str
    positions: list[int]
    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def to_example(record, resolution: int, tokenizer) -> TrainExample:
    """A loader record -> tensors: image and mask resized and cropped alike, class-word token positions."""
    positions = class_word_positions(tokenizer, record.caption, record.class_word, record.class_span)
    mask_image = Image.fromarray(np.asarray(record.face_mask, bool).astype(np.uint8) * 255)
    image, top, left = resize_and_center_crop(record.image.convert("RGB"), resolution, Image.BICUBIC)
    mask, _, _ = resize_and_center_crop(mask_image.resize(record.image.size, Image.BILINEAR), resolution,
                                        Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    mask_tensor = torch.from_numpy(np.asarray(mask, np.float32) / 255.0)[None]
    return TrainExample(record.key, pixels, mask_tensor, record.face_crop, record.caption, positions,
                        (record.image.height, record.image.width), (top, left))


@dataclass
class TrainBatch:
    """One process's micro-batch; ``position`` counts the micro-batches consumed after this one."""

    keys: list[str]
    pixel_values: torch.Tensor
    masks: torch.Tensor
    faces: list[Image.Image]
    captions: list[str]
    positions: list[list[int]]
    original_sizes: list[tuple[int, int]]
    crop_top_lefts: list[tuple[int, int]]
    position: int = 0
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def collate(examples: list[TrainExample], position: int, skipped: list[str] | None = None) -> TrainBatch:
    return TrainBatch(
        keys=[e.key for e in examples],
        pixel_values=torch.stack([e.pixel_values for e in examples]),
        masks=torch.stack([e.mask for e in examples]),
        faces=[e.face for e in examples],
        captions=[e.caption for e in examples],
        positions=[e.positions for e in examples],
        original_sizes=[e.original_size for e in examples],
        crop_top_lefts=[e.crop_top_left for e in examples],
        position=position,
        skipped=list(skipped or []),
    )


def usable_refs(refs: Iterator[RecordRef], tokenizer, patience: int) -> Iterator[RecordRef]:
    """Records whose class word can be bound; :class:`ConfigError` after ``patience`` unusable ones in a row."""
    misses = 0
    for ref in refs:
        if meta_is_usable(ref.meta, tokenizer):
            misses = 0
            yield ref
            continue
        misses += 1
        if misses >= patience:
            raise ConfigError(
                f"{patience} records in a row are unusable: each needs caption, class_word and face_box in its "
                "JSON, and a caption that contains the class word within the text encoder's 77 tokens"
            )


def load_examples(refs: list[RecordRef], resolution: int, tokenizer) -> tuple[list[TrainExample], list[str]]:
    """Decode a micro-batch; an undecodable record is replaced by another record of the same micro-batch."""
    examples, skipped = [], []
    for ref in refs:
        try:
            examples.append(to_example(ref.load(), resolution, tokenizer))
        except (OSError, ValueError, KeyError, OmniPortraitError) as err:
            warnings.warn(f"skipping training record {ref.key}: {err}", stacklevel=2)
            skipped.append(ref.key)
    if not examples:
        raise ConfigError(f"every record of a micro-batch is unreadable: {', '.join(skipped)}")
    good = len(examples)
    while len(examples) < len(refs):
        examples.append(examples[len(examples) % good])
    return examples, skipped


class BatchStream(IterableDataset):
    """Process ``rank``'s micro-batches from micro-batch ``start`` on, forever."""

    def __init__(self, source: RecordSource, tokenizer, resolution: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, start: int = 0, patience: int | None = None):
        self.source = source
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.patience = patience or 1000
        source.check_processes(world_size)

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        refs = usable_refs(self.source.stream(self.rank, self.world_size), self.tokenizer, self.patience)
        for _ in itertools.islice(refs, self.start * self.batch_size):
            pass
        for micro in itertools.count(self.start):
            chunk = list(itertools.islice(refs, self.batch_size))
            if (micro - self.start) % workers == worker:
                examples, skipped = load_examples(chunk, self.resolution, self.tokenizer)
                yield collate(examples, micro + 1, skipped)


def make_dataloader(stream: BatchStream, num_workers: int) -> torch.utils.data.DataLoader:
    """A loader of ``stream``'s batches; its worker processes die with this process, so a killed training run
    leaves none behind (:func:`~omniportrait.processes.die_with_parent`)."""
    from omniportrait.processes import die_with_parent

    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       prefetch_factor=2 if num_workers else None,
                                       worker_init_fn=partial(die_with_parent, os.getpid()))


def resumed_position(position: int, saved: dict, batch_size: int, world_size: int) -> int:
    """The micro-batch to start at; when batch size or process count changed, the same share of records."""
    saved_batch = int(saved.get("batch_size", batch_size))
    saved_world = int(saved.get("world_size", world_size))
    if (saved_batch, saved_world) == (batch_size, world_size):
        return position
    warnings.warn(
        f"resuming with batch size {batch_size} on {world_size} process(es) instead of {saved_batch} on "
        f"{saved_world}: the data order continues at the same share of records, not exactly", stacklevel=2)
    return position * saved_batch * saved_world // (batch_size * world_size)
