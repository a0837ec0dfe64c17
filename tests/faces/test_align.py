"""Aligned crops: eyes level, face centred, documented margin, mask and matrix consistent."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from omniportrait.faces import DEFAULT_MARGIN, align_face, eye_centers, unwarp_mask


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_crop_has_requested_size_and_types(astronaut_image, astronaut_face):
    aligned = align_face(astronaut_image, astronaut_face, 224)

    assert aligned.image.size == (224, 224) and aligned.image.mode == "RGB"
    assert aligned.mask.shape == (224, 224) and aligned.mask.dtype == bool
    assert aligned.matrix.shape == (2, 3)


@pytest.mark.parametrize("margin", [0.0, DEFAULT_MARGIN, 0.5])
def test_eyes_level_face_centred_with_margin(astronaut_image, astronaut_face, margin):
    size = 256
    aligned = align_face(astronaut_image, astronaut_face, size, margin=margin)
    points = _apply(aligned.matrix, astronaut_face.landmarks.astype(np.float64))
    right_eye, left_eye = (_apply(aligned.matrix, eye) for eye in eye_centers(astronaut_face.landmarks))
    low, high = points.min(axis=0), points.max(axis=0)

    assert right_eye[1] == pytest.approx(left_eye[1], abs=1e-6)
    assert right_eye[0] < left_eye[0]
    np.testing.assert_allclose((low + high) / 2, [size / 2, size / 2], atol=1e-6)
    assert max(high - low) == pytest.approx(size / (1 + 2 * margin))


def test_rotated_face_comes_out_upright(face_analyzer, astronaut_image, astronaut_face):
    upright = np.asarray(align_face(astronaut_image, astronaut_face, 128).image, dtype=np.float64)
    rotated = astronaut_image.rotate(30, expand=True, resample=Image.BICUBIC)

    (face,) = face_analyzer.analyze(rotated)
    aligned = np.asarray(align_face(rotated, face, 128).image, dtype=np.float64)

    centre = (slice(32, 96), slice(32, 96))
    assert np.abs(aligned[centre] - upright[centre]).mean() < 20


def test_crop_mask_matches_the_face_mask(astronaut_image, astronaut_face):
    aligned = align_face(astronaut_image, astronaut_face, 256)

    back = unwarp_mask(aligned.mask, aligned.matrix, astronaut_image.size)
    iou = (back & astronaut_face.mask).sum() / (back | astronaut_face.mask).sum()

    assert iou > 0.9
    assert 0.25 < aligned.mask.mean() < 0.6


def test_large_downscale_is_prefiltered(astronaut_image, astronaut_face):
    large = astronaut_image.resize((2048, 2048), Image.BICUBIC)
    mask = np.asarray(Image.fromarray(astronaut_face.mask).resize((2048, 2048), Image.NEAREST))
    face = dataclasses.replace(astronaut_face, landmarks=astronaut_face.landmarks * 4, mask=mask)

    small = align_face(large, face, 64)
    reference = align_face(large, face, 512).image.resize((64, 64), Image.BOX)

    assert np.abs(np.asarray(small.image, np.float64) - np.asarray(reference, np.float64)).mean() < 3.2  # 3.7 without the box prefilter
    np.testing.assert_allclose(small.matrix, align_face(astronaut_image, astronaut_face, 64).matrix @ np.diag([0.25, 0.25, 1]), atol=1e-6)


def test_invalid_size_or_margin_is_refused(astronaut_image, astronaut_face):
    with pytest.raises(ValueError, match="size"):
        align_face(astronaut_image, astronaut_face, 0)
    with pytest.raises(ValueError, match="margin"):
        align_face(astronaut_image, astronaut_face, 64, margin=-0.1)
