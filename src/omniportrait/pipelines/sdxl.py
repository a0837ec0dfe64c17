"""OmniPortrait on Stable Diffusion XL (two text encoders, 768 + 1280 = 2048 wide per token)."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from omniportrait.guidance.config import RBGuidanceConfig
from omniportrait.identity import Identity
from omniportrait.models.pivot_encoder import PivotIDEncoder
from omniportrait.pipelines.base import OmniPortraitMixin
from omniportrait.pipelines.conditioning import Conditioning, GenerationCall


class SDXLTextEncoding:
    """SDXL's text encoding with ``e_mix`` injected, and its size conditioning (shared by the plain and the ControlNet
    pipeline). ``e_mix`` replaces the concatenated per-token state of the class word; pooled embeddings are
    unchanged."""

    upcast_vae_in_fp16 = True

    def encode_text(self, prompt, negative_prompt, num_images, do_cfg, height, width, bound, prompt_embeds=None,
                    negative_prompt_embeds=None, lora_scale=None, clip_skip=None, prompt_2=None,
                    negative_prompt_2=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                    original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                    negative_crops_coords_top_left=(0, 0), negative_target_size=None) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, device=self._execution_device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )
        embeds = self.mix_identities(embeds, bound)
        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else pooled.shape[-1]
        )

        def time_ids(original, crops, target):
            return self._get_add_time_ids(original or (height, width), crops, target or (height, width),
                                          dtype=embeds.dtype, text_encoder_projection_dim=projection_dim)

        add_time_ids = time_ids(original_size, crops_coords_top_left, target_size)
        negative_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size)
        if do_cfg:
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
            add_time_ids = torch.cat([negative_time_ids, add_time_ids])
        add_time_ids = add_time_ids.to(self._execution_device).repeat(embeds.shape[0] // (1 + do_cfg), 1)
        return Conditioning(embeds.to(self._execution_device),
                            {"text_embeds": pooled.to(self._execution_device), "time_ids": add_time_ids}, do_cfg)

    def output_tuple(self, output) -> tuple:
        """``(images,)``, as diffusers' SDXL pipelines return with ``return_dict=False``."""
        return (output.images,)


class OmniPortraitSDXLPipeline(SDXLTextEncoding, OmniPortraitMixin, StableDiffusionXLPipeline):
    """:class:`diffusers.StableDiffusionXLPipeline` plus the Pivot ID Encoder (and Reference-Based Guidance)."""

    _optional_components = [*StableDiffusionXLPipeline._optional_components, "pivot_encoder"]

    def __init__(
        self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers, image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None, force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False, pivot_encoder: PivotIDEncoder | None = None,
    ):
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
            feature_extractor, force_zeros_for_empty_prompt, add_watermarker,
        )
        self.register_modules(pivot_encoder=pivot_encoder)

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] = None, prompt_2: str | list[str] | None = None, height: int | None = None,
        width: int | None = None, num_inference_steps: int = 50, timesteps: list[int] = None,
        sigmas: list[float] = None, denoising_end: float | None = None, guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1, eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None, negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0, original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default)
        *, identities: list[Identity] | None = None, rb_guidance: RBGuidanceConfig | None = None,
    ):
        """diffusers' :meth:`StableDiffusionXLPipeline.__call__`, plus ``identities`` (each bound to its class word
        of the prompt) and ``rb_guidance`` (:class:`~omniportrait.guidance.RBGuidanceConfig`)."""
        return self.generate(GenerationCall.from_arguments(locals()))
