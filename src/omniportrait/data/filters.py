"""The OmniPortrait-1M filters (paper §4.1 and appendix A.1) and the reasons inputs are rejected for.

Each input is checked in the order of :data:`REASONS` and counted under the first check it fails:

``corrupt``             the image or its sidecar cannot be read or decoded, or the image is over
                        :data:`omniportrait.images.MAX_PIXELS` (a decompression bomb)
``too_small``           width or height not greater than ``min_side`` (paper: both > 512)
``low_aesthetic``       an aesthetic score in the metadata not greater than ``min_aesthetic`` (paper: > 5)
``watermark``           a watermark probability in the metadata not below ``max_watermark`` (paper: < 0.5)
``no_face``             the face detector finds no face
``multiple_faces``      it finds more than one (the paper keeps single-face images only)
``no_person``           the face has no person box (no person detected around it)
``face_outside_person`` the face box is not enclosed by the person box (animal faces, portrait-like patterns)
``no_caption``          neither metadata nor the captioner gives a caption
``no_person_noun``      the caption names no person noun for the identity to bind to
``failed``              an unexpected error while processing this input (the message is kept in the stats)

Scores missing from the metadata do not reject an image: the paper's aesthetic and watermark filters
apply where a source provides those columns (LAION's ``aesthetic`` and ``pwatermark``, COYO's
``aesthetic_score_laion_v2`` and ``watermark_score``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omniportrait.faces.base import Box, Face

__all__ = [
    "REASONS",
    "KEPT",
    "AESTHETIC_KEYS",
    "WATERMARK_KEYS",
    "FilterConfig",
    "size_reason",
    "metadata_score",
    "score_reason",
    "face_count_reason",
    "person_reason",
    "box_encloses",
]

REASONS = (
    "corrupt",
    "too_small",
    "low_aesthetic",
    "watermark",
    "no_face",
    "multiple_faces",
    "no_person",
    "face_outside_person",
    "no_caption",
    "no_person_noun",
    "failed",
)
"""Rejection reasons, in the order the checks run."""

KEPT = "kept"
"""The outcome of an input that became a training record."""

AESTHETIC_KEYS = ("aesthetic", "aesthetic_score", "AESTHETIC_SCORE", "aesthetic_score_laion_v2")
"""Metadata keys read as the aesthetic score, first present wins."""

WATERMARK_KEYS = ("pwatermark", "watermark", "watermark_score", "punsafe_watermark")
"""Metadata keys read as the watermark probability, first present wins."""


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the paper's filters (appendix A.1).

    Attributes:
        min_side: keep images whose width and height are both greater than this (paper: 512).
        min_aesthetic: keep images whose aesthetic score is greater than this (paper: 5); ``None``: off.
        max_watermark: keep images whose watermark probability is below this (paper: 0.5); ``None``: off.
        person_tolerance: how far the face box may stick out of the person box on each side, as a
            fraction of the face box's width (left, right) and height (top, bottom). Detectors place box
            edges a few pixels apart on the same chin or forehead; 0.1 absorbs that without accepting a
            face that lies outside the person.
        aesthetic_keys: metadata keys holding the aesthetic score.
        watermark_keys: metadata keys holding the watermark probability.
    """

    min_side: int = 512
    min_aesthetic: float | None = 5.0
    max_watermark: float | None = 0.5
    person_tolerance: float = 0.1
    aesthetic_keys: tuple[str, ...] = AESTHETIC_KEYS
    watermark_keys: tuple[str, ...] = WATERMARK_KEYS


def size_reason(size: tuple[int, int], config: FilterConfig) -> str | None:
    """``too_small`` unless both sides of ``size = (width, height)`` exceed ``config.min_side``."""
    return "too_small" if min(size) <= config.min_side else None


def metadata_score(metadata: dict, keys: tuple[str, ...]) -> float | None:
    """The first finite number stored under one of ``keys``, or ``None``."""
    for key in keys:
        value = metadata.get(key)
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            return number
    return None


def score_reason(metadata: dict, config: FilterConfig) -> str | None:
    """``low_aesthetic`` or ``watermark`` when a score present in ``metadata`` fails its threshold."""
    aesthetic = metadata_score(metadata, config.aesthetic_keys)
    if config.min_aesthetic is not None and aesthetic is not None and aesthetic <= config.min_aesthetic:
        return "low_aesthetic"
    watermark = metadata_score(metadata, config.watermark_keys)
    if config.max_watermark is not None and watermark is not None and watermark >= config.max_watermark:
        return "watermark"
    return None


def face_count_reason(faces: list[Face]) -> str | None:
    """``no_face`` or ``multiple_faces`` unless exactly one face was found."""
    if not faces:
        return "no_face"
    return "multiple_faces" if len(faces) > 1 else None


def person_reason(face: Face, config: FilterConfig) -> str | None:
    """``no_person`` without a person box, ``face_outside_person`` when it does not enclose the face."""
    if face.person_box is None:
        return "no_person"
    if not box_encloses(face.person_box, face.box, config.person_tolerance):
        return "face_outside_person"
    return None


def box_encloses(outer: Box, inner: Box, tolerance: float) -> bool:
    """Whether ``inner`` lies inside ``outer``, allowing ``tolerance`` × inner's width/height per side."""
    slack_x = tolerance * (inner[2] - inner[0])
    slack_y = tolerance * (inner[3] - inner[1])
    return (
        inner[0] >= outer[0] - slack_x
        and inner[1] >= outer[1] - slack_y
        and inner[2] <= outer[2] + slack_x
        and inner[3] <= outer[3] + slack_y
    )
