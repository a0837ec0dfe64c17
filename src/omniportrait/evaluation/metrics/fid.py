"""FID (Heusel et al. 2017; Table 1, "Image Quality") of the generated images against the reference set.

Two feature extractors behind torchmetrics' ``FrechetInceptionDistance``:

- :class:`InceptionFID`, the standard (paper) FID: torch-fidelity's Inception-v3 2048-d pool features.
  It needs the ``torch-fidelity`` package and its weights ``pt_inception-2015-12-05-6726825d.pth``
  (given with ``--fid-inception-weights`` or found in the torch hub cache; downloaded from GitHub only
  when HF_HUB_OFFLINE is not set). Otherwise it is reported unavailable.
- :class:`ClipFID` ("FID-CLIP"): the same Fréchet distance on the projected image embeddings of the CLIP
  model of the CLIP metrics. It runs wherever CLIP runs, but its values are not comparable with the
  paper's FID; the report says so.

Only the main process computes them, over every process's images, so torchmetrics' cross-process sync is
off (``sync_on_compute=False``). Both need at least two images in each set (a covariance needs two
samples); with fewer the value is ``None`` and the report prints "n/a".
"""

from __future__ import annotations

import abc

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from omniportrait.evaluation.metrics.base import Column, MetricUnavailable, Scores, SetMetric
from omniportrait.evaluation.metrics.clip import ClipBackbone, ClipBacked

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
MIN_SET_SIZE = 2
BATCH_SIZE = 16


def cached_inception_weights() -> Path | None:
    """torch-fidelity's Inception weights in the torch hub cache, if a previous run downloaded them."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return path if path.is_file() else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def batches(items: Sequence, size: int = BATCH_SIZE):
    """Consecutive slices of ``items``; a lazy sequence loads only one slice at a time."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class FidMetric(SetMetric):
    """Shared Fréchet-distance computation; subclasses provide :meth:`new_metric` and :meth:`features_input`."""

    @abc.abstractmethod
    def new_metric(self):
        """A fresh torchmetrics Fréchet-distance object."""

    @abc.abstractmethod
    def features_input(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """What :meth:`new_metric`'s object takes for ``images``."""

    def score_set(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> Scores:
        key = self.columns[0].key
        if len(generated) < MIN_SET_SIZE or len(references) < MIN_SET_SIZE:
            return {key: None}
        metric = self.new_metric()
        for images, real in ((references, True), (generated, False)):
            for chunk in batches(images):
                metric.update(self.features_input(chunk), real=real)
        return {key: float(metric.compute())}


class InceptionFID(FidMetric):
    """The standard FID on Inception-v3 pool features (torch-fidelity weights)."""

    name = "FID"
    columns = (Column("fid", "FID", higher_is_better=False),)

    def __init__(self, weights: str | None = None, device: str = "cpu") -> None:
        self.weights = weights
        self.device = device
        self.weights_path: Path | None = None

    @property
    def model_name(self) -> str:
        return f"Inception-v3 (torch-fidelity {INCEPTION_WEIGHTS_FILE}, {INCEPTION_FEATURES}-d) via torchmetrics"

    def load(self) -> None:
        if importlib.util.find_spec("torch_fidelity") is None:
            raise MetricUnavailable("torch-fidelity is not installed (pip install torch-fidelity, "
                                    "or torchmetrics[image]); it provides the Inception-v3 of standard FID")
        if self.weights is not None:
            self.weights_path = Path(self.weights).expanduser()
            if not self.weights_path.is_file():
                raise MetricUnavailable(f"Inception weights {self.weights} not found")
        else:
            self.weights_path = cached_inception_weights()
            if self.weights_path is None and offline():
                raise MetricUnavailable(f"{INCEPTION_WEIGHTS_FILE} is not in the torch hub cache and HF_HUB_OFFLINE "
                                        "is set; pass --fid-inception-weights PATH")
        self.new_metric()

    def new_metric(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        weights = str(self.weights_path) if self.weights_path else None
        return FrechetInceptionDistance(feature=INCEPTION_FEATURES, feature_extractor_weights_path=weights,
                                        sync_on_compute=False).to(self.device)

    def features_input(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """uint8 ``(N, 3, 299, 299)``: torch-fidelity's Inception takes 0-255 pixels."""
        arrays = [np.asarray(im.convert("RGB").resize((INCEPTION_SIZE,) * 2, Image.BICUBIC)) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(self.device)


class ClipFeatures(torch.nn.Module):
    """CLIP's projected image embedding as a torchmetrics FID feature extractor."""

    def __init__(self, clip: ClipBackbone) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = clip.model.config.projection_dim

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.clip.model.vision_model(pixel_values=pixel_values).pooler_output
        return self.clip.model.visual_projection(pooled).float()


class ClipFID(ClipBacked, FidMetric):
    """Fréchet distance on CLIP image embeddings ("FID-CLIP"; not comparable with Inception FID)."""

    name = "FID-CLIP"
    columns = (Column("fid_clip", "FID-CLIP", higher_is_better=False),)
    recipe = "Fréchet distance of CLIP image embeddings (not the paper's FID)"

    def new_metric(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=ClipFeatures(self.backbone()), sync_on_compute=False).to(self.device)

    def features_input(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.clip.pixel_values(images)
