"""Box helpers for the face tests."""

import numpy as np


def grown_box(box, factor: float):
    """``box`` scaled by ``factor`` about its centre."""
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
    return cx - hw, cy - hh, cx + hw, cy + hh


def inside(points: np.ndarray, box) -> bool:
    """Whether every ``(x, y)`` of ``points`` lies in ``box``."""
    points = np.atleast_2d(points)
    return bool(
        np.all((points[:, 0] >= box[0]) & (points[:, 0] <= box[2]) & (points[:, 1] >= box[1]) & (points[:, 1] <= box[3]))
    )
