"""MediaPipeFaceAnalyzer on real photos: detection, landmarks, face mask, person box, order, limits."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from omniportrait.errors import MissingDependencyError
from omniportrait.faces import (
    MESH_POINTS,
    Detection,
    Face,
    FaceAnalyzer,
    MediaPipeFaceAnalyzer,
    eye_centers,
    sort_faces,
)
from omniportrait.faces._mediapipe import import_mediapipe, native_stderr_filtered

from ._geometry import grown_box, inside


def test_astronaut_has_exactly_one_confident_face(face_analyzer, astronaut_image):
    faces = face_analyzer.analyze(astronaut_image)

    assert len(faces) == 1
    assert faces[0].score > 0.8
    assert isinstance(face_analyzer, FaceAnalyzer)


def test_face_box_contains_both_eyes(astronaut_face):
    right_eye, left_eye = eye_centers(astronaut_face.landmarks)

    assert inside(np.stack([right_eye, left_eye]), astronaut_face.box)
    assert right_eye[0] < left_eye[0]  # the subject's right eye is on the image's left


def test_landmarks_are_478_pixel_points_in_the_box(astronaut_face):
    landmarks = astronaut_face.landmarks

    assert landmarks.shape == (MESH_POINTS, 2) and landmarks.dtype == np.float32
    assert inside(landmarks, grown_box(astronaut_face.box, 1.3))


def test_face_mask_covers_2_to_40_percent_of_the_image(astronaut_face, astronaut_image):
    mask = astronaut_face.mask

    assert mask.shape == (astronaut_image.height, astronaut_image.width) and mask.dtype == bool
    assert 0.02 <= mask.mean() <= 0.40


def test_face_mask_lies_inside_the_box_grown_by_20_percent(astronaut_face):
    rows, cols = np.nonzero(astronaut_face.mask)

    pixel_corners = np.concatenate([np.stack([cols, rows], axis=1), np.stack([cols + 1, rows + 1], axis=1)])

    assert inside(pixel_corners, grown_box(astronaut_face.box, 1.2))


def test_face_mask_holds_the_eyes_but_not_hair_or_neck(astronaut_face):
    mask = astronaut_face.mask
    right_eye, left_eye = eye_centers(astronaut_face.landmarks)
    x0, y0, x1, y1 = astronaut_face.box
    centre_x = int((x0 + x1) / 2)
    hair_y, neck_y = int(y0 - 0.25 * (y1 - y0)), int(y1 + 0.35 * (y1 - y0))

    assert mask[int(right_eye[1]), int(right_eye[0])] and mask[int(left_eye[1]), int(left_eye[0])]
    assert not mask[hair_y, centre_x]
    assert not mask[neck_y, centre_x]


def test_person_box_holds_the_face_box(astronaut_face):
    person = astronaut_face.person_box

    assert person is not None
    assert inside(np.array([astronaut_face.box[:2], astronaut_face.box[2:]]), person)
    assert (person[3] - person[1]) > 2.5 * (astronaut_face.box[3] - astronaut_face.box[1])


def test_two_astronauts_give_two_faces_largest_first(face_analyzer, two_astronauts):
    faces = face_analyzer.analyze(two_astronauts)

    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].box[2] < 512 < faces[1].box[0]
    assert not np.any(faces[0].mask & faces[1].mask)
    assert faces[0].person_box[2] < faces[1].person_box[0]


@pytest.mark.parametrize("name", ["blank", "noise"])
def test_images_without_faces_give_no_face(face_analyzer, noise_image, name):
    image = Image.new("RGB", (512, 512), "white") if name == "blank" else noise_image

    assert face_analyzer.analyze(image) == []


def test_large_image_is_analysed_downscaled_with_coordinates_in_its_own_frame(
    face_analyzer, astronaut_image, astronaut_face
):
    large = astronaut_image.resize((2048, 2048), Image.BICUBIC)

    faces = face_analyzer.analyze(large)

    assert len(faces) == 1
    assert faces[0].mask.shape == (2048, 2048)
    np.testing.assert_allclose(faces[0].box, np.array(astronaut_face.box) * 4, atol=0.03 * 2048)
    np.testing.assert_allclose(faces[0].landmarks, astronaut_face.landmarks * 4, atol=0.02 * 2048)


def test_non_square_image_keeps_coordinates(face_analyzer, astronaut_image, astronaut_face):
    wide = Image.new("RGB", (1300, 600), "white")
    wide.paste(astronaut_image, (700, 40))

    (face,) = face_analyzer.analyze(wide)

    np.testing.assert_allclose(face.landmarks, astronaut_face.landmarks + [700, 40], atol=3)
    np.testing.assert_allclose(face.box, np.array(astronaut_face.box) + [700, 40, 700, 40], atol=0.25 * (astronaut_face.box[2] - astronaut_face.box[0]))


def test_sort_faces_orders_by_area_then_left_to_right():
    def face(box):
        return Face(box=box, score=1.0, landmarks=np.zeros((MESH_POINTS, 2), np.float32), mask=np.zeros((1, 1), bool))

    small, big_right, big_left = face((0, 0, 10, 10)), face((50, 0, 70, 20)), face((20, 0, 40, 20))

    assert sort_faces([small, big_right, big_left]) == [big_left, big_right, small]


class _FixedDetector:
    """A user-brought detector stand-in that always reports one box."""

    def __init__(self, box):
        self.box = box

    def detect(self, image):
        return [Detection(self.box, 0.99)]


class _BoxParser:
    """A user-brought face parser stand-in: the face box as the mask."""

    def parse(self, image, face):
        mask = np.zeros((image.height, image.width), bool)
        x0, y0, x1, y1 = (int(v) for v in face.box)
        mask[y0:y1, x0:x1] = True
        return mask


def test_user_detector_and_parser_replace_the_defaults(astronaut_image, astronaut_face):
    with MediaPipeFaceAnalyzer(detector=_FixedDetector(astronaut_face.box), parser=_BoxParser(), find_person=False) as analyzer:
        (face,) = analyzer.analyze(astronaut_image)

    assert face.score == pytest.approx(0.99)
    assert face.person_box is None
    assert face.mask.sum() == pytest.approx(face.area, rel=0.05)
    np.testing.assert_allclose(face.landmarks, astronaut_face.landmarks, atol=3)


def test_detection_without_a_mesh_is_dropped(noise_image):
    with MediaPipeFaceAnalyzer(detector=_FixedDetector((100, 100, 300, 300)), find_person=False) as analyzer:
        assert analyzer.analyze(noise_image) == []


def test_closed_analyzer_refuses_work(astronaut_image):
    analyzer = MediaPipeFaceAnalyzer(find_person=False)
    analyzer.close()
    analyzer.close()

    with pytest.raises(RuntimeError, match="closed"):
        analyzer.analyze(astronaut_image)


def test_missing_mediapipe_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)

    with pytest.raises(MissingDependencyError, match=r"pip install 'omniportrait\[faces\]'"):
        import_mediapipe()
    with pytest.raises(MissingDependencyError):
        MediaPipeFaceAnalyzer()


def test_native_chatter_is_dropped_and_other_lines_kept(capfd):
    with native_stderr_filtered():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"W0000 00:00:1.0 1 inference_feedback_manager.cc:114] Feedback manager requires a model\n")
        os.write(2, b"E0000 real native error\n")

    assert capfd.readouterr().err == "E0000 real native error\n"
