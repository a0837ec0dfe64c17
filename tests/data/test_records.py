"""Record encoding: lossless round trip, source bytes kept when they are already the upright RGB image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from omniportrait.data.records import (
    TrainingRecord,
    decode_mask,
    encode_image,
    encode_mask,
    record_from_sample,
    record_to_sample,
)
from omniportrait.images import load_image


def _record(image: Image.Image) -> TrainingRecord:
    mask = np.zeros(image.size[::-1], dtype=bool)
    mask[10:30, 20:40] = True
    crop_mask = np.zeros((32, 32), dtype=bool)
    crop_mask[8:24, 8:24] = True
    return TrainingRecord(
        key="000000042", image=image, caption="Two women's hats", class_word="women", class_lemma="woman",
        class_span=(4, 9), face_crop=Image.new("RGB", (32, 32), (1, 2, 3)), face_mask=mask,
        face_crop_mask=crop_mask, face_box=(20.0, 10.0, 40.0, 30.0), person_box=(0.0, 0.0, 64.0, 48.0),
        face_score=0.875, crop_matrix=np.array([[1.0, 0.0, -10.0], [0.0, 1.0, -5.0]]), source="a/b.png",
        aesthetic=6.0, watermark=None, metadata={"url": "u"},
    )


def test_round_trip_keeps_every_field():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    record = _record(image)
    sample = record_to_sample(record)
    assert list(sample) == ["jpg", "txt", "json", "mask.png", "face.png", "face.mask.png"]
    back = record_from_sample(sample)
    assert back.key == "000000042" and back.caption == record.caption and back.class_span == (4, 9)
    assert back.class_word == "women" and back.class_lemma == "woman" and back.source == "a/b.png"
    assert back.face_box == record.face_box and back.person_box == record.person_box
    assert back.face_score == 0.875 and back.aesthetic == 6.0 and back.watermark is None
    assert np.array_equal(back.face_mask, record.face_mask)
    assert np.array_equal(back.face_crop_mask, record.face_crop_mask)
    assert np.array_equal(np.asarray(back.face_crop), np.asarray(record.face_crop))
    assert np.allclose(back.crop_matrix, record.crop_matrix)
    assert back.face_area_ratio == pytest.approx(400 / (64 * 48))
    assert back.metadata == {"url": "u"}


def test_source_png_is_stored_byte_for_byte(astronaut_image):
    buffer = io.BytesIO()
    astronaut_image.save(buffer, format="PNG")
    field, data = encode_image(astronaut_image, buffer.getvalue())
    assert field == "png" and data == buffer.getvalue()


def test_exif_rotated_jpeg_is_re_encoded_upright(tmp_path, astronaut_image):
    wide = astronaut_image.crop((0, 0, 512, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rotated.jpg"
    wide.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (300, 512)
    field, data = encode_image(upright, path.read_bytes())
    assert field == "jpg" and data != path.read_bytes()
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (300, 512) and stored.getexif().get(0x0112, 1) == 1


def test_masks_are_one_bit_pngs():
    mask = np.eye(20, dtype=bool)
    data = encode_mask(mask)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "1"
    assert np.array_equal(decode_mask(data), mask)
    gray = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(gray, format="PNG")
    assert np.array_equal(decode_mask(gray.getvalue()), mask)


def test_newer_schema_is_refused():
    sample = record_to_sample(_record(Image.new("RGB", (64, 48))))
    sample["json"] = sample["json"].replace(b'"schema": 1', b'"schema": 99')
    with pytest.raises(ValueError, match="upgrade omniportrait"):
        record_from_sample(sample)
