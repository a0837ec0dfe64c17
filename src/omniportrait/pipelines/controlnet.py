"""OmniPortrait with a ControlNet (pose, edges, depth, …) on SD1.5 and SDXL.

The two classes are diffusers' ControlNet pipelines running our loop (:class:`~omniportrait.pipelines.base.
OmniPortraitMixin`); :class:`ControlNetSteps` adds what a ControlNet needs: its inputs, prepared as diffusers
prepares them, and its residuals at every UNet pass, in every pass of a guided step that predicts noise (the batched
CFG pass, both halves of the ``split`` pass, the conditional pass of ``separate``), never in the reference pass. The
residuals are computed without grad: the guidance differentiates the UNet with the ControlNet's residuals held fixed.
With no identity the pipelines equal diffusers' ControlNet pipelines.
"""

from __future__ import annotations

from typing import Any, Callable

import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
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
from omniportrait.pipelines.conditioning import Conditioning, ControlInputs, GenerationCall
from omniportrait.pipelines.sd15 import SDTextEncoding
from omniportrait.pipelines.sdxl import SDXLTextEncoding


def as_list(value, count: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class ControlNetSteps:
    """A ControlNet's inputs for a call and its residuals at each UNet pass (diffusers' ControlNet pipelines' rules:
    ``controlnet_conditioning_scale`` per ControlNet, applied on the steps inside ``control_guidance_start``/``end``;
    in ``guess_mode`` only the conditional half gets residuals)."""

    def nets(self) -> list:
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

    def default_call_size(self, call: GenerationCall) -> tuple[int, int]:
        """As given, else the (first) control image's size, as diffusers' ControlNet pipelines do."""
        if call.height and call.width:
            return call.height, call.width
        first = call.control["image"]
        while isinstance(first, list):
            first = first[0]
        width, height = first.size if isinstance(first, PIL.Image.Image) else (first.shape[-1], first.shape[-2])
        multiple = self.vae_scale_factor
        return call.height or height - height % multiple, call.width or width - width % multiple

    def check_call(self, call: GenerationCall, height: int, width: int) -> None:
        """The start and end of control as one entry per ControlNet (as diffusers aligns them), then the checks."""
        options = call.control
        start, end = options["control_guidance_start"], options["control_guidance_end"]
        count = len(start) if isinstance(start, list) else len(end) if isinstance(end, list) else len(self.nets())
        options["control_guidance_start"], options["control_guidance_end"] = as_list(start, count), as_list(end, count)
        super().check_call(call, height, width)

    def prepare_control(self, call: GenerationCall, height: int, width: int, rows: int, steps: int) -> ControlInputs:
        options, nets = call.control, self.nets()
        multi = isinstance(self.controlnet, MultiControlNetModel)
        guess_mode = options["guess_mode"] or nets[0].config.global_pool_conditions

        def prepared(image):
            return self.prepare_image(image=image, width=width, height=height, batch_size=rows,
                                      num_images_per_prompt=call.num_images_per_prompt,
                                      device=self._execution_device, dtype=self.controlnet.dtype,
                                      do_classifier_free_guidance=call.do_cfg, guess_mode=guess_mode)

        image = [prepared(item) for item in options["image"]] if multi else prepared(options["image"])
        return ControlInputs(image=image, scale=options["controlnet_conditioning_scale"],
                             start=options["control_guidance_start"], end=options["control_guidance_end"],
                             multi=multi, guess_mode=guess_mode, steps=steps)

    def control_residuals(self, latents, model_input, t, cond: Conditioning) -> dict:
        """The residuals for a UNet pass on ``model_input`` with ``cond``, at the current step."""
        control = cond.control
        if control is None or (control.guess_mode and cond.half == "uncond"):
            return {}
        pad = control.guess_mode and cond.do_cfg  # guess mode: the conditional half alone, zeros for the other
        inputs, source = (self.scheduler.scale_model_input(latents, t), cond.conditional()) if pad else \
            (model_input, cond)
        extra = {name: value for name, value in (source.added_cond_kwargs or {}).items() if name != "image_embeds"}
        with torch.no_grad():
            down, mid = self.controlnet(inputs, t, encoder_hidden_states=source.prompt_embeds,
                                        controlnet_cond=control.image, conditioning_scale=control.scale_at(
                                            self._step_index), guess_mode=control.guess_mode,
                                        added_cond_kwargs=extra or None, return_dict=False)
        if pad:
            down = [torch.cat([torch.zeros_like(item), item]) for item in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class OmniPortraitSDControlNetPipeline(ControlNetSteps, SDTextEncoding, OmniPortraitMixin,
                                       StableDiffusionControlNetPipeline):
    """:class:`diffusers.StableDiffusionControlNetPipeline` plus the Pivot ID Encoder and Reference-Based Guidance."""

    _optional_components = [*StableDiffusionControlNetPipeline._optional_components, "pivot_encoder"]

    def __init__(
        self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers, safety_checker: Any = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None, requires_safety_checker: bool = False,
        pivot_encoder: PivotIDEncoder | None = None,
    ):
        super().__init__(vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker,
                         feature_extractor, image_encoder, requires_safety_checker)
        self.register_modules(pivot_encoder=pivot_encoder)

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] = None, image=None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = 50, timesteps: list[int] = None, sigmas: list[float] = None,
        guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1, eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None, callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default)
        *, identities: list[Identity] | None = None, rb_guidance: RBGuidanceConfig | None = None,
    ):
        """diffusers' :meth:`StableDiffusionControlNetPipeline.__call__`, plus ``identities`` and ``rb_guidance``."""
        return self.generate(GenerationCall.from_arguments(locals()))


class OmniPortraitSDXLControlNetPipeline(ControlNetSteps, SDXLTextEncoding, OmniPortraitMixin,
                                         StableDiffusionXLControlNetPipeline):
    """:class:`diffusers.StableDiffusionXLControlNetPipeline` plus the Pivot ID Encoder and Reference-Based
    Guidance."""

    _optional_components = [*StableDiffusionXLControlNetPipeline._optional_components, "pivot_encoder"]

    def __init__(
        self, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, unet: UNet2DConditionModel,
        controlnet: ControlNetModel | list[ControlNetModel] | MultiControlNetModel,
        scheduler: KarrasDiffusionSchedulers, force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False, feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None, pivot_encoder: PivotIDEncoder | None = None,
    ):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
                         force_zeros_for_empty_prompt, add_watermarker, feature_extractor, image_encoder)
        self.register_modules(pivot_encoder=pivot_encoder)

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] = None, prompt_2: str | list[str] | None = None, image=None,
        height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
        timesteps: list[int] = None, sigmas: list[float] = None, denoising_end: float | None = None,
        guidance_scale: float = 5.0, negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None, num_images_per_prompt: int | None = 1, eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None, negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] = None, crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] = None, negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default)
        *, identities: list[Identity] | None = None, rb_guidance: RBGuidanceConfig | None = None,
    ):
        """diffusers' :meth:`StableDiffusionXLControlNetPipeline.__call__`, plus ``identities`` and
        ``rb_guidance``."""
        return self.generate(GenerationCall.from_arguments(locals()))
