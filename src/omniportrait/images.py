"""Read any user image into upright 8-bit RGB, and write images atomically.

:func:`load_image` is the single entry point for user images (reference photos, dataset images). It
accepts a path, a PIL image or a NumPy array and returns a new ``PIL.Image.Image`` in mode ``"RGB"``:

- EXIF orientation is applied, so coordinates are always in the upright frame a photo viewer shows;
- transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white;
- CMYK, YCbCr, grayscale, 1-bit and palette images are converted to RGB;
- 16-bit and 32-bit grayscale are scaled to 8 bits (16-bit RGB PNGs are already read as 8-bit by PIL).

Anything that cannot become such an image raises :class:`~omniportrait.errors.InvalidImageError` with a
one-line message that says what to do: a missing path, a folder, a file that is not an image, a
truncated or corrupt file (the whole image is decoded, so a cut JPEG is caught here and not later),
an image above :data:`MAX_PIXELS` (this also stops decompression bombs before their pixels are decoded)
or with a side below :data:`MIN_SIDE`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from omniportrait.errors import ConfigError, InvalidImageError
from omniportrait.files import atomic_write

__all__ = ["MAX_PIXELS", "MIN_SIDE", "ImageSource", "load_image", "save_image_atomic"]

MAX_PIXELS = 64_000_000
"""Largest accepted image, in pixels (64 megapixels, e.g. 8000×8000). Larger files are refused before
decoding, which is also the defence against decompression bombs."""

MIN_SIDE = 32
"""Smallest accepted width or height, in pixels."""

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def load_image(source: ImageSource) -> Image.Image:
    """Return ``source`` as a new upright 8-bit RGB image, or raise :class:`InvalidImageError`."""
    if isinstance(source, Image.Image):
        name = _describe(source)
        _check_size(source.size, name)
        _decode(source, name)
        return _prepare(source, name)
    if isinstance(source, np.ndarray):
        return _prepare(_image_from_array(source), "the array")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    raise InvalidImageError(
        f"cannot read an image from a {type(source).__name__}; pass a file path, a PIL image or a NumPy array"
    )


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Write ``image`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file, and an interrupted write leaves no file behind. The format
    comes from the extension (``.png``, ``.jpg``, ``.webp``, ...); ``save_kwargs`` go to ``Image.save``.
    """
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ConfigError(f"cannot tell the image format of '{path}'; use a .png, .jpg or .webp file name")
    with atomic_write(path) as stream:
        image.save(stream, format=image_format, **save_kwargs)
    return path


def _load_path(path: Path) -> Image.Image:
    """Open, check and fully decode the image file at ``path``."""
    _check_is_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                _check_size(image.size, f"'{path}'")
                _decode(image, f"'{path}'")
                return _prepare(image, f"'{path}'")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _too_large_error(f"'{path}'", None) from err
        except UnidentifiedImageError as err:
            raise InvalidImageError(
                f"'{path}' is not an image PIL can read (or its header is corrupt); use a JPEG, PNG or WebP photo"
            ) from err
        except PermissionError as err:
            raise InvalidImageError(f"cannot read '{path}': permission denied; check the file's permissions") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _corrupt_error(f"'{path}'", err) from err


def _decode(image: Image.Image, name: str) -> None:
    """Decode every pixel now, so that a truncated or corrupt file fails here with a clear message."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _corrupt_error(name, err) from err


def _corrupt_error(name: str, err: BaseException) -> InvalidImageError:
    """The error for a file whose bytes cannot be decoded."""
    return InvalidImageError(f"{name} is truncated or corrupt ({err}); re-export or re-download the photo")


def _check_is_file(path: Path) -> None:
    """Raise when ``path`` does not name an existing regular file."""
    if not path.exists():
        raise InvalidImageError(f"image file '{path}' does not exist; check the path")
    if path.is_dir():
        raise InvalidImageError(f"'{path}' is a folder, not an image file; pass the path of one photo")


def _check_size(size: tuple[int, int], name: str) -> None:
    """Refuse images above :data:`MAX_PIXELS` or with a side below :data:`MIN_SIDE`."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise _too_large_error(name, size)
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(
            f"{name} is only {width}×{height} pixels; use an image at least {MIN_SIDE} pixels on each side"
        )


def _too_large_error(name: str, size: tuple[int, int] | None) -> InvalidImageError:
    """The error for an image above the pixel limit (or a decompression bomb)."""
    dims = f" is {size[0]}×{size[1]} pixels and" if size else ""
    return InvalidImageError(
        f"{name}{dims} exceeds the {MAX_PIXELS // 1_000_000}-megapixel limit (or is a decompression bomb); "
        "downscale it first"
    )


def _prepare(image: Image.Image, name: str) -> Image.Image:
    """Check the size, apply EXIF orientation and convert to 8-bit RGB."""
    _check_size(image.size, name)
    return _to_rgb(_upright(image), name)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(image)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise InvalidImageError(
            f"{name} has pixel mode {image.mode!r} that cannot be converted to RGB; save it as an 8-bit RGB JPEG or PNG"
        ) from err


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with transparency onto a white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float grayscale to 8 bits and replicate it on three channels."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        values = values / 257.0
    elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    elif values.size and values.max() > 255:
        values = values / 257.0
    gray = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


def _image_from_array(array: np.ndarray) -> Image.Image:
    """Turn an H×W, H×W×1, H×W×3 (RGB) or H×W×4 (RGBA) array into a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(
            f"an image array must be H×W, H×W×3 (RGB) or H×W×4 (RGBA), got shape {array.shape}; reshape it"
        )
    return Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale bool, 16-bit integer or float (0–1) arrays to uint8."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 255).astype(np.uint8)
    raise InvalidImageError(f"an image array of dtype {array.dtype} is not supported; use uint8 RGB")


def _describe(image: Image.Image) -> str:
    """Name a PIL image in messages by its file name when it has one."""
    filename = getattr(image, "filename", "")
    return f"'{filename}'" if filename else "the image"
