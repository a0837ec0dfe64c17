"""BLIP score (Table 1, "Text Editability"): BLIP's image-text matching probability of the prompt, ×100.

The paper does not say which BLIP head it uses; we take the ITM head of ``BlipForImageTextRetrieval``
(default ``Salesforce/blip-itm-large-coco``): ``100 · softmax(itm_logits)[match]``. The model id is a
parameter, ``tiny-random`` gives a tiny random BLIP for offline checks.
"""

from __future__ import annotations

from typing import Sequence

import torch

from omniportrait.evaluation.metrics.base import Column, ImageMetric, MetricUnavailable, Sample, Scores
from omniportrait.evaluation.metrics.clip import describe_model, short_reason

DEFAULT_BLIP_MODEL = "Salesforce/blip-itm-large-coco"
MATCH_INDEX = 1  # ITM head: index 0 = "no match", 1 = "match"


class BlipScore(ImageMetric):
    """BLIP image-text matching probability of each (image, prompt) pair."""

    name = "BLIP"
    columns = (Column("blip", "BLIP"),)

    def __init__(self, model_id: str = DEFAULT_BLIP_MODEL, device: str = "cpu") -> None:
        self.model_id = model_id
        self.device = device
        self.model = None
        self.processor = None

    @property
    def model_name(self) -> str:
        return f"{describe_model(self.model_id)}; 100·P(match) of the ITM head"

    def load(self) -> None:
        from omniportrait.evaluation.tiny import TINY_MODEL_ID, tiny_blip

        if self.model_id == TINY_MODEL_ID:
            bundle = tiny_blip()
            model, self.processor = bundle.model, bundle.processor
        else:
            try:
                from transformers import BlipForImageTextRetrieval, BlipProcessor

                model = BlipForImageTextRetrieval.from_pretrained(self.model_id)
                self.processor = BlipProcessor.from_pretrained(self.model_id)
            except Exception as err:  # hub, file and config errors alike mean "cannot be loaded here"
                raise MetricUnavailable(
                    f"BLIP model {self.model_id!r} could not be loaded ({short_reason(err)})"
                ) from err
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def match_probabilities(self, images, texts: Sequence[str]) -> torch.Tensor:
        """``P(match)`` of each (image, text) pair, in [0, 1]."""
        if self.model is None:
            self.load()
        pixels = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=limit,
                                          return_tensors="pt")
        output = self.model(input_ids=tokens["input_ids"].to(self.device),
                            attention_mask=tokens["attention_mask"].to(self.device),
                            pixel_values=pixels["pixel_values"].to(self.device), use_itm_head=True)
        return output.itm_score.float().softmax(dim=-1)[:, MATCH_INDEX].cpu()

    def score(self, samples: Sequence[Sample]) -> list[Scores]:
        probabilities = self.match_probabilities([s.image for s in samples], [s.prompt for s in samples])
        return [{"blip": float(100.0 * p)} for p in probabilities]
