"""Geometry on MediaPipe's 478-point Face Mesh: the face-oval polygon, eye centres, the face mask.

Index sets come from ``mediapipe.solutions.face_mesh_connections`` (edges between landmark indices), so
nothing here copies MediaPipe's numbering by hand.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from omniportrait.faces._mediapipe import face_mesh_connections

__all__ = ["MESH_POINTS", "face_oval_indices", "eye_centers", "mask_from_landmarks"]

MESH_POINTS = 478
"""Landmarks per face: 468 mesh points and 10 iris points."""


def chain_edges(edges: frozenset[tuple[int, int]]) -> list[int]:
    """Order the vertices of a closed loop given as an unordered set of edges."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    start = min(neighbours)
    loop, previous, current = [start], None, start
    while True:
        following = next(n for n in neighbours[current] if n != previous)
        if following == start:
            return loop
        loop.append(following)
        previous, current = current, following


@functools.lru_cache(maxsize=None)
def face_oval_indices() -> tuple[int, ...]:
    """Landmark indices of the face outline (forehead, temples, jaw, chin), in polygon order."""
    return tuple(chain_edges(face_mesh_connections().FACEMESH_FACE_OVAL))


@functools.lru_cache(maxsize=None)
def _eye_indices() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Contour landmark indices of the subject's right eye and left eye."""
    connections = face_mesh_connections()
    return (
        tuple(sorted({i for edge in connections.FACEMESH_RIGHT_EYE for i in edge})),
        tuple(sorted({i for edge in connections.FACEMESH_LEFT_EYE for i in edge})),
    )


def eye_centers(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the subject's right and left eye contours (independent of gaze).

    The subject's right eye is on the image's left side in an upright, unmirrored frontal photo.
    """
    right, left = _eye_indices()
    return landmarks[list(right)].mean(axis=0), landmarks[list(left)].mean(axis=0)


def mask_from_landmarks(landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Fill the face-oval polygon: ``H×W`` bool mask of skin, brows, eyes, nose and lips, no hair or neck.

    ``size`` is ``(width, height)`` of the image the landmarks are in.
    """
    # PIL puts pixel (i, j)'s centre at integer (i, j); landmarks put it at (i + 0.5, j + 0.5).
    polygon = [tuple(point) for point in landmarks[list(face_oval_indices())].astype(float) - 0.5]
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=255)
    return np.asarray(canvas) > 0
