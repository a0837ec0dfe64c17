"""Face Mesh topology helpers: the oval polygon, eye centres, the mask drawn from landmarks."""

import numpy as np

from omniportrait.faces import MESH_POINTS, eye_centers, face_oval_indices, mask_from_landmarks
from omniportrait.faces.mesh import chain_edges


def test_chain_edges_orders_a_shuffled_loop():
    loop = chain_edges(frozenset({(3, 1), (0, 2), (1, 0), (2, 3)}))

    assert sorted(loop) == [0, 1, 2, 3]
    assert all({loop[i], loop[(i + 1) % 4]} in ({0, 1}, {1, 3}, {3, 2}, {2, 0}) for i in range(4))


def test_face_oval_is_a_closed_loop_of_distinct_mesh_points():
    oval = face_oval_indices()

    assert len(oval) == len(set(oval)) >= 30
    assert all(0 <= i < MESH_POINTS for i in oval)


def _circle_landmarks(centre, radius) -> np.ndarray:
    """Landmarks whose face oval is a circle (other points at the centre)."""
    landmarks = np.tile(np.asarray(centre, np.float32), (MESH_POINTS, 1))
    oval = face_oval_indices()
    angles = np.linspace(0, 2 * np.pi, len(oval), endpoint=False)
    landmarks[list(oval)] = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)
    return landmarks


def test_mask_fills_the_oval_polygon():
    mask = mask_from_landmarks(_circle_landmarks((60, 40), 30), (120, 100))

    assert mask.shape == (100, 120) and mask.dtype == bool
    assert mask.sum() == np.clip(mask.sum(), 0.95 * np.pi * 30**2, 1.02 * np.pi * 30**2)
    assert mask[40, 60] and not mask[40, 95] and not mask[5, 60]


def test_eye_centers_are_subject_right_then_left(astronaut_face):
    right_eye, left_eye = eye_centers(astronaut_face.landmarks)

    assert right_eye[0] < left_eye[0]
    assert abs(right_eye[1] - left_eye[1]) < 0.1 * (left_eye[0] - right_eye[0])
