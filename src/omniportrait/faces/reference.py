"""Reference preparation: load a photo, find its faces, choose one, with errors that say what to do."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from omniportrait.errors import FaceIndexError, MultipleFacesError, NoFaceError
from omniportrait.faces.align import DEFAULT_MARGIN, align_face
from omniportrait.faces.base import AlignedFace, Face, FaceAnalyzer
from omniportrait.images import ImageSource, load_image

__all__ = ["PreparedReference", "prepare_reference", "default_analyzer"]


@dataclass(frozen=True, eq=False)
class PreparedReference:
    """A reference photo and the face chosen in it.

    Attributes:
        image: the photo, upright 8-bit RGB.
        face: the chosen face, ``faces[face_index]``.
        faces: every face found, largest box first.
        face_index: index of the chosen face in ``faces``.
    """

    image: Image.Image
    face: Face
    faces: list[Face] = field(repr=False)
    face_index: int

    @property
    def mask(self) -> np.ndarray:
        """``H×W`` bool face mask of the chosen face, in the frame of :attr:`image`."""
        return self.face.mask

    def aligned(self, size: int, margin: float = DEFAULT_MARGIN) -> AlignedFace:
        """The chosen face as a ``size×size`` aligned crop (see :func:`~omniportrait.faces.align_face`)."""
        return align_face(self.image, self.face, size, margin)


@functools.lru_cache(maxsize=1)
def default_analyzer() -> FaceAnalyzer:
    """The process-wide :class:`~omniportrait.faces.MediaPipeFaceAnalyzer`, created on first use."""
    from omniportrait.faces.mediapipe_backend import MediaPipeFaceAnalyzer

    return MediaPipeFaceAnalyzer()


def prepare_reference(
    source: ImageSource,
    face_index: int | None = None,
    *,
    strict: bool = False,
    analyzer: FaceAnalyzer | None = None,
) -> PreparedReference:
    """Load ``source`` and choose one of its faces.

    Args:
        source: a path, a PIL image or an RGB array (see :func:`omniportrait.images.load_image`).
        face_index: which face to use, 0 being the largest box (faces are sorted by box area, largest
            first, ties left to right). ``None`` takes the largest.
        strict: with ``face_index=None``, raise :class:`MultipleFacesError` when there are several faces
            instead of taking the largest. An explicit ``face_index`` is always honoured.
        analyzer: the :class:`FaceAnalyzer` to use; the cached :func:`default_analyzer` when ``None``.

    Raises:
        InvalidImageError: the file is missing, not an image, corrupt, too small or too large.
        NoFaceError: no face was found.
        MultipleFacesError: ``strict`` and several faces without a ``face_index``.
        FaceIndexError: ``face_index`` is not in ``0 … len(faces) - 1``.
    """
    image = load_image(source)
    faces = (analyzer if analyzer is not None else default_analyzer()).analyze(image)
    name = _source_name(source)
    index = _choose_face(faces, face_index, strict, name)
    return PreparedReference(image=image, face=faces[index], faces=faces, face_index=index)


def _choose_face(faces: list[Face], face_index: int | None, strict: bool, name: str) -> int:
    """The index of the face to use, or the typed error explaining why there is none."""
    if not faces:
        raise NoFaceError(
            f"no face found in {name}; use a photo where one face is clearly visible, "
            "roughly frontal and at least about 5% of the image's shorter side"
        )
    if face_index is None:
        if strict and len(faces) > 1:
            raise MultipleFacesError(
                f"{len(faces)} faces found in {name}; pass a face index (0 = largest, "
                f"up to {len(faces) - 1}) or crop the photo to one face"
            )
        return 0
    if not 0 <= face_index < len(faces):
        raise FaceIndexError(
            f"face index {face_index} is out of range: {_count(faces)} found in {name}; "
            f"use an index from 0 (largest) to {len(faces) - 1}"
        )
    return face_index


def _count(faces: list[Face]) -> str:
    """'1 face' or 'N faces'."""
    return "1 face" if len(faces) == 1 else f"{len(faces)} faces"


def _source_name(source: ImageSource) -> str:
    """How messages name the reference: its path when it has one."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    filename = getattr(source, "filename", "")
    return f"'{filename}'" if filename else "the reference image"
