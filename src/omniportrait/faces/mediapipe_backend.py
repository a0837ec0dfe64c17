"""Default face analysis on MediaPipe 0.10.14's legacy solutions; offline, CPU, models inside the wheel.

How one image is analysed (:meth:`MediaPipeFaceAnalyzer.analyze`):

1. Detection runs on a copy downscaled so that its longer side is at most ``max_side``
   (:data:`ANALYSIS_MAX_SIDE`); boxes are mapped back to the original frame.
2. :class:`MediaPipeFaceDetector` runs the full-range face detector (``model_selection=1``) on the whole
   copy and on a 2×2 grid of overlapping tiles (each :data:`TILE_FRACTION` of the width and height), so
   faces down to about 5% of the image's shorter side are found; duplicates are merged, best score kept.
3. Landmarks: for each detection a square crop of :data:`MESH_CROP_SCALE` times the box's longer side,
   centred on the box, is cut from the full-resolution image, resized to :data:`MESH_CROP_SIZE` and given
   to Face Mesh (``static_image_mode=True``, ``refine_landmarks=True``). The mesh closest to the crop's
   centre is kept if its centre lies inside the detection box; a detection without such a mesh is
   dropped (it gives no landmarks, and is usually a false detection).
4. The face mask is the filled face-oval polygon of the mesh (:func:`~omniportrait.faces.mesh.mask_from_landmarks`),
   or what the optional :class:`~omniportrait.faces.base.FaceParser` returns.
5. The person box is the bounding box of the connected region of the selfie-segmentation mask
   (``model_selection=0``, probability > :data:`PERSON_THRESHOLD`) that holds the face's centre (or,
   failing that, most of the face box), as segmented: it is not grown to hold the face box, so the
   dataset's "person box encloses face box" filter keeps its meaning. People who touch in the image share
   one region and so one person box. ``None`` when no region overlaps the face.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
from PIL import Image

from omniportrait.faces._mediapipe import create_solution, import_mediapipe, native_stderr_filtered
from omniportrait.faces.base import Box, Detection, Face, FaceAnalyzer, FaceDetector, FaceParser, box_area, sort_faces
from omniportrait.faces.mesh import MESH_POINTS, mask_from_landmarks

__all__ = [
    "ANALYSIS_MAX_SIDE",
    "MIN_DETECTION_SCORE",
    "TILE_FRACTION",
    "MESH_CROP_SCALE",
    "MESH_CROP_SIZE",
    "PERSON_THRESHOLD",
    "MediaPipeFaceDetector",
    "MediaPipeFaceAnalyzer",
]

ANALYSIS_MAX_SIDE = 1024
"""Detection and person segmentation run on a copy whose longer side is at most this many pixels."""

MIN_DETECTION_SCORE = 0.5
"""Detector confidence below which a box is ignored."""

TILE_GRID = 2
"""Tiles per side of the extra detection grid (0 or 1: whole image only)."""

TILE_FRACTION = 0.6
"""Tile width and height as a fraction of the image's; tiles overlap by ``2·0.6 − 1 = 20%``."""

DUPLICATE_OVERLAP = 0.5
"""Two boxes are one face when their intersection covers this fraction of the smaller one."""

MESH_CROP_SCALE = 2.0
"""Side of the square crop given to Face Mesh, in multiples of the detection box's longer side."""

MESH_CROP_SIZE = 256
"""The Face Mesh crop is resized to this many pixels square."""

MESH_MAX_FACES = 3
"""Meshes searched per crop (a neighbour's face may share the crop; the centred one is kept)."""

PERSON_THRESHOLD = 0.5
"""Selfie-segmentation probability above which a pixel belongs to a person."""


class MediaPipeFaceDetector:
    """Full-range MediaPipe face detector on the whole image plus a grid of overlapping tiles."""

    def __init__(self, *, min_score: float = MIN_DETECTION_SCORE, tile_grid: int = TILE_GRID) -> None:
        mp = import_mediapipe()
        self._model = create_solution(
            lambda: mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_score)
        )
        self.tile_grid = tile_grid

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces of an ``H×W×3`` uint8 RGB array, boxes in its pixels, duplicates merged."""
        detections = self._detect_region(image, (0, 0))
        for origin, tile in _tiles(image, self.tile_grid):
            found = self._detect_region(tile, origin)
            detections += [d for d in found if not _touches_inner_edge(d.box, origin, tile.shape, image.shape)]
        return _merge_duplicates(detections)

    def close(self) -> None:
        """Release the model."""
        self._model.close()

    def _detect_region(self, region: np.ndarray, origin: tuple[int, int]) -> list[Detection]:
        """Run the detector on one array; boxes shifted by ``origin`` into the whole image's pixels."""
        with native_stderr_filtered():
            result = self._model.process(np.ascontiguousarray(region))
        height, width = region.shape[:2]
        return [_to_detection(found, width, height, origin) for found in result.detections or []]


