"""prepare_reference: choosing a face, typed errors, and every bad input of DESIGN §5 end to end."""

import numpy as np
import pytest
from PIL import Image

from omniportrait.errors import (
    FaceIndexError,
    InvalidImageError,
    MultipleFacesError,
    NoFaceError,
    OmniPortraitError,
)
from omniportrait.faces import MESH_POINTS, Face, FaceAnalyzer, PreparedReference, prepare_reference

from .._image_files import (
    converted_variants,
    write_corrupt_jpeg,
    write_exif_rotated,
    write_png_header,
    write_truncated_jpeg,
)


def test_astronaut_file_gives_its_one_face(face_analyzer, astronaut_path, astronaut_face):
    reference = prepare_reference(astronaut_path, analyzer=face_analyzer)

    assert isinstance(reference, PreparedReference)
    assert reference.image.mode == "RGB" and reference.image.size == (512, 512)
    assert reference.face_index == 0 and len(reference.faces) == 1
    assert reference.face is reference.faces[0]
    assert reference.mask is reference.face.mask
    np.testing.assert_allclose(reference.face.landmarks, astronaut_face.landmarks, atol=1e-3)


def test_aligned_crop_of_the_reference(face_analyzer, astronaut_image):
    aligned = prepare_reference(astronaut_image, analyzer=face_analyzer).aligned(224)

    assert aligned.image.size == (224, 224)
    assert aligned.mask.shape == (224, 224)


def test_default_analyzer_is_used_when_none_is_given(astronaut_reference):
    assert len(astronaut_reference.faces) == 1


def test_largest_face_is_chosen_by_default(face_analyzer, two_astronauts):
    reference = prepare_reference(two_astronauts, analyzer=face_analyzer)

    assert len(reference.faces) == 2
    assert reference.face_index == 0
    assert reference.face.area == max(face.area for face in reference.faces)


def test_face_index_chooses_another_face(face_analyzer, two_astronauts):
    reference = prepare_reference(two_astronauts, face_index=1, analyzer=face_analyzer)

    assert reference.face_index == 1
    assert reference.face is reference.faces[1]
    assert reference.face.box[0] > 512


def test_strict_mode_refuses_several_faces(face_analyzer, two_astronauts):
    with pytest.raises(MultipleFacesError, match="2 faces found.*face index"):
        prepare_reference(two_astronauts, strict=True, analyzer=face_analyzer)

    chosen = prepare_reference(two_astronauts, face_index=1, strict=True, analyzer=face_analyzer)
    assert chosen.face_index == 1


@pytest.mark.parametrize("face_index", [2, -1])
def test_face_index_out_of_range_says_how_many_faces(face_analyzer, two_astronauts, face_index):
    with pytest.raises(FaceIndexError, match="2 faces found.*from 0 \\(largest\\) to 1"):
        prepare_reference(two_astronauts, face_index=face_index, analyzer=face_analyzer)


@pytest.mark.parametrize("name", ["blank", "noise"])
def test_no_face_error_says_what_to_do(face_analyzer, noise_image, name):
    image = Image.new("RGB", (512, 512), "white") if name == "blank" else noise_image

    with pytest.raises(NoFaceError, match="no face found in the reference image; use a photo"):
        prepare_reference(image, analyzer=face_analyzer)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_photo_is_analysed_upright(face_analyzer, astronaut_image, astronaut_face, tmp_path, orientation):
    path = write_exif_rotated(astronaut_image, tmp_path / f"rotated{orientation}.jpg", orientation)

    reference = prepare_reference(path, analyzer=face_analyzer)

    assert reference.image.size == astronaut_image.size
    np.testing.assert_allclose(reference.face.landmarks, astronaut_face.landmarks, atol=4)


@pytest.mark.parametrize("variant", ["cmyk", "16-bit", "rgba", "grayscale", "palette"])
def test_unusual_pixel_formats_still_give_the_face(face_analyzer, astronaut_image, astronaut_face, tmp_path, variant):
    image, suffix = converted_variants(astronaut_image)[variant]
    path = tmp_path / f"astronaut{suffix}"
    image.save(path)

    reference = prepare_reference(path, analyzer=face_analyzer)

    assert reference.image.mode == "RGB"
    assert len(reference.faces) == 1
    np.testing.assert_allclose(reference.face.landmarks, astronaut_face.landmarks, atol=6)


def test_very_large_photo_reports_original_coordinates(face_analyzer, astronaut_image, astronaut_face, tmp_path):
    path = tmp_path / "large.jpg"
    astronaut_image.resize((3000, 3000), Image.BICUBIC).save(path, quality=90)

    reference = prepare_reference(path, analyzer=face_analyzer)

    assert reference.mask.shape == (3000, 3000)
    np.testing.assert_allclose(reference.face.landmarks, astronaut_face.landmarks * 3000 / 512, atol=0.02 * 3000)


def _bad_file(kind: str, tmp_path, image: Image.Image):
    """Write one bad input and return its path."""
    if kind == "missing":
        return tmp_path / "nowhere.jpg"
    if kind == "folder":
        return tmp_path
    if kind == "not-an-image":
        (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 20)
        return tmp_path / "notes.jpg"
    if kind == "truncated-jpeg":
        return write_truncated_jpeg(image, tmp_path / "cut.jpg")
    if kind == "corrupt-jpeg":
        return write_corrupt_jpeg(image, tmp_path / "corrupt.jpg")
    if kind == "decompression-bomb":
        return write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    Image.new("RGB", (1, 1), "gray").save(tmp_path / "dot.png")
    return tmp_path / "dot.png"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist; check the path"),
        ("folder", "is a folder, not an image file"),
        ("not-an-image", "is not an image PIL can read"),
        ("truncated-jpeg", "is truncated or corrupt"),
        ("corrupt-jpeg", "is truncated or corrupt"),
        ("decompression-bomb", "megapixel limit"),
        ("1x1", "only 1×1 pixels; use an image at least 32 pixels"),
    ],
)
def test_bad_files_give_invalid_image_error(face_analyzer, astronaut_image, tmp_path, kind, message):
    path = _bad_file(kind, tmp_path, astronaut_image)

    with pytest.raises(InvalidImageError, match=message) as raised:
        prepare_reference(path, analyzer=face_analyzer)

    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, OmniPortraitError)


class _ListAnalyzer(FaceAnalyzer):
    """A FaceAnalyzer returning a fixed list, to test the choice logic without models."""

    def __init__(self, faces):
        self.faces = faces

    def analyze(self, image):
        return list(self.faces)


def _face(x0: float, width: float) -> Face:
    return Face(
        box=(x0, 0.0, x0 + width, width),
        score=0.9,
        landmarks=np.zeros((MESH_POINTS, 2), np.float32),
        mask=np.zeros((64, 64), bool),
    )


def test_message_names_the_file_and_the_single_face(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (64, 64)).save(path)

    with pytest.raises(FaceIndexError, match=f"1 face found in '{path}'"):
        prepare_reference(path, face_index=1, analyzer=_ListAnalyzer([_face(0, 10)]))


def test_analyzer_may_be_used_as_a_context_manager():
    analyzer = _ListAnalyzer([_face(0, 10)])

    with analyzer as entered:
        assert entered is analyzer
