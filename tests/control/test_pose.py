"""MediaPipe landmarks -> OpenPose keypoints, and people found in real photos."""

import numpy as np
import pytest
from PIL import Image

from omniportrait.control import KEYPOINT_NAMES, NoPersonError, body_from_landmarks, make_control_image
from omniportrait.errors import ConfigError

# MediaPipe Pose landmark index of each OpenPose keypoint, written out from the two published layouts
# (None: the neck, the shoulders' midpoint).
MEDIAPIPE_INDEX = [0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7]


def synthetic_landmarks() -> np.ndarray:
    """33 landmarks at distinct known places, all visible: landmark ``i`` at ``(10 + 10i, 5 + 5i)``."""
    index = np.arange(33, dtype=float)
    return np.stack([10 + 10 * index, 5 + 5 * index, np.full(33, 0.9)], axis=1)


def test_landmarks_map_to_the_18_keypoints_in_coco_order():
    body = body_from_landmarks(synthetic_landmarks(), (400, 200))

    for name, source, point in zip(KEYPOINT_NAMES, MEDIAPIPE_INDEX, body.points):
        if source is None:
            assert name == "neck" and point == ((10 + 120 + 10 + 110) / 2, (5 + 60 + 5 + 55) / 2)
        else:
            assert point == (10 + 10 * source, 5 + 5 * source), name
    assert body.found == 18


def test_low_visibility_and_off_image_joints_are_left_out():
    landmarks = synthetic_landmarks()
    landmarks[14, 2] = 0.3  # right elbow: hardly visible
    landmarks[11, 2] = 0.49  # left shoulder: just below the threshold, so the neck goes too
    landmarks[28, 0] = -5.0  # right ankle: guessed left of the image
    landmarks[27, 1] = 201.0  # left ankle: guessed below it

    body = body_from_landmarks(landmarks, (400, 200))

    missing = {name for name, point in zip(KEYPOINT_NAMES, body.points) if point is None}
    assert missing == {"right_elbow", "left_shoulder", "neck", "right_ankle", "left_ankle"}
    assert body_from_landmarks(landmarks, (400, 200), threshold=0.25)["right_elbow"] is not None


def test_no_visible_joint_is_no_body():
    landmarks = synthetic_landmarks()
    landmarks[:, 2] = 0.1

    assert body_from_landmarks(landmarks, (400, 200)) is None
    with pytest.raises(ValueError):
        body_from_landmarks(landmarks[:17], (400, 200))


@pytest.fixture(scope="module")
def astronaut_body(pose_detector, astronaut_photo):
    bodies = pose_detector.detect(Image.open(astronaut_photo))
    assert len(bodies) == 1
    return bodies[0]


@pytest.fixture(scope="module")
def astronaut_face_box(astronaut_photo):
    from omniportrait.faces import prepare_reference

    return prepare_reference(astronaut_photo).face.box


def inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_astronaut_head_is_in_her_face_box(astronaut_body, astronaut_face_box):
    for name in ("nose", "right_eye", "left_eye"):
        assert astronaut_body[name] is not None and inside(astronaut_body[name], astronaut_face_box), name
    # her right eye is on the viewer's left
    assert astronaut_body["right_eye"][0] < astronaut_body["nose"][0] < astronaut_body["left_eye"][0]


def test_astronaut_shoulders_are_below_the_face_on_her_sides(astronaut_body, astronaut_face_box):
    right, left, neck = astronaut_body["right_shoulder"], astronaut_body["left_shoulder"], astronaut_body["neck"]
    x0, _, x1, y1 = astronaut_face_box
    assert right[0] < x0 and left[0] > x1  # wider than the face, her right on the viewer's left
    assert right[1] > y1 and left[1] > y1 and neck[1] > y1
    assert right[0] < neck[0] < left[0]
    assert 150 < left[0] - right[0] < 300  # the suit's shoulders in this 512-px photo


def test_pose_image_of_astronaut_is_a_skeleton_on_black(astronaut_photo):
    image = np.asarray(make_control_image("pose", astronaut_photo))

    coloured = image.sum(axis=2) > 0
    assert image.shape == (512, 512, 3)
    assert 0.005 < coloured.mean() < 0.05  # thin lines, mostly black
    assert not coloured[:60].any()  # nothing above her hair


def test_several_people_are_found_around_their_faces(pose_detector, astronaut_photo):
    photo = Image.open(astronaut_photo).convert("RGB")
    group = Image.new("RGB", (1536, 512), "gray")
    for index, person in enumerate((photo, photo.transpose(Image.FLIP_LEFT_RIGHT), photo)):
        group.paste(person, (512 * index, 0))

    bodies = pose_detector.detect(group)

    assert sorted(int(body["nose"][0] // 512) for body in bodies) == [0, 1, 2]


def test_a_large_photo_is_analysed_small_and_mapped_back(pose_detector, astronaut_photo, astronaut_body):
    big = Image.open(astronaut_photo).resize((2048, 2048), Image.BICUBIC)

    body = pose_detector.detect(big)[0]

    assert np.allclose(body["nose"], np.array(astronaut_body["nose"]) * 4, atol=12)


@pytest.mark.parametrize("which", ["coffee", "gradient"])
def test_a_photo_without_a_person_is_an_error_naming_it(which, coffee_path, tmp_path):
    path = coffee_path
    if which == "gradient":
        path = tmp_path / "gradient.png"
        Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))).save(path)

    with pytest.raises(NoPersonError) as caught:
        make_control_image("pose", path)

    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and "\n" not in message
    assert message.startswith(f"no person found in '{path}'") and "--control image:" in message


def test_no_person_in_an_unnamed_image_says_the_image():
    with pytest.raises(NoPersonError, match="no person found in the image"):
        make_control_image("pose", Image.new("RGB", (128, 128), "white"))


def test_the_docs_table_matches_the_mapping_and_colours():
    from pathlib import Path

    from omniportrait.control import COLOURS
    from omniportrait.control.pose import NECK_FROM, OPENPOSE_FROM_MEDIAPIPE

    text = (Path(__file__).resolve().parents[2] / "docs" / "control.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]

    assert [int(row[0]) for row in rows] == list(range(18))
    for (number, name, source, colour), keypoint in zip(rows, KEYPOINT_NAMES):
        assert name.strip().replace(" ", "_") == keypoint
        assert tuple(int(v) for v in colour.split(",")) == COLOURS[int(number)]
        if keypoint == "neck":
            assert source.strip().startswith(f"midpoint of {NECK_FROM[0]} and {NECK_FROM[1]} ")
        else:
            assert source.split()[0] == str(OPENPOSE_FROM_MEDIAPIPE[keypoint]), keypoint


def test_a_closed_detector_says_so_and_closes_once():
    from omniportrait.control import PoseDetector

    detector = PoseDetector(several_people=False)
    detector.close()
    detector.close()

    with pytest.raises(RuntimeError, match="closed"):
        detector.detect(Image.new("RGB", (64, 64)))
