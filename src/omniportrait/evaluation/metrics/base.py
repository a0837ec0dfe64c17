"""The metric interface: what a metric measures, which model measures it, and whether it can.

Two kinds (paper §4.2, Table 1):

- :class:`ImageMetric` scores each generated image on its own (CLIP-T, CLIP-I, SIM, BLIP, CLIP-IQA);
- :class:`SetMetric` scores a set of generated images against the reference set (FID).

A metric names the model behind its numbers (:attr:`Metric.model_name`) and may emit several columns
(SIM also reports how often a face was found). :meth:`Metric.load` raises :class:`MetricUnavailable`
when its weights or packages cannot be had; the report then says "unavailable (reason)", never a number.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from omniportrait.evaluation.errors import MetricUnavailable

__all__ = ["Column", "ImageMetric", "Metric", "MetricUnavailable", "Sample", "Scores", "SetMetric"]


@dataclass(frozen=True)
class Column:
    """One reported number: its key in records, its Table 1 label and its direction."""

    key: str
    label: str
    higher_is_better: bool = True

    @property
    def header(self) -> str:
        """Label with the paper's arrow, e.g. ``CLIP-T↑``."""
        return f"{self.label}{'↑' if self.higher_is_better else '↓'}"


@dataclass(frozen=True)
class Sample:
    """One generated image with what the per-image metrics compare it to.

    Attributes:
        image: the generated image.
        prompt: the prompt it was generated from (class word filled in).
        reference_key: name of its reference (for caching reference embeddings).
        reference_image: the reference photo, upright RGB.
        reference_face: the reference's aligned face crop (CLIP-I compares against it, §4.2).
    """

    image: Image.Image
    prompt: str
    reference_key: str
    reference_image: Image.Image
    reference_face: Image.Image


Scores = dict[str, "float | None"]
"""Column key -> value for one image (or one set); ``None`` when the value does not exist."""


class Metric(abc.ABC):
    """Base of every metric. Subclasses set :attr:`name` and :attr:`columns`."""

    name: str = ""
    columns: tuple[Column, ...] = ()

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """The model (and recipe) behind the numbers, as the report prints it."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights now; raise :class:`MetricUnavailable` when they cannot be loaded."""

    def close(self) -> None:
        """Free the models (nothing by default)."""


class ImageMetric(Metric):
    """A metric with one value per generated image."""

    @abc.abstractmethod
    def score(self, samples: Sequence[Sample]) -> list[Scores]:
        """One ``{column key: value}`` per sample, in order."""


class SetMetric(Metric):
    """A metric of a set of generated images against a set of reference images."""

    @abc.abstractmethod
    def score_set(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> Scores:
        """``{column key: value}`` for the two sets; ``None`` values when the sets are too small."""
