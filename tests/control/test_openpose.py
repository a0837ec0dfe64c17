"""Our OpenPose skeleton drawing: layout facts, limb and joint colours where expected, black elsewhere."""

import numpy as np
import pytest

from omniportrait.control import COLOURS, KEYPOINT_NAMES, LIMBS, Body, draw_bodies
from omniportrait.control.openpose import LIMB_STRENGTH, limb_half_width


def body_with(**points) -> Body:
    """A body with only the named keypoints found."""
    return Body(tuple(points.get(name) for name in KEYPOINT_NAMES))


def test_layout_is_openpose_coco_18_with_17_limbs_and_18_colours():
    assert len(KEYPOINT_NAMES) == 18 and len(set(KEYPOINT_NAMES)) == 18
    assert KEYPOINT_NAMES[:2] == ("nose", "neck")
    assert KEYPOINT_NAMES[14:] == ("right_eye", "left_eye", "right_ear", "left_ear")
    assert len(LIMBS) == 17 and len(set(LIMBS)) == 17
    assert len(COLOURS) == 18 and COLOURS[0] == (255, 0, 0) and COLOURS[12] == (0, 0, 255)
    assert {index for limb in LIMBS for index in limb} == set(range(18))  # every keypoint is on a limb
    assert (1, 2) in LIMBS and (1, 0) in LIMBS and (2, 5) not in LIMBS


def test_a_limb_is_its_colour_at_60_percent_and_a_joint_is_full_colour_on_black():
    neck, right_shoulder = (100.0, 100.0), (300.0, 100.0)
    image = np.asarray(draw_bodies([body_with(neck=neck, right_shoulder=right_shoulder)], (512, 256)))

    limb_colour = np.round(LIMB_STRENGTH * np.array(COLOURS[LIMBS.index((1, 2))]))
    assert image.shape == (256, 512, 3) and image.dtype == np.uint8
    assert (image[100, 200] == limb_colour).all()  # the middle of the bone
    assert (image[100, 299] == COLOURS[KEYPOINT_NAMES.index("right_shoulder")]).all()
    assert (image[100, 99] == COLOURS[KEYPOINT_NAMES.index("neck")]).all()
    assert (image[110, 200] == 0).all()  # beyond the limb's half width of 4 px
    assert (image[:80] == 0).all() and (image[120:] == 0).all() and (image[:, 310:] == 0).all()


def test_limb_width_follows_the_image_size():
    body = body_with(neck=(0.25, 0.5), left_shoulder=(0.75, 0.5))
    heights = []
    for side in (256, 512, 1024):
        image = np.asarray(draw_bodies([body.transformed(side)], (side, side)))
        heights.append(int((image[:, side // 2].sum(axis=1) > 0).sum()))

    assert heights[0] < heights[1] < heights[2]
    assert heights[1] == pytest.approx(2 * limb_half_width((512, 512)), abs=1)


def test_a_limb_with_a_missing_end_is_not_drawn_but_its_joint_is():
    image = np.asarray(draw_bodies([body_with(nose=(50.5, 50.5))], (128, 128)))

    coloured = np.argwhere(image.sum(axis=2) > 0)
    assert (image[50, 50] == COLOURS[0]).all()
    assert np.abs(coloured - 50).max() <= 5  # only the nose's disc


def test_overlapping_limbs_blend_and_several_bodies_share_the_canvas():
    crossing = [
        body_with(neck=(64.0, 10.0), right_hip=(64.0, 118.0)),
        body_with(neck=(10.0, 64.0), left_hip=(118.0, 64.0)),
    ]
    image = np.asarray(draw_bodies(crossing, (128, 128))).astype(float)

    first, second = (np.array(COLOURS[LIMBS.index(limb)]) for limb in ((1, 8), (1, 11)))
    expected = (1 - LIMB_STRENGTH) * LIMB_STRENGTH * first + LIMB_STRENGTH * second
    assert np.abs(image[64, 64] - expected).max() <= 1
    assert (image[30, 64] == np.round(LIMB_STRENGTH * first)).all()
    assert (image[64, 30] == np.round(LIMB_STRENGTH * second)).all()


def test_points_outside_the_image_are_clipped_not_an_error():
    image = np.asarray(draw_bodies([body_with(neck=(-50.0, 32.0), right_shoulder=(32.0, 32.0))], (64, 64)))

    assert (image[32, 5] == np.round(LIMB_STRENGTH * np.array(COLOURS[0]))).all()


def test_no_bodies_is_a_black_image():
    assert not np.asarray(draw_bodies([], (64, 32))).any()


def test_body_needs_18_points_and_transforms_found_ones():
    with pytest.raises(ValueError):
        Body(((0.0, 0.0),) * 17)
    body = body_with(nose=(10.0, 20.0))

    moved = body.transformed(2.0, left=5.0, top=1.0)
    assert moved["nose"] == (15.0, 39.0) and moved["neck"] is None and moved.found == 1
