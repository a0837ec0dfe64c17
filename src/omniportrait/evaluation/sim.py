"""Identity similarity (SIM, paper §4.2): cosine of face embeddings of the detected faces.

The paper detects faces with RetinaFace and embeds them with FaceNet. Here faces are detected by our
MediaPipe detector (:mod:`omniportrait.faces`, offline, models inside the wheel) and embedded by one of two
backends, both behind :class:`FaceEmbedder`:

- ``dlib`` (default, offline): dlib's ResNet face descriptor (128-d) with its 5-point alignment, weights from
  the ``face_recognition_models`` package;
- ``facenet`` (the paper's): our :class:`~omniportrait.evaluation.facenet.InceptionResnetV1` with a
  user-supplied VGGFace2 state dict (``--facenet-weights``).

The two give different numbers (dlib cosines of different people are typically 0.7-0.9, FaceNet's much
lower), so SIM is only comparable within one backend; the report names it.
"""

from __future__ import annotations

import abc

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from omniportrait.evaluation.errors import MetricUnavailable
from omniportrait.faces.base import Box, box_area

SIM_BACKENDS = ("auto", "dlib", "facenet")

DLIB_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"

FaceBoxFinder = Callable[[Image.Image], "Box | None"]
"""Returns the box of the largest face of an RGB image, or ``None`` when there is no face."""


class MediaPipeLargestFace:
    """The largest face box found by :class:`~omniportrait.faces.MediaPipeFaceDetector` (RetinaFace's role)."""

    def __init__(self) -> None:
        try:
            from omniportrait.faces import MediaPipeFaceDetector

            self.detector = MediaPipeFaceDetector()
        except ImportError as err:
            raise MetricUnavailable(
                f"face detection needs MediaPipe ({err}); install it with pip install 'omniportrait[faces]'"
            ) from err

    def __call__(self, image: Image.Image) -> Box | None:
        detections = self.detector.detect(np.asarray(image.convert("RGB")))
        return max((d.box for d in detections), key=box_area, default=None)


class FaceEmbedder(abc.ABC):
    """Embeds the largest face of an image; subclasses implement :meth:`embed_face`."""

    name: str = ""

    def __init__(self, find_face: FaceBoxFinder | None = None) -> None:
        self.find_face = find_face or MediaPipeLargestFace()

    def embed(self, image: Image.Image) -> np.ndarray | None:
        """The unit-norm embedding of the largest face of ``image``, or ``None`` when it has no face."""
        image = image.convert("RGB")
        box = self.find_face(image)
        if box is None:
            return None
        vector = np.asarray(self.embed_face(image, box), dtype=np.float64)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    @abc.abstractmethod
    def embed_face(self, image: Image.Image, box: Box) -> np.ndarray:
        """The raw embedding of the face inside ``box``."""


def face_recognition_models_dir() -> Path:
    """The ``models`` folder of ``face_recognition_models``, found without importing it.

    Its ``__init__`` imports ``pkg_resources``, which new setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable("the face_recognition_models package is not installed; "
                                "pip install 'omniportrait[eval]'")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibFaceEmbedder(FaceEmbedder):
    """dlib's 128-d ResNet face descriptor on the 5-point-aligned face chip."""

    name = "dlib ResNet face descriptor (face_recognition_models, 128-d)"

    def __init__(self, find_face: FaceBoxFinder | None = None) -> None:
        try:
            import dlib
        except ImportError as err:
            raise MetricUnavailable(f"dlib is not installed ({err}); pip install 'omniportrait[eval]'") from err
        models = face_recognition_models_dir()
        for name in (DLIB_SHAPE_MODEL, DLIB_RECOGNITION_MODEL):
            if not (models / name).is_file():
                raise MetricUnavailable(f"{models / name} is missing; reinstall face_recognition_models")
        self.dlib = dlib
        self.shape_predictor = dlib.shape_predictor(str(models / DLIB_SHAPE_MODEL))
        self.encoder = dlib.face_recognition_model_v1(str(models / DLIB_RECOGNITION_MODEL))
        super().__init__(find_face)

    def embed_face(self, image: Image.Image, box: Box) -> np.ndarray:
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        shape = self.shape_predictor(pixels, self.dlib.rectangle(x0, y0, x1, y1))
        return np.array(self.encoder.compute_face_descriptor(pixels, shape))


class FaceNetFaceEmbedder(FaceEmbedder):
    """FaceNet (Inception-ResNet-v1, VGGFace2 weights supplied by the user) on the 160×160 face box crop."""

    def __init__(self, weights: str | os.PathLike, device: str = "cpu", find_face: FaceBoxFinder | None = None):
        from omniportrait.evaluation.facenet import FaceNetWeightsError, load_facenet

        try:
            self.model = load_facenet(weights).to(device)
        except FaceNetWeightsError as err:
            raise MetricUnavailable(str(err)) from err
        self.device = device
        self.name = f"FaceNet InceptionResnetV1 ({Path(weights).name}, 512-d)"
        super().__init__(find_face)

    def embed_face(self, image: Image.Image, box: Box) -> np.ndarray:
        import torch

        from omniportrait.evaluation.facenet import FACENET_INPUT_SIZE, standardize

        crop = image.crop(tuple(int(round(v)) for v in box)).resize((FACENET_INPUT_SIZE,) * 2, Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            return self.model(standardize(pixels).to(self.device))[0].double().cpu().numpy()


def load_face_embedder(backend: str = "auto", facenet_weights: str | None = None, device: str = "cpu",
                       find_face: FaceBoxFinder | None = None) -> FaceEmbedder:
    """The SIM backend: ``facenet`` needs ``facenet_weights``; ``auto`` is FaceNet when weights are given, else dlib."""
    if backend not in SIM_BACKENDS:
        raise MetricUnavailable(f"unknown SIM backend {backend!r}; use {', '.join(SIM_BACKENDS)}")
    if backend == "facenet" or (backend == "auto" and facenet_weights):
        if not facenet_weights:
            raise MetricUnavailable("FaceNet needs its VGGFace2 weights: pass --facenet-weights PATH "
                                    "(a state dict of InceptionResnetV1, e.g. 20180402-114759-vggface2.pt)")
        return FaceNetFaceEmbedder(facenet_weights, device, find_face)
    return DlibFaceEmbedder(find_face)


@functools.lru_cache(maxsize=1)
def default_face_embedder() -> FaceEmbedder | None:
    """The process-wide default backend (dlib), or ``None`` when it cannot be loaded."""
    try:
        return load_face_embedder("dlib")
    except MetricUnavailable:
        return None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _as_image(source: Any) -> Image.Image:
    """A PIL image from a path, a PIL image, an array or anything with an ``.image`` (a prepared reference)."""
    from omniportrait.images import load_image

    return load_image(getattr(source, "image", source))


def identity_similarity(
    reference_image: Any, generated_image: Any, embedder: FaceEmbedder | None = None
) -> float | None:
    """SIM of one output to its reference: the cosine of the two largest faces' embeddings, in [-1, 1].

    ``None`` when no SIM backend can be loaded or either image has no detectable face. Uses the dlib
    backend unless ``embedder`` is given. Accepts paths, PIL images, arrays or a ``PreparedReference``.
    """
    embedder = embedder or default_face_embedder()
    if embedder is None:
        return None
    reference = embedder.embed(_as_image(reference_image))
    if reference is None:
        return None
    generated = embedder.embed(_as_image(generated_image))
    return None if generated is None else cosine(reference, generated)
