"""The training record (paper §3.2, §4.1) and its encoding as a webdataset sample.

A record binds one face to one person noun of one caption: the Pivot ID Encoder sees ``face_crop``, the
class word at ``class_span`` of ``caption`` is the token whose embedding it fuses with, and the face
localization loss (eq. 5) compares that token's cross-attention with ``face_mask``.

A sample (one record in a shard, all members named ``KEY.FIELD``):

============== ==========================================================================================
field          content
============== ==========================================================================================
``jpg``/``png`` the image, upright RGB; the source bytes when they already decode to exactly that
``txt``         the caption, UTF-8
``json``        everything else, see :func:`record_json` (schema :data:`SCHEMA_VERSION`)
``mask.png``    the face mask in the image frame, 1-bit PNG, same size as the image
``face.png``    the aligned face crop (``crop_size``², eyes level, see :func:`omniportrait.faces.align_face`)
``face.mask.png`` the face mask in the crop, 1-bit PNG
============== ==========================================================================================
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from omniportrait.faces.base import Box, box_area

__all__ = [
    "SCHEMA_VERSION",
    "TrainingRecord",
    "record_json",
    "record_to_sample",
    "record_from_sample",
    "index_row",
    "encode_image",
    "encode_mask",
    "decode_mask",
    "decode_image",
]

SCHEMA_VERSION = 1
"""Version of the ``json`` field's layout; readers refuse a newer one."""

PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png"}
"""Source formats stored byte for byte when they decode to the record's image."""

JPEG_QUALITY = 95
"""Quality of re-encoded images (sources that needed EXIF rotation, colour conversion, another format)."""

PNG_COMPRESS_LEVEL = 1
"""zlib level of the crop and mask PNGs: 3× faster than PIL's default 6 for about 8% more bytes."""


