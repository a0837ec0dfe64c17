"""load_image and save_image_atomic: every bad or unusual input of DESIGN §5, and atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

from omniportrait import images
from omniportrait.errors import ConfigError, InvalidImageError
from omniportrait.images import MAX_PIXELS, MIN_SIDE, load_image, save_image_atomic

from ._image_files import (
    converted_variants,
    sixteen_bit_gray,
    with_transparent_border,
    write_corrupt_jpeg,
    write_exif_rotated,
    write_png_header,
    write_truncated_jpeg,
)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_rgb_png_round_trips_exactly(astronaut_image, astronaut_path):
    loaded = load_image(astronaut_path)

    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(_pixels(loaded), _pixels(astronaut_image))


def test_path_objects_and_strings_are_accepted(astronaut_path):
    from pathlib import Path

    assert load_image(Path(astronaut_path)).size == load_image(astronaut_path).size == (512, 512)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="does not exist; check the path"):
        load_image(tmp_path / "missing.jpg")


def test_folder(tmp_path):
    with pytest.raises(InvalidImageError, match="is a folder, not an image file"):
        load_image(tmp_path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("hello\n" * 100)

    with pytest.raises(InvalidImageError, match="is not an image PIL can read.*use a JPEG, PNG or WebP"):
        load_image(path)


def test_empty_file_is_not_an_image(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(InvalidImageError, match="is not an image"):
        load_image(path)


@pytest.mark.parametrize("keep", [0.5, 0.95, 0.01])
def test_truncated_jpeg(astronaut_image, tmp_path, keep):
    path = write_truncated_jpeg(astronaut_image, tmp_path / "cut.jpg", keep)

    with pytest.raises(InvalidImageError, match="is truncated or corrupt.*re-download"):
        load_image(path)


def test_corrupt_jpeg(astronaut_image, tmp_path):
    path = write_corrupt_jpeg(astronaut_image, tmp_path / "corrupt.jpg")

    with pytest.raises(InvalidImageError, match="is truncated or corrupt"):
        load_image(path)


def test_truncated_pil_image_object(astronaut_image, tmp_path):
    path = write_truncated_jpeg(astronaut_image, tmp_path / "cut.jpg")

    with Image.open(path) as lazy:
        with pytest.raises(InvalidImageError, match="is truncated or corrupt"):
            load_image(lazy)


@pytest.mark.parametrize(
    "width, height",
    [(100_000, 100_000), (10_000, 10_000), (9_000, 8_000)],
    ids=["pil-bomb-error", "pil-bomb-warning", "over-max-pixels"],
)
def test_decompression_bomb_is_refused_before_decoding(tmp_path, width, height):
    path = write_png_header(tmp_path / "bomb.png", width, height)

    with pytest.raises(InvalidImageError, match="megapixel limit.*downscale it first"):
        load_image(path)


def test_max_pixels_is_a_documented_limit(astronaut_path, monkeypatch):
    assert MAX_PIXELS == 64_000_000
    monkeypatch.setattr(images, "MAX_PIXELS", 512 * 512 - 1)

    with pytest.raises(InvalidImageError, match="is 512×512 pixels and exceeds"):
        load_image(astronaut_path)


@pytest.mark.parametrize("size", [(1, 1), (MIN_SIDE - 1, 400), (400, 2)])
def test_too_small_images(tmp_path, size):
    path = tmp_path / "tiny.png"
    Image.new("RGB", size, "gray").save(path)

    with pytest.raises(InvalidImageError, match=f"{size[0]}×{size[1]} pixels; use an image at least {MIN_SIDE}"):
        load_image(path)


def test_smallest_accepted_side(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (MIN_SIDE, MIN_SIDE), "gray").save(path)

    assert load_image(path).size == (MIN_SIDE, MIN_SIDE)


def test_cmyk_jpeg_becomes_rgb(astronaut_image, tmp_path):
    path = tmp_path / "cmyk.jpg"
    astronaut_image.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"

    loaded = load_image(path)

    assert loaded.mode == "RGB"
    assert np.abs(_pixels(loaded) - _pixels(astronaut_image)).mean() < 6


def test_16_bit_png_is_scaled_not_clipped(astronaut_image, tmp_path):
    path = tmp_path / "gray16.png"
    sixteen_bit_gray(astronaut_image).save(path)
    assert Image.open(path).mode.startswith("I;16")

    loaded = _pixels(load_image(path))

    expected = _pixels(astronaut_image.convert("L"))
    np.testing.assert_allclose(loaded[:, :, 0], expected, atol=1)
    np.testing.assert_array_equal(loaded[:, :, 0], loaded[:, :, 2])


def test_32_bit_integer_and_float_grayscale(astronaut_image):
    gray = np.asarray(astronaut_image.convert("L"), dtype=np.float64)

    as_int = load_image(Image.fromarray((gray * 257).astype(np.int32)))
    as_float = load_image(Image.fromarray((gray / 255).astype(np.float32)))

    np.testing.assert_allclose(_pixels(as_int)[:, :, 1], gray, atol=1)
    np.testing.assert_allclose(_pixels(as_float)[:, :, 1], gray, atol=1)


def test_rgba_is_composited_on_white(astronaut_image, tmp_path):
    path = tmp_path / "rgba.png"
    with_transparent_border(astronaut_image).save(path)

    loaded = _pixels(load_image(path))

    assert (loaded[:40] == 255).all() and (loaded[:, -40:] == 255).all()
    np.testing.assert_array_equal(loaded[100:400, 100:400], _pixels(astronaut_image)[100:400, 100:400])


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_other_alpha_modes_are_composited_on_white(mode):
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0)).convert(mode)

    assert (_pixels(load_image(transparent)) == 255).all()


def test_palette_with_transparent_colour_is_composited_on_white(tmp_path):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.paste(1, (0, 0, 32, 64))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    loaded = _pixels(load_image(path))

    assert (loaded[:, 40:] == 255).all()
    np.testing.assert_array_equal(loaded[0, 0], [200, 10, 10])


@pytest.mark.parametrize("variant", ["grayscale", "palette"])
def test_grayscale_and_palette_become_rgb(astronaut_image, tmp_path, variant):
    image, suffix = converted_variants(astronaut_image)[variant]
    path = tmp_path / f"image{suffix}"
    image.save(path)

    loaded = load_image(path)

    assert loaded.mode == "RGB" and loaded.size == (512, 512)
    assert np.abs(_pixels(loaded) - _pixels(image.convert("RGB"))).max() == 0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(astronaut_image, tmp_path, orientation):
    path = write_exif_rotated(astronaut_image, tmp_path / "rotated.jpg", orientation)
    assert Image.open(path).size == astronaut_image.rotate(90 * (orientation != 3), expand=True).size

    loaded = load_image(path)

    assert loaded.size == astronaut_image.size
    assert np.abs(_pixels(loaded) - _pixels(astronaut_image)).mean() < 4


def test_pil_input_is_copied_not_mutated(astronaut_image):
    loaded = load_image(astronaut_image)

    assert loaded is not astronaut_image
    loaded.putpixel((0, 0), (1, 2, 3))
    assert astronaut_image.getpixel((0, 0)) != (1, 2, 3)


@pytest.mark.parametrize(
    "array",
    [
        np.full((40, 50, 3), 128, np.uint8),
        np.full((40, 50), 128, np.uint8),
        np.full((40, 50, 1), 128, np.uint8),
        np.full((40, 50, 3), 128 * 257, np.uint16),
        np.full((40, 50, 3), 128 / 255, np.float32),
    ],
    ids=["rgb-uint8", "gray", "gray-channel", "rgb-uint16", "rgb-float"],
)
def test_arrays_are_accepted(array):
    loaded = load_image(array)

    assert loaded.mode == "RGB" and loaded.size == (50, 40)
    assert (_pixels(loaded) == 128).all()


def test_rgba_array_is_composited_on_white():
    array = np.zeros((40, 50, 4), np.uint8)

    assert (_pixels(load_image(array)) == 255).all()


@pytest.mark.parametrize("array", [np.zeros((40, 50, 2), np.uint8), np.zeros((4, 40, 50, 3), np.uint8)])
def test_badly_shaped_arrays(array):
    with pytest.raises(InvalidImageError, match="must be H×W, H×W×3"):
        load_image(array)


def test_unsupported_source_type():
    with pytest.raises(InvalidImageError, match="pass a file path, a PIL image or a NumPy array"):
        load_image(b"bytes")


def test_save_image_atomic_writes_and_leaves_no_temporary_files(astronaut_image, tmp_path):
    path = save_image_atomic(astronaut_image, tmp_path / "out" / "portrait.png")

    assert path.exists() and os.listdir(path.parent) == ["portrait.png"]
    np.testing.assert_array_equal(_pixels(Image.open(path)), _pixels(astronaut_image))


def test_save_image_atomic_keeps_the_old_file_when_writing_fails(astronaut_image, tmp_path):
    path = tmp_path / "portrait.jpg"
    save_image_atomic(astronaut_image, path, quality=90)
    before = path.read_bytes()

    with pytest.raises(OSError):
        save_image_atomic(with_transparent_border(astronaut_image), path)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["portrait.jpg"]


def test_save_image_atomic_needs_a_known_extension(astronaut_image, tmp_path):
    with pytest.raises(ConfigError, match="use a .png, .jpg or .webp"):
        save_image_atomic(astronaut_image, tmp_path / "portrait.unknown")
