"""Writers of the bad and unusual image files that the image and reference tests feed to the loaders."""

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
STORED_ROTATION = {3: 180, 6: 90, 8: -90}
"""Degrees (counter-clockwise, PIL's ``rotate``) that turn an upright image into the stored pixels."""


def write_exif_rotated(image: Image.Image, path: Path, orientation: int) -> Path:
    """Store ``image`` rotated, with the EXIF orientation that makes a viewer show it upright again."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.rotate(STORED_ROTATION[orientation], expand=True).save(path, exif=exif.tobytes(), quality=95)
    return path


def write_truncated_jpeg(image: Image.Image, path: Path, keep: float = 0.5) -> Path:
    """A JPEG cut after ``keep`` of its bytes (an interrupted download)."""
    data = _jpeg_bytes(image, path)
    path.write_bytes(data[: int(keep * len(data))])
    return path


def write_corrupt_jpeg(image: Image.Image, path: Path) -> Path:
    """A JPEG whose Huffman table is zeroed (a damaged file)."""
    data = bytearray(_jpeg_bytes(image, path))
    table = data.find(b"\xff\xc4")
    data[table + 4 : table + 24] = bytes(20)
    path.write_bytes(bytes(data))
    return path


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width×height`` RGB pixels (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def sixteen_bit_gray(image: Image.Image) -> Image.Image:
    """``image`` as 16-bit grayscale (mode ``I;16``), full 0–65535 range."""
    gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(gray)


def with_transparent_border(image: Image.Image, border: int = 40) -> Image.Image:
    """``image`` as RGBA whose outer ``border`` pixels are fully transparent."""
    rgba = image.convert("RGBA")
    alpha = np.zeros((image.height, image.width), np.uint8)
    alpha[border:-border, border:-border] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def converted_variants(image: Image.Image) -> dict:
    """The photo in each unusual mode a user may bring: name -> (PIL image, file suffix)."""
    return {
        "cmyk": (image.convert("CMYK"), ".jpg"),
        "16-bit": (sixteen_bit_gray(image), ".png"),
        "rgba": (with_transparent_border(image), ".png"),
        "grayscale": (image.convert("L"), ".png"),
        "palette": (image.quantize(256), ".png"),
    }


def _jpeg_bytes(image: Image.Image, path: Path) -> bytes:
    """Save ``image`` as a JPEG at ``path`` and return its bytes."""
    image.save(path, "JPEG", quality=90)
    return path.read_bytes()
