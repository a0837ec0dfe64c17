"""CLIP-based metrics of Table 1: CLIP-T (text alignment), CLIP-I (identity) and CLIP-IQA (quality).

All three share one CLIP model per ``(model id, device)`` (:func:`load_clip`); the id is a parameter
(default ``openai/clip-vit-large-patch14``), ``tiny-random`` gives a tiny random CLIP for offline checks.

- CLIP-T (Hessel et al. 2021, as torchmetrics' ``CLIPScore``): ``100 · max(cos(E_image, E_prompt), 0)``.
- CLIP-I: ``100 · cos(E_reference_face, E_image)``, the reference's aligned face crop against the whole
  generated image (§4.2: "between the reference face image and the generated image").
- CLIP-IQA (Wang et al. 2023): ``100 · softmax(100 · [cos(E_image, E_good), cos(E_image, E_bad)])[good]``
  with the antonym prompts "Good photo." / "Bad photo.". The CLIP-IQA paper (and torchmetrics' default
  ``clip_iqa``) use a ResNet-50 CLIP without positional embedding; we use the configured CLIP, and the
  report names it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from omniportrait.evaluation.metrics.base import Column, ImageMetric, MetricUnavailable, Sample, Scores

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
IQA_PROMPTS = ("Good photo.", "Bad photo.")
IQA_LOGIT_SCALE = 100.0


def short_reason(err: BaseException) -> str:
    """``Type: first line of the message`` for an unavailability reason."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()


@dataclass
class ClipBackbone:
    """A CLIP model and its processor on one device, with unit-norm embedding helpers."""

    model_id: str
    model: torch.nn.Module
    processor: object
    device: torch.device

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images preprocessed for the vision tower (resize, centre crop, normalise)."""
        batch = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings ``(N, D)``, not normalised."""
        pooled = self.model.vision_model(pixel_values=self.pixel_values(images)).pooler_output
        return self.model.visual_projection(pooled).float()

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm projected image embeddings ``(N, D)``."""
        return torch.nn.functional.normalize(self.image_features(images), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``(N, D)``; texts are cut at the model's token limit (77)."""
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=limit,
                                          return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)


@functools.lru_cache(maxsize=4)
def load_clip(model_id: str, device: str = "cpu") -> ClipBackbone:
    """The CLIP model ``model_id`` (hub id, local folder, or ``tiny-random``).

    Raises :class:`MetricUnavailable` when it cannot be loaded (not cached offline, no such id, bad folder).
    """
    from omniportrait.evaluation.tiny import TINY_MODEL_ID, tiny_clip

    if model_id == TINY_MODEL_ID:
        bundle = tiny_clip()
        model, processor = bundle.model, bundle.processor
    else:
        try:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(model_id)
            processor = CLIPProcessor.from_pretrained(model_id)
        except Exception as err:  # hub, file and config errors alike mean "cannot be loaded here"
            raise MetricUnavailable(f"CLIP model {model_id!r} could not be loaded ({short_reason(err)})") from err
    return ClipBackbone(model_id, model.eval().to(device), processor, torch.device(device))


def describe_model(model_id: str) -> str:
    """How the report names a model id; the tiny random one is flagged as meaningless."""
    from omniportrait.evaluation.tiny import TINY_MODEL_ID

    if model_id == TINY_MODEL_ID:
        return f"{model_id} (random weights: plumbing check, numbers mean nothing)"
    return model_id


class ClipBacked:
    """Lazy loading of a CLIP backbone, shared by the CLIP metrics and FID-CLIP; ``recipe`` names the use."""

    recipe = ""

    def __init__(self, model_id: str = DEFAULT_CLIP_MODEL, device: str = "cpu") -> None:
        self.model_id = model_id
        self.device = device
        self.clip: ClipBackbone | None = None

    @property
    def model_name(self) -> str:
        return f"{describe_model(self.model_id)}; {self.recipe}"

    def load(self) -> None:
        self.clip = load_clip(self.model_id, self.device)

    def backbone(self) -> ClipBackbone:
        if self.clip is None:
            self.load()
        return self.clip


class ClipMetric(ClipBacked, ImageMetric):
    """A per-image metric on a CLIP backbone."""


class ClipTextScore(ClipMetric):
    """CLIP-T: prompt-image alignment (Table 1, "Text Editability")."""

    name = "CLIP-T"
    columns = (Column("clip_t", "CLIP-T"),)
    recipe = "100·max(cos(image, prompt), 0)"

    def score(self, samples: Sequence[Sample]) -> list[Scores]:
        clip = self.backbone()
        images = clip.image_embeddings([s.image for s in samples])
        cosines = (images * clip.text_embeddings([s.prompt for s in samples])).sum(-1)
        return [{"clip_t": float(100.0 * value.clamp(min=0))} for value in cosines.cpu()]


class ClipImageScore(ClipMetric):
    """CLIP-I: reference face crop against the generated image (Table 1, "Identity Fidelity")."""

    name = "CLIP-I"
    columns = (Column("clip_i", "CLIP-I"),)
    recipe = "100·cos(reference face crop, image)"

    def __init__(self, model_id: str = DEFAULT_CLIP_MODEL, device: str = "cpu") -> None:
        super().__init__(model_id, device)
        self.reference_cache: dict[str, torch.Tensor] = {}

    def reference_embedding(self, sample: Sample) -> torch.Tensor:
        if sample.reference_key not in self.reference_cache:
            self.reference_cache[sample.reference_key] = self.backbone().image_embeddings([sample.reference_face])[0]
        return self.reference_cache[sample.reference_key]

    def score(self, samples: Sequence[Sample]) -> list[Scores]:
        generated = self.backbone().image_embeddings([s.image for s in samples])
        references = torch.stack([self.reference_embedding(s) for s in samples])
        return [{"clip_i": float(100.0 * value)} for value in (generated * references).sum(-1).cpu()]


class ClipIQA(ClipMetric):
    """CLIP-IQA: probability that CLIP prefers "Good photo." over "Bad photo." (Table 1, "Image Quality")."""

    name = "CLIP-IQA"
    columns = (Column("clip_iqa", "IQA"),)
    recipe = "CLIP-IQA, 100·P('Good photo.' vs 'Bad photo.')"

    def score(self, samples: Sequence[Sample]) -> list[Scores]:
        clip = self.backbone()
        anchors = clip.text_embeddings(list(IQA_PROMPTS))
        logits = IQA_LOGIT_SCALE * clip.image_embeddings([s.image for s in samples]) @ anchors.T
        return [{"clip_iqa": float(100.0 * p)} for p in logits.softmax(dim=-1)[:, 0].cpu()]