@dataclass(frozen=True, eq=False)
class TrainingRecord:
    """One training example of the Pivot ID Encoder.

    Attributes:
        key: the record's name in its shard (the input's position in the build plan, nine digits).
        image: the photo, upright 8-bit RGB.
        caption: its caption.
        class_word: the person noun as written in the caption (``caption[class_span[0]:class_span[1]]``).
        class_lemma: its singular form ("women" -> "woman").
        class_span: ``(start, end)`` character offsets of the class word in ``caption``.
        face_crop: aligned square face crop, RGB, ``crop_size`` pixels.
        face_mask: ``H×W`` bool face mask in the frame of ``image``.
        face_crop_mask: ``crop_size×crop_size`` bool face mask in the frame of ``face_crop``.
        face_box: face box ``(x0, y0, x1, y1)`` in image pixels.
        person_box: person box in image pixels (``None`` only in hand-made folder datasets).
        face_score: face detector confidence in [0, 1].
        crop_matrix: ``2×3`` affine map from image pixels to crop pixels.
        source: where the input came from (relative path, ``shard.tar:key`` or URL).
        aesthetic: aesthetic score from the metadata, if any.
        watermark: watermark probability from the metadata, if any.
        metadata: the input's metadata sidecar, as read.
    """

    key: str
    image: Image.Image = field(repr=False)
    caption: str
    class_word: str
    class_lemma: str
    class_span: tuple[int, int]
    face_crop: Image.Image = field(repr=False)
    face_mask: np.ndarray = field(repr=False)
    face_crop_mask: np.ndarray = field(repr=False)
    face_box: Box
    person_box: Box | None
    face_score: float
    crop_matrix: np.ndarray = field(repr=False)
    source: str = ""
    aesthetic: float | None = None
    watermark: float | None = None
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(width, height)`` of :attr:`image`."""
        return self.image.size

    @property
    def face_area_ratio(self) -> float:
        """Face box area over image area (paper Fig. 8, left)."""
        width, height = self.image.size
        return box_area(self.face_box) / float(width * height)


def record_json(record: TrainingRecord) -> dict:
    """The ``json`` field: caption, class word and span, boxes, scores, crop geometry, provenance."""
    return {
        "schema": SCHEMA_VERSION,
        "key": record.key,
        "source": record.source,
        "caption": record.caption,
        "class_word": record.class_word,
        "class_lemma": record.class_lemma,
        "class_span": list(record.class_span),
        "image_size": list(record.image_size),
        "face_box": _rounded(record.face_box),
        "person_box": _rounded(record.person_box) if record.person_box is not None else None,
        "face_score": round(float(record.face_score), 6),
        "face_area_ratio": round(record.face_area_ratio, 6),
        "crop_size": record.face_crop.size[0],
        "crop_matrix": [_rounded(row, 8) for row in np.asarray(record.crop_matrix, dtype=np.float64)],
        "aesthetic": record.aesthetic,
        "watermark": record.watermark,
        "metadata": record.metadata,
    }


def _rounded(values, digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


def record_to_sample(record: TrainingRecord, source_bytes: bytes | None = None) -> dict[str, bytes]:
    """Encode ``record`` as ``{field: bytes}`` (see the module docstring); member order is fixed."""
    image_field, image_bytes = encode_image(record.image, source_bytes)
    return {
        image_field: image_bytes,
        "txt": record.caption.encode("utf-8"),
        "json": json.dumps(record_json(record), sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "mask.png": encode_mask(record.face_mask),
        "face.png": _png_bytes(record.face_crop),
        "face.mask.png": encode_mask(record.face_crop_mask),
    }


def record_from_sample(sample: dict[str, bytes], key: str | None = None) -> TrainingRecord:
    """Decode a sample written by :func:`record_to_sample` back into a :class:`TrainingRecord`."""
    meta = json.loads(sample["json"])
    if int(meta.get("schema", 0)) > SCHEMA_VERSION:
        raise ValueError(f"record {meta.get('key')} has schema {meta['schema']}; upgrade omniportrait to read it")
    image = decode_image(next(sample[f] for f in ("jpg", "jpeg", "png", "webp") if f in sample))
    return TrainingRecord(
        key=key or meta["key"],
        image=image,
        caption=meta["caption"],
        class_word=meta["class_word"],
        class_lemma=meta.get("class_lemma", meta["class_word"].lower()),
        class_span=tuple(meta["class_span"]),
        face_crop=decode_image(sample["face.png"]),
        face_mask=decode_mask(sample["mask.png"]),
        face_crop_mask=decode_mask(sample["face.mask.png"]),
        face_box=tuple(meta["face_box"]),
        person_box=tuple(meta["person_box"]) if meta.get("person_box") is not None else None,
        face_score=float(meta["face_score"]),
        crop_matrix=np.asarray(meta["crop_matrix"], dtype=np.float64),
        source=meta.get("source", ""),
        aesthetic=meta.get("aesthetic"),
        watermark=meta.get("watermark"),
        metadata=meta.get("metadata") or {},
    )


def index_row(record: TrainingRecord, shard: str) -> dict:
    """One row of ``index.parquet``: where the record is and what it holds, without pixels."""
    width, height = record.image_size
    person = record.person_box if record.person_box is not None else (None,) * 4
    return {
        "key": record.key,
        "shard": shard,
        "source": record.source,
        "caption": record.caption,
        "class_word": record.class_word,
        "class_lemma": record.class_lemma,
        "class_start": int(record.class_span[0]),
        "class_end": int(record.class_span[1]),
        "width": int(width),
        "height": int(height),
        "face_x0": float(record.face_box[0]),
        "face_y0": float(record.face_box[1]),
        "face_x1": float(record.face_box[2]),
        "face_y1": float(record.face_box[3]),
        "person_x0": person[0],
        "person_y0": person[1],
        "person_x1": person[2],
        "person_y1": person[3],
        "face_score": float(record.face_score),
        "face_area_ratio": float(record.face_area_ratio),
        "aesthetic": record.aesthetic,
        "watermark": record.watermark,
    }


def encode_image(image: Image.Image, source_bytes: bytes | None = None) -> tuple[str, bytes]:
    """``(field, bytes)`` of the image: the source bytes when they are an RGB JPEG/PNG needing no
    rotation (no re-encoding loss), else a quality-95 JPEG of ``image``."""
    if source_bytes is not None and _is_passthrough(source_bytes, image.size):
        with Image.open(io.BytesIO(source_bytes)) as probe:
            return PASSTHROUGH_FORMATS[probe.format], source_bytes
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "jpg", buffer.getvalue()


def _is_passthrough(data: bytes, size: tuple[int, int]) -> bool:
    """Whether ``data`` decodes, as is, to an RGB image of ``size`` in a passthrough format."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            orientation = probe.getexif().get(0x0112, 1)
            return (
                probe.format in PASSTHROUGH_FORMATS
                and probe.mode == "RGB"
                and probe.size == size
                and orientation in (0, 1)
                and "transparency" not in probe.info
            )
    except Exception:  # an unreadable EXIF block or header: re-encode instead
        return False


def decode_image(data: bytes) -> Image.Image:
    """Bytes of an image field as an upright RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def encode_mask(mask: np.ndarray) -> bytes:
    """A bool mask as a 1-bit PNG."""
    return _png_bytes(Image.fromarray(np.asarray(mask, dtype=bool)))


def decode_mask(data: bytes) -> np.ndarray:
    """A mask PNG (1-bit, or 8-bit where > 127 is inside) as an ``H×W`` bool array."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode == "1":
            return np.asarray(image, dtype=bool).copy()
        return np.asarray(image.convert("L")) > 127


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