class MediaPipeFaceAnalyzer(FaceAnalyzer):
    """The default :class:`~omniportrait.faces.base.FaceAnalyzer` (see the module docstring for the steps).

    Args:
        detector: replaces the MediaPipe detector (e.g. insightface with weights you bring).
        parser: replaces the mesh face mask (e.g. a BiSeNet face-parsing model with weights you bring).
        max_side: longer side of the copy that detection and segmentation see.
        min_score: detector confidence threshold for the default detector.
        find_person: compute ``Face.person_box`` with selfie segmentation.

    The MediaPipe models are created once and reused; calls are serialised by a lock.
    """

    def __init__(
        self,
        *,
        detector: FaceDetector | None = None,
        parser: FaceParser | None = None,
        max_side: int = ANALYSIS_MAX_SIDE,
        min_score: float = MIN_DETECTION_SCORE,
        find_person: bool = True,
    ) -> None:
        mp = import_mediapipe()
        self.detector = detector if detector is not None else MediaPipeFaceDetector(min_score=min_score)
        self.parser = parser
        self.max_side = max_side
        self._mesh = create_solution(
            lambda: mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, refine_landmarks=True, max_num_faces=MESH_MAX_FACES
            )
        )
        self._segmenter = (
            create_solution(lambda: mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0))
            if find_person
            else None
        )
        self._owns_detector = detector is None
        self._lock = threading.Lock()
        self._closed = False

    def analyze(self, image: Image.Image) -> list[Face]:
        """Every face in an upright image, largest box first (see :class:`FaceAnalyzer` for the order)."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        with self._lock:
            if self._closed:
                raise RuntimeError("this MediaPipeFaceAnalyzer is closed; create a new one")
            small, scale = _downscaled(image, self.max_side)
            pixels = np.asarray(small)
            detections = [_scaled_detection(d, 1.0 / scale) for d in self.detector.detect(pixels)]
            people = self._segment_people(pixels)
            faces = [self._describe(image, d, people, scale) for d in detections]
        return sort_faces([face for face in faces if face is not None])

    def close(self) -> None:
        """Release the MediaPipe models (safe to call twice)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mesh.close()
            if self._segmenter is not None:
                self._segmenter.close()
            if self._owns_detector:
                self.detector.close()

    def _describe(self, image: Image.Image, detection: Detection, people: _People | None, scale: float) -> Face | None:
        """Landmarks, mask and person box for one detection; ``None`` when Face Mesh finds no face there."""
        landmarks = self._landmarks_in_box(image, detection.box)
        if landmarks is None:
            return None
        box = _clip_box(detection.box, image.size)
        face = Face(
            box=box,
            score=detection.score,
            landmarks=landmarks,
            mask=mask_from_landmarks(landmarks, image.size),
            person_box=_person_box(people, box, scale, image.size),
        )
        if self.parser is not None:
            face = dataclasses.replace(face, mask=np.asarray(self.parser.parse(image, face), dtype=bool))
        return face

    def _landmarks_in_box(self, image: Image.Image, box: Box) -> np.ndarray | None:
        """Face Mesh on a square crop around ``box``; 478×2 pixel landmarks of the mesh centred in it."""
        left, top, side = _mesh_crop(box)
        crop = image.crop((left, top, left + side, top + side)).resize((MESH_CROP_SIZE, MESH_CROP_SIZE), Image.BILINEAR)
        with native_stderr_filtered():
            result = self._mesh.process(np.asarray(crop))
        meshes = [
            np.array([(p.x * side + left, p.y * side + top) for p in found.landmark], dtype=np.float32)
            for found in result.multi_face_landmarks or []
        ]
        meshes = [mesh for mesh in meshes if len(mesh) == MESH_POINTS and _centre_inside(mesh, box)]
        if not meshes:
            return None
        centre = np.array([left + side / 2, top + side / 2])
        return min(meshes, key=lambda mesh: float(np.linalg.norm(mesh.mean(axis=0) - centre)))

    def _segment_people(self, pixels: np.ndarray) -> _People | None:
        """Connected regions of the person mask of the analysis copy (``None`` without segmentation)."""
        if self._segmenter is None:
            return None
        import cv2

        with native_stderr_filtered():
            probability = self._segmenter.process(pixels).segmentation_mask
        if probability is None:
            return None
        foreground = (probability > PERSON_THRESHOLD).astype(np.uint8)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
        return _People(labels=labels, stats=stats)


@dataclasses.dataclass(frozen=True)
class _People:
    """Selfie-segmentation regions: a label image (0 = background) and OpenCV's per-label stats."""

    labels: np.ndarray
    stats: np.ndarray

    def box(self, label: int) -> Box:
        """Bounding box of region ``label`` in the label image's pixels."""
        x, y, width, height = (float(v) for v in self.stats[label, :4])
        return x, y, x + width, y + height


