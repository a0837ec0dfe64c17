"""The paper's filter thresholds (appendix A.1) and the person-box enclosure rule."""

from __future__ import annotations

import numpy as np
import pytest

from omniportrait.data.filters import (
    REASONS,
    FilterConfig,
    box_encloses,
    face_count_reason,
    metadata_score,
    person_reason,
    score_reason,
    size_reason,
)
from omniportrait.faces import Face


def _face(box=(100, 100, 200, 200), person_box=(50, 50, 400, 500)) -> Face:
    return Face(box=box, score=0.9, landmarks=np.zeros((478, 2), np.float32), mask=np.zeros((4, 4), bool),
                person_box=person_box)


def test_paper_thresholds_are_strict():
    config = FilterConfig()
    assert (config.min_side, config.min_aesthetic, config.max_watermark) == (512, 5.0, 0.5)
    assert size_reason((512, 900), config) == "too_small" and size_reason((513, 513), config) is None
    assert score_reason({"aesthetic": 5.0}, config) == "low_aesthetic"
    assert score_reason({"aesthetic": 5.01}, config) is None
    assert score_reason({"aesthetic": 6, "pwatermark": 0.5}, config) == "watermark"
    assert score_reason({"aesthetic": 6, "pwatermark": 0.49}, config) is None


def test_missing_or_malformed_scores_do_not_reject():
    config = FilterConfig()
    assert score_reason({}, config) is None
    assert score_reason({"aesthetic": None, "pwatermark": "n/a"}, config) is None
    assert score_reason({"aesthetic": float("nan")}, config) is None
    assert metadata_score({"aesthetic_score_laion_v2": "4.5"}, config.aesthetic_keys) == 4.5
    assert metadata_score({"watermark_score": True}, config.watermark_keys) is None
    assert score_reason({"aesthetic": 1.0}, FilterConfig(min_aesthetic=None)) is None


def test_face_count():
    assert face_count_reason([]) == "no_face"
    assert face_count_reason([_face(), _face()]) == "multiple_faces"
    assert face_count_reason([_face()]) is None


@pytest.mark.parametrize(
    ("person_box", "expected"),
    [
        ((50, 50, 400, 500), None),
        ((105, 95, 400, 500), None),  # face sticks out 5 px (5% of its size): within the 10% tolerance
        ((115, 50, 400, 500), "face_outside_person"),  # 15 px: beyond the tolerance
        ((300, 300, 500, 500), "face_outside_person"),  # disjoint: a pattern or an animal face
        (None, "no_person"),
    ],
)
def test_person_box_must_enclose_the_face(person_box, expected):
    assert person_reason(_face(person_box=person_box), FilterConfig()) == expected


def test_box_encloses_tolerance_scales_with_the_face():
    assert box_encloses((0, 0, 10, 10), (0, 0, 10, 10), 0.0)
    assert not box_encloses((0, 0, 10, 10), (-1, 0, 10, 10), 0.0)
    assert box_encloses((0, 0, 10, 10), (-1, 0, 10, 10), 0.1)
    assert not box_encloses((0, 0, 100, 100), (-30, 0, 70, 100), 0.1)


def test_reasons_are_in_check_order():
    assert REASONS[:4] == ("corrupt", "too_small", "low_aesthetic", "watermark")
    assert REASONS.index("no_face") < REASONS.index("no_person") < REASONS.index("no_caption")
