"""The reference set (paper §4.2: 50 CelebA-HQ / FFHQ faces): find the photos, their faces and class words.

A photo without a usable face (no face found, unreadable file) is skipped with a warning and counted in
the report; it does not stop the run. A folder that is missing, or holds no usable photo, is an error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from omniportrait.errors import ConfigError, OmniPortraitError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
FACE_CROP_SIZE = 224
"""Side of the aligned reference face crop that CLIP-I compares against."""


@dataclass(frozen=True, eq=False)
class Reference:
    """A usable reference photo: its file name (the key used everywhere), class word and prepared face."""

    name: str
    path: Path
    class_word: str
    prepared: object = field(repr=False)

    @property
    def image(self) -> Image.Image:
        return self.prepared.image

    def face_crop(self, size: int = FACE_CROP_SIZE) -> Image.Image:
        """The aligned face crop (eyes level, face centred) of the chosen face."""
        return self.prepared.aligned(size).image


@dataclass(frozen=True)
class SkippedReference:
    """A photo of the folder that could not be used, and why."""

    name: str
    reason: str


def list_reference_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; hidden files are ignored."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ConfigError(f"references folder {folder} does not exist; pass a folder of face photos")
    if not path.is_dir():
        raise ConfigError(f"--references {folder} is a file; pass the folder that holds the reference photos")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"references folder {folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                          "add face photos")
    names = [p.name for p in files]
    if len(set(names)) != len(names):
        raise ConfigError(f"references folder {folder} holds files whose names differ only in case; rename them")
    return files


def prepare_references(
    files: list[Path],
    class_words: dict[str, str],
    face_index: int | None = None,
    progress: bool = True,
) -> tuple[list[Reference], list[SkippedReference]]:
    """Load each photo and choose its face; photos without a usable face are returned as skipped."""
    from tqdm.auto import tqdm

    from omniportrait.faces import prepare_reference

    usable, skipped = [], []
    for path in tqdm(files, desc="references", unit="photo", disable=not progress, file=sys.stderr):
        try:
            prepared = prepare_reference(path, face_index=face_index)
        except OmniPortraitError as err:
            skipped.append(SkippedReference(path.name, str(err)))
            continue
        usable.append(Reference(path.name, path, class_words[path.name], prepared))
    return usable, skipped
