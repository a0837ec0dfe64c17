"""Face analysis: detection, landmarks, face mask, person box, aligned crop, reference preparation.

Importing this package is cheap; MediaPipe is imported when the first analyzer is created. See
``docs/faces.md`` for the behaviour, limits and extension points.
"""

from omniportrait.faces.align import DEFAULT_MARGIN, align_face, alignment_matrix, unwarp_mask
from omniportrait.faces.base import (
    AlignedFace,
    Box,
    Detection,
    Face,
    FaceAnalyzer,
    FaceDetector,
    FaceParser,
    box_area,
    sort_faces,
)
from omniportrait.faces.mediapipe_backend import MediaPipeFaceAnalyzer, MediaPipeFaceDetector
from omniportrait.faces.mesh import MESH_POINTS, eye_centers, face_oval_indices, mask_from_landmarks
from omniportrait.faces.reference import PreparedReference, default_analyzer, prepare_reference

__all__ = [
    "DEFAULT_MARGIN",
    "MESH_POINTS",
    "AlignedFace",
    "Box",
    "Detection",
    "Face",
    "FaceAnalyzer",
    "FaceDetector",
    "FaceParser",
    "MediaPipeFaceAnalyzer",
    "MediaPipeFaceDetector",
    "PreparedReference",
    "align_face",
    "alignment_matrix",
    "box_area",
    "default_analyzer",
    "eye_centers",
    "face_oval_indices",
    "mask_from_landmarks",
    "prepare_reference",
    "sort_faces",
    "unwarp_mask",
]
