"""make_control_image: canny edges, ready control images, sizing, and bad input."""

import numpy as np
import pytest
from PIL import Image

from omniportrait.control import ControlSpec, canny_edges, cover_transform, make_control_image
from omniportrait.errors import ConfigError, InvalidImageError


@pytest.fixture(scope="module")
def astronaut(astronaut_photo) -> Image.Image:
    return Image.open(astronaut_photo).convert("RGB")


def test_canny_is_binary_white_on_black_on_three_equal_channels(astronaut_photo):
    edges = np.asarray(make_control_image("canny", astronaut_photo))

    assert edges.shape == (512, 512, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[:, :, 0] == edges[:, :, 1]).all() and (edges[:, :, 1] == edges[:, :, 2]).all()
    assert 0.02 < (edges[:, :, 0] == 255).mean() < 0.3


def test_canny_finds_a_square_outline_and_nothing_on_flat_colour():
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 200

    edges = np.asarray(canny_edges(Image.fromarray(square)))[:, :, 0] > 0

    assert edges[16:48, 15:17].any(axis=1).all() and edges[15:17, 16:48].any(axis=0).all()
    assert not edges[24:40, 24:40].any() and not edges[:8].any()


def test_lower_thresholds_find_more_edges(astronaut_photo):
    def count(low, high):
        edges = make_control_image("canny", astronaut_photo, low_threshold=low, high_threshold=high)
        return int((np.asarray(edges) > 0).sum())

    assert count(50, 100) > count(100, 200) > count(200, 400)


@pytest.mark.parametrize("low, high", [(200, 100), (-1, 100), (float("nan"), 100), (10, float("inf"))])
def test_bad_canny_thresholds_are_config_errors(low, high, astronaut_photo):
    with pytest.raises(ConfigError, match="0 <= low <= high"):
        make_control_image("canny", astronaut_photo, low_threshold=low, high_threshold=high)


def test_image_kind_reads_any_control_image_as_rgb(tmp_path):
    depth = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(depth).save(path)

    image = make_control_image(ControlSpec("image", path))

    assert image.mode == "RGB" and image.size == (64, 48)
    pixels = np.asarray(image)
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255 and (pixels[:, :, 0] == pixels[:, :, 2]).all()


def test_size_covers_and_centre_crops_without_distortion(astronaut):
    wide = make_control_image("image", astronaut, (512, 256))

    # a 512² photo covering 512×256 keeps its scale and loses 128 rows above and below
    assert wide.size == (512, 256)
    assert np.abs(np.asarray(wide, float) - np.asarray(astronaut, float)[128:384]).mean() < 2


def test_pose_is_drawn_at_the_generation_size(astronaut_photo, pose_detector, astronaut):
    nose = pose_detector.detect(astronaut)[0]["nose"]
    scale, left, top = cover_transform((512, 512), (1024, 768))

    image = np.asarray(make_control_image("pose", astronaut_photo, (1024, 768)))

    x, y = int(nose[0] * scale - left), int(nose[1] * scale - top)
    assert image.shape == (768, 1024, 3)
    assert (image[y, x] == (255, 0, 0)).all()  # the nose joint's colour, where the nose lands


def test_cover_transform_scales_to_cover_and_centres():
    assert cover_transform((400, 200), (200, 200)) == (1.0, 100.0, 0.0)
    assert cover_transform((100, 100), (300, 150)) == (3.0, 0.0, 75.0)


def test_canny_at_a_size_is_found_on_the_resized_photo(astronaut_photo):
    edges = np.asarray(make_control_image("canny", astronaut_photo, (256, 384)))

    assert edges.shape == (384, 256, 3) and set(np.unique(edges)) == {0, 255}


@pytest.mark.parametrize("size", [(0, 512), (512, -8), (512.0, 512), (True, 512), (100_000, 100_000)])
def test_bad_sizes_are_config_errors(size, astronaut_photo):
    with pytest.raises(ConfigError, match="control image size"):
        make_control_image("canny", astronaut_photo, size)


def test_bad_kind_missing_photo_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown control kind 'depth'"):
        make_control_image("depth", tmp_path / "x.png")
    with pytest.raises(ConfigError, match="needs a photo"):
        make_control_image("canny")
    with pytest.raises(InvalidImageError, match="does not exist"):
        make_control_image("pose", tmp_path / "missing.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InvalidImageError, match="not an image"):
        make_control_image("image", tmp_path / "notes.png")


def test_spec_image_is_used_unless_an_image_is_given(astronaut_photo, astronaut):
    spec = ControlSpec("image", astronaut_photo, 0.5)

    assert make_control_image(spec).size == (512, 512)
    assert make_control_image(spec, astronaut.resize((64, 32))).size == (64, 32)
