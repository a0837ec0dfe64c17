"""Result types and the small interfaces every face-analysis backend implements.

Coordinates are pixels of the upright image given to the analyzer, continuous, with the top-left corner
of the image at (0, 0) and the bottom-right corner at (width, height): pixel (i, j) covers
``[i, i+1) × [j, j+1)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

__all__ = ["Box", "Detection", "Face", "AlignedFace", "FaceAnalyzer", "FaceDetector", "FaceParser", "box_area", "sort_faces"]

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in pixels, ``x0 < x1`` and ``y0 < y1``."""


def box_area(box: Box) -> float:
    """Area of a box in square pixels (0 for an empty box)."""
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class Detection:
    """A face box and its detector confidence, before landmarks; what a :class:`FaceDetector` returns."""

    box: Box
    score: float


@dataclass(frozen=True, eq=False)
class Face:
    """One analysed face.

    Attributes:
        box: face box ``(x0, y0, x1, y1)`` from the detector, in pixels of the upright original image,
            clipped to the image.
        score: detector confidence in [0, 1].
        landmarks: ``478×2`` float32 pixel ``(x, y)``: MediaPipe Face Mesh topology with iris points
            (``refine_landmarks=True``).
        mask: ``H×W`` bool over the whole image: the region a face-parsing model calls face (skin,
            brows, eyes, nose, lips), without hair or neck.
        person_box: box of the person the face belongs to, or ``None`` when no person was segmented.
    """

    box: Box
    score: float
    landmarks: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    person_box: Box | None = None

    @property
    def area(self) -> float:
        """Area of :attr:`box` in square pixels; faces are sorted by it, largest first."""
        return box_area(self.box)


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """A square face crop with eyes level and the face centred (see :func:`~omniportrait.faces.align_face`).

    Attributes:
        image: ``size×size`` RGB crop.
        mask: ``size×size`` bool face mask in the crop.
        matrix: ``2×3`` affine map from original-image pixels to crop pixels:
            ``[x', y'] = matrix @ [x, y, 1]``.
    """

    image: Image.Image
    mask: np.ndarray = field(repr=False)
    matrix: np.ndarray


class FaceAnalyzer(abc.ABC):
    """Finds and describes every face in an image.

    Subclasses implement :meth:`analyze`, which returns faces sorted by box area, largest first, ties
    broken left to right then top to bottom (use :func:`sort_faces`); this is the order ``face_index``
    indexes. Analyzers hold models: use them as context managers or call :meth:`close`.
    """

    @abc.abstractmethod
    def analyze(self, image: Image.Image) -> list[Face]:
        """Return every face in an upright RGB image, largest first (empty list when there is none)."""

    def close(self) -> None:
        """Release the models (nothing to release by default)."""

    def __enter__(self) -> "FaceAnalyzer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@runtime_checkable
class FaceDetector(Protocol):
    """Extension point: finds face boxes (e.g. an insightface/SCRFD detector with your own weights)."""

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Return the faces of an ``H×W×3`` uint8 RGB array, boxes in that array's pixels."""
        ...


@runtime_checkable
class FaceParser(Protocol):
    """Extension point: computes a face's mask (e.g. a BiSeNet face-parsing model with your own weights)."""

    def parse(self, image: Image.Image, face: Face) -> np.ndarray:
        """Return the ``H×W`` bool face mask of ``face`` in ``image`` (``face.mask`` holds the mesh mask)."""
        ...


def sort_faces(faces: list[Face]) -> list[Face]:
    """Largest box area first, ties broken left to right then top to bottom."""
    return sorted(faces, key=lambda face: (-face.area, face.box[0], face.box[1]))