def _tiles(image: np.ndarray, grid: int):
    """Yield ``((x0, y0), tile)`` for a ``grid×grid`` set of overlapping tiles."""
    if grid < 2:
        return
    height, width = image.shape[:2]
    tile_w, tile_h = math.ceil(width * TILE_FRACTION), math.ceil(height * TILE_FRACTION)
    for y0 in np.linspace(0, height - tile_h, grid).round().astype(int):
        for x0 in np.linspace(0, width - tile_w, grid).round().astype(int):
            yield (int(x0), int(y0)), image[y0 : y0 + tile_h, x0 : x0 + tile_w]


def _touches_inner_edge(box: Box, origin: tuple[int, int], tile_shape: tuple, image_shape: tuple) -> bool:
    """Whether a tile's box is cut by a tile edge that is not an image edge (the face may be partial)."""
    x0, y0 = origin
    x1, y1 = x0 + tile_shape[1], y0 + tile_shape[0]
    margin = 0.01 * max(tile_shape[:2])
    return (
        (x0 > 0 and box[0] <= x0 + margin)
        or (y0 > 0 and box[1] <= y0 + margin)
        or (x1 < image_shape[1] and box[2] >= x1 - margin)
        or (y1 < image_shape[0] and box[3] >= y1 - margin)
    )


def _merge_duplicates(detections: list[Detection]) -> list[Detection]:
    """Keep the best-scoring detection of each group of boxes that cover one another."""
    kept: list[Detection] = []
    for candidate in sorted(detections, key=lambda d: -d.score):
        if all(_overlap_of_smaller(candidate.box, other.box) < DUPLICATE_OVERLAP for other in kept):
            kept.append(candidate)
    return kept


def _overlap_of_smaller(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    smaller = min(box_area(a), box_area(b))
    return inter / smaller if smaller > 0 else 0.0


def _to_detection(found, width: int, height: int, origin: tuple[int, int]) -> Detection:
    """A MediaPipe detection (relative box) as a pixel :class:`Detection`."""
    rel = found.location_data.relative_bounding_box
    x0, y0 = rel.xmin * width + origin[0], rel.ymin * height + origin[1]
    return Detection((x0, y0, x0 + rel.width * width, y0 + rel.height * height), float(found.score[0]))


def _downscaled(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """A copy whose longer side is at most ``max_side``, and the scale applied (1.0 when untouched)."""
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR, reducing_gap=2.0), scale


def _scaled_detection(detection: Detection, factor: float) -> Detection:
    """``detection`` with its box multiplied by ``factor``."""
    return Detection(tuple(v * factor for v in detection.box), detection.score)


def _clip_box(box: Box, size: tuple[int, int]) -> Box:
    """``box`` clipped to an image of ``size = (width, height)``."""
    width, height = size
    return (
        float(min(max(box[0], 0), width)),
        float(min(max(box[1], 0), height)),
        float(min(max(box[2], 0), width)),
        float(min(max(box[3], 0), height)),
    )


def _mesh_crop(box: Box) -> tuple[int, int, int]:
    """``(left, top, side)`` of the square Face Mesh crop around a detection box."""
    side = max(1, math.ceil(MESH_CROP_SCALE * max(box[2] - box[0], box[3] - box[1])))
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return math.floor(centre_x - side / 2), math.floor(centre_y - side / 2), side


def _centre_inside(landmarks: np.ndarray, box: Box) -> bool:
    """Whether the mean landmark lies inside ``box``."""
    x, y = landmarks.mean(axis=0)
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _person_box(people: _People | None, face_box: Box, scale: float, size: tuple[int, int]) -> Box | None:
    """Bounding box (original frame) of the person region holding the face, as segmented."""
    if people is None:
        return None
    label = _person_label(people.labels, tuple(v * scale for v in face_box))
    if label == 0:
        return None
    return _clip_box(tuple(v / scale for v in people.box(label)), size)


def _person_label(labels: np.ndarray, box: Box) -> int:
    """Label of the region at the box centre, else the region covering most of the box, else 0."""
    height, width = labels.shape
    centre_x = min(max(int((box[0] + box[2]) / 2), 0), width - 1)
    centre_y = min(max(int((box[1] + box[3]) / 2), 0), height - 1)
    if labels[centre_y, centre_x]:
        return int(labels[centre_y, centre_x])
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    window = labels[y0 : max(int(math.ceil(box[3])), y0 + 1), x0 : max(int(math.ceil(box[2])), x0 + 1)]
    counts = np.bincount(window.ravel(), minlength=1)
    counts[0] = 0
    return int(counts.argmax()) if counts.any() else 0
