"""OmniPortrait on Stable Diffusion 1.x (text width 768)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from omniportrait.guidance.config import RBGuidanceConfig
from omniportrait.identity import Identity
from omniportrait.models.pivot_encoder import PivotIDEncoder
from omniportrait.pipelines.base import OmniPortraitMixin
from omniportrait.pipelines.conditioning import Conditioning, GenerationCall


class SDTextEncoding:
    """SD1.x's text encoding with ``e_mix`` injected (shared by the plain and the ControlNet pipeline)."""

    def encode_text(self, prompt, negative_prompt, num_images, do_cfg, height, width, bound, prompt_embeds=None,
                    negative_prompt_embeds=None, lora_scale=None, clip_skip=None) -> Conditioning:
        embeds, negative = self.encode_prompt(prompt, self._execution_device, num_images, do_cfg, negative_prompt,
                                              prompt_embeds=prompt_embeds,
                                              negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
                                              clip_skip=clip_skip)
        embeds = self.mix_identities(embeds, bound)
        if do_cfg:
            embeds = torch.cat([negative, embeds])
        return Conditioning(embeds, None, do_cfg)


class OmniPortraitSDPipeline(SDTextEncoding, OmniPortraitMixin, StableDiffusionPipeline):
    """:class:`diffusers.StableDiffusionPipeline` plus the Pivot ID Encoder (and Reference-Based Guidance)."""

    _optional_components = [*StableDiffusionPipeline._optional_components, "pivot_encoder"]

    def __init__(
        self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers, safety_checker: Any = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None, requires_safety_checker: bool = False,
        pivot_encoder: PivotIDEncoder | None = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
            image_encoder, requires_safety_checker,
        )
        self.register_modules(pivot_encoder=pivot_encoder)

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] = None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = 50, timesteps: list[int] = None, sigmas: list[float] = None,
        guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1, eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0, clip_skip: int | None = None, callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default)
        *, identities: list[Identity] | None = None, rb_guidance: RBGuidanceConfig | None = None,
    ):
        """diffusers' :meth:`StableDiffusionPipeline.__call__`, plus ``identities`` (each bound to its class word of
        the prompt) and ``rb_guidance`` (:class:`~omniportrait.guidance.RBGuidanceConfig`)."""
        return self.generate(GenerationCall.from_arguments(locals()))
