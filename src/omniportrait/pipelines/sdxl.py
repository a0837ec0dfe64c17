"""OmniPortrait on Stable Diffusion XL (two text encoders, 768 + 1280 = 2048 wide per token)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from omniportrait.pipelines.base import Conditioning, OmniPortraitMixin


class OmniPortraitSDXLPipeline(OmniPortraitMixin, StableDiffusionXLPipeline):
    """:class:`diffusers.StableDiffusionXLPipeline` plus the Pivot ID Encoder (and Reference-Based Guidance).

    ``e_mix`` replaces the concatenated per-token state of the class word; pooled embeddings are unchanged.
    """

    upcast_vae_in_fp16 = True

    def __init__(
        self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=None,
        feature_extractor=None, force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = False,
        pivot_encoder=None,
    ):
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
            feature_extractor, force_zeros_for_empty_prompt, add_watermarker,
        )
        self.register_modules(pivot_encoder=pivot_encoder)

    def encode_text(self, prompt, negative_prompt, num_images, do_cfg, height, width, bound) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt, device=self._execution_device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
        )
        embeds = self.mix_identities(embeds, bound)
        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else pooled.shape[-1]
        )
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim
        ).to(self._execution_device)
        if do_cfg:
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        time_ids = time_ids.repeat(num_images, 1)
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": time_ids}, do_cfg)
