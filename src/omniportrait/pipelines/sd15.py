"""OmniPortrait on Stable Diffusion 1.x (text width 768)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from omniportrait.pipelines.base import Conditioning, OmniPortraitMixin


class OmniPortraitSDPipeline(OmniPortraitMixin, StableDiffusionPipeline):
    """:class:`diffusers.StableDiffusionPipeline` plus the Pivot ID Encoder (and Reference-Based Guidance)."""

    def __init__(
        self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker: bool = False, pivot_encoder=None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
            image_encoder, requires_safety_checker,
        )
        self.register_modules(pivot_encoder=pivot_encoder)

    def encode_text(self, prompt, negative_prompt, num_images, do_cfg, height, width, bound) -> Conditioning:
        embeds, negative = self.encode_prompt(prompt, self._execution_device, num_images, do_cfg, negative_prompt)
        embeds = self.mix_identities(embeds, bound)
        if do_cfg:
            embeds = torch.cat([negative, embeds])
        return Conditioning(embeds, None, do_cfg)
