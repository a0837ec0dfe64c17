"""The metrics of Table 1 (paper §4.2), each pluggable and naming the model behind its numbers.

``--metrics`` names: ``blip``, ``clip-t``, ``clip-i``, ``sim``, ``clip-iqa``, ``fid`` (standard, Inception)
and ``fid-clip`` (CLIP features). :func:`build_metrics` makes them from a :class:`MetricConfig`;
:func:`load_metrics` loads each and records the ones that are unavailable with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniportrait.errors import ConfigError
from omniportrait.evaluation.metrics.base import (
    Column,
    ImageMetric,
    Metric,
    MetricUnavailable,
    Sample,
    Scores,
    SetMetric,
)
from omniportrait.evaluation.metrics.blip import DEFAULT_BLIP_MODEL, BlipScore
from omniportrait.evaluation.metrics.clip import DEFAULT_CLIP_MODEL, ClipImageScore, ClipIQA, ClipTextScore
from omniportrait.evaluation.metrics.fid import ClipFID, InceptionFID
from omniportrait.evaluation.metrics.identity import IdentitySimilarity

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "Column",
    "ImageMetric",
    "Metric",
    "MetricConfig",
    "MetricStatus",
    "MetricUnavailable",
    "Sample",
    "Scores",
    "SetMetric",
    "build_metrics",
    "load_metrics",
    "parse_metric_names",
]

METRIC_NAMES = ("blip", "clip-t", "clip-i", "sim", "clip-iqa", "fid", "fid-clip")
"""Every metric, in Table 1's column order (FID-CLIP last)."""

DEFAULT_METRICS = METRIC_NAMES


@dataclass(frozen=True)
class MetricConfig:
    """Which models the metrics use.

    Attributes:
        clip_model: CLIP for CLIP-T, CLIP-I and FID-CLIP (hub id, folder or ``tiny-random``).
        iqa_model: CLIP for CLIP-IQA; ``None`` = ``clip_model``.
        blip_model: BLIP image-text matching model.
        sim_backend: ``auto`` (FaceNet when ``facenet_weights`` is given, else dlib), ``dlib`` or ``facenet``.
        facenet_weights: VGGFace2 InceptionResnetV1 state dict for the FaceNet backend.
        fid_inception_weights: torch-fidelity Inception weights file for the standard FID.
        device: where the metric models run.
    """

    clip_model: str = DEFAULT_CLIP_MODEL
    iqa_model: str | None = None
    blip_model: str = DEFAULT_BLIP_MODEL
    sim_backend: str = "auto"
    facenet_weights: str | None = None
    fid_inception_weights: str | None = None
    device: str = "cpu"


def parse_metric_names(spec: str | None) -> list[str]:
    """``--metrics clip-t,sim`` -> ``["clip-t", "sim"]`` in Table 1 order; ``None`` = all."""
    if not spec:
        return list(DEFAULT_METRICS)
    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown) or spec!r}; choose from {', '.join(METRIC_NAMES)}")
    return [name for name in METRIC_NAMES if name in names]


def build_metric(name: str, config: MetricConfig) -> Metric:
    """One metric by its ``--metrics`` name."""
    device = config.device
    factories = {
        "blip": lambda: BlipScore(config.blip_model, device),
        "clip-t": lambda: ClipTextScore(config.clip_model, device),
        "clip-i": lambda: ClipImageScore(config.clip_model, device),
        "sim": lambda: IdentitySimilarity(config.sim_backend, config.facenet_weights, device),
        "clip-iqa": lambda: ClipIQA(config.iqa_model or config.clip_model, device),
        "fid": lambda: InceptionFID(config.fid_inception_weights, device),
        "fid-clip": lambda: ClipFID(config.clip_model, device),
    }
    if name not in factories:
        raise ConfigError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
    return factories[name]()


def build_metrics(names: list[str], config: MetricConfig) -> list[Metric]:
    return [build_metric(name, config) for name in names]


@dataclass
class MetricStatus:
    """A metric after :func:`load_metrics`: usable, or unavailable with the reason."""

    metric: Metric
    available: bool
    reason: str | None = None

    def describe(self) -> dict:
        """What the report says about this metric."""
        return {"name": self.metric.name, "model": self.metric.model_name, "available": self.available,
                "reason": self.reason, "columns": [c.key for c in self.metric.columns],
                "kind": "per image" if isinstance(self.metric, ImageMetric) else "set"}


def load_metrics(metrics: list[Metric]) -> list[MetricStatus]:
    """Load each metric; one whose weights or packages are missing is kept as unavailable, never scored."""
    statuses = []
    for metric in metrics:
        try:
            metric.load()
            statuses.append(MetricStatus(metric, True))
        except MetricUnavailable as err:
            statuses.append(MetricStatus(metric, False, str(err)))
    return statuses
