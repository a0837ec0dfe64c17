"""Aligned square face crops: eyes level, face centred, a fixed margin around the face.

Geometry (all from ``Face.landmarks``):

- the crop is rotated so that the line from the subject's right-eye centre to the left-eye centre is
  horizontal (an upside-down face comes out upright);
- in that rotated frame, the bounding box of the 478 landmarks (forehead to chin, ear to ear) is the
  *face extent*; its centre is the crop's centre;
- the crop side is ``(1 + 2·margin) × max(extent width, extent height)``, i.e. ``margin`` (default
  :data:`DEFAULT_MARGIN` = 0.25) of the face extent is added on every side; with 0.25 the face spans
  2/3 of the crop;
- pixels outside the original image are black; the crop is resampled bicubically (box-filtered first
  when shrinking more than 2×).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from omniportrait.faces.base import AlignedFace, Face
from omniportrait.faces.mesh import eye_centers

__all__ = ["DEFAULT_MARGIN", "align_face", "alignment_matrix", "unwarp_mask"]

DEFAULT_MARGIN = 0.25
"""Margin added on each side of the face extent, as a fraction of the extent's longer side."""


def align_face(image: Image.Image, face: Face, size: int, margin: float = DEFAULT_MARGIN) -> AlignedFace:
    """Crop ``face`` from ``image`` into a ``size×size`` aligned crop, with its mask and affine matrix."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    matrix = alignment_matrix(face.landmarks, size, margin)
    crop = _warp(image.convert("RGB"), matrix, size, Image.BICUBIC)
    mask_image = Image.fromarray(np.asarray(face.mask, dtype=np.uint8) * 255, "L")
    mask = np.asarray(_warp(mask_image, matrix, size, Image.BILINEAR)) >= 128
    return AlignedFace(image=crop, mask=mask, matrix=matrix)


def alignment_matrix(landmarks: np.ndarray, size: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """The ``2×3`` affine map from image pixels to the aligned crop's pixels (see the module docstring)."""
    right_eye, left_eye = eye_centers(landmarks)
    angle = math.atan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0])
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    rotated = landmarks.astype(np.float64) @ rotation.T
    low, high = rotated.min(axis=0), rotated.max(axis=0)
    extent = float(max(high - low))
    scale = size / (extent * (1 + 2 * margin))
    offset = size / 2 - scale * (low + high) / 2
    return np.hstack([scale * rotation, offset[:, None]])


def unwarp_mask(crop_mask: np.ndarray, matrix: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Map a mask drawn on an aligned crop back to the original image (``image_size = (width, height)``).

    Useful to a :class:`~omniportrait.faces.base.FaceParser` that segments the aligned crop.
    """
    crop_image = Image.fromarray(np.asarray(crop_mask, dtype=np.uint8) * 255, "L")
    coefficients = tuple(np.asarray(matrix, dtype=np.float64).ravel())
    frame = crop_image.transform(image_size, Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(frame) >= 128


def _warp(image: Image.Image, matrix: np.ndarray, size: int, resample: int) -> Image.Image:
    """Resample ``image`` through ``matrix`` into a ``size×size`` image; box-filter first when shrinking."""
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    factor = max(1, int(0.5 / scale))
    if factor > 1:
        image = image.reduce(factor)
        matrix = np.hstack([matrix[:, :2] * factor, matrix[:, 2:]])
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    return image.transform((size, size), Image.AFFINE, tuple(inverse.ravel()), resample=resample, fillcolor=0)
