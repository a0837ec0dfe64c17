"""SIM (Table 1, "Identity Fidelity"): cosine of the face embeddings of reference and generated faces, ×100.

The backend is chosen by :func:`omniportrait.evaluation.sim.load_face_embedder` (dlib offline by default,
FaceNet when its weights are given). A generated image without a detectable face scores 0: it kept no
identity, and leaving it out would reward a method that loses the face. The "Face found %" column reports
how often a face was found, so the mean over detected faces only can be recovered.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from omniportrait.evaluation.metrics.base import Column, ImageMetric, Sample, Scores
from omniportrait.evaluation.sim import FaceBoxFinder, FaceEmbedder, cosine, load_face_embedder

NO_FACE_SIM = 0.0


class IdentitySimilarity(ImageMetric):
    """SIM and the face-detection rate of each generated image."""

    name = "SIM"
    columns = (Column("sim", "SIM"), Column("face_rate", "Face found %"))

    def __init__(self, backend: str = "auto", facenet_weights: str | None = None, device: str = "cpu",
                 find_face: FaceBoxFinder | None = None) -> None:
        self.backend = backend
        self.facenet_weights = facenet_weights
        self.device = device
        self.find_face = find_face
        self.embedder: FaceEmbedder | None = None
        self.reference_cache: dict[str, np.ndarray | None] = {}

    @property
    def model_name(self) -> str:
        backend = self.embedder.name if self.embedder else (
            "FaceNet InceptionResnetV1 (VGGFace2)" if self.backend == "facenet" or self.facenet_weights
            else "dlib ResNet face descriptor (face_recognition_models, 128-d)")
        return f"{backend}; faces detected by MediaPipe (paper: RetinaFace + FaceNet); 100·cos, no face = 0"

    def load(self) -> None:
        self.embedder = load_face_embedder(self.backend, self.facenet_weights, self.device, self.find_face)

    def reference_embedding(self, sample: Sample) -> np.ndarray | None:
        if sample.reference_key not in self.reference_cache:
            self.reference_cache[sample.reference_key] = self.embedder.embed(sample.reference_image)
        return self.reference_cache[sample.reference_key]

    def score(self, samples: Sequence[Sample]) -> list[Scores]:
        if self.embedder is None:
            self.load()
        return [self.score_one(sample) for sample in samples]

    def score_one(self, sample: Sample) -> Scores:
        reference = self.reference_embedding(sample)
        generated = self.embedder.embed(sample.image)
        if generated is None:
            return {"sim": NO_FACE_SIM, "face_rate": 0.0}
        return {"sim": None if reference is None else 100.0 * cosine(reference, generated), "face_rate": 100.0}
