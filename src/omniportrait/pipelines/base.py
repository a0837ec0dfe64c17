"""Shared lifecycle of the SD1.5 and SDXL OmniPortrait pipelines.

``check_inputs -> bind identities -> encode prompt (+ e_mix) -> prepare latents -> denoise -> decode``,
following diffusers' pipelines. The architecture-specific parts (text encoding, UNet extra conditioning,
VAE upcasting) are small methods the two subclasses provide; everything else lives here once.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from PIL import Image

from omniportrait.errors import ConfigError
from omniportrait.guidance.config import RBGuidanceConfig
from omniportrait.guidance.noise import classifier_free
from omniportrait.models.banded_decode import DEFAULT_BAND_MIB, decode_in_bands, supports_bands
from omniportrait.models.offload import input_device, run_offload_hook
from omniportrait.identity import (
    BoundIdentity,
    Identity,
    check_disjoint,
    inject_identities,
    locate_class_word,
)

if TYPE_CHECKING:
    from omniportrait.guidance.rb import ReferenceGuidance

NO_PIVOT_WARNING = (
    "no pivot encoder loaded: the prompt runs text-only and identity will be weak; "
    "pass pivot_encoder= (or --pivot-encoder) with trained weights"
)


@dataclass
class Conditioning:
    """UNet conditioning for one generation; tensors are ``cat([uncond, cond])`` when CFG is on."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict | None = None
    do_cfg: bool = True

    def conditional(self) -> "Conditioning":
        """The conditional half only (for passes that need no unconditional branch)."""
        return self.half(1) if self.do_cfg else self

    def unconditional(self) -> "Conditioning":
        """The unconditional half only; requires CFG."""
        return self.half(0)

    def half(self, index: int) -> "Conditioning":
        extra = {k: v.chunk(2)[index] for k, v in (self.added_cond_kwargs or {}).items()}
        return Conditioning(self.prompt_embeds.chunk(2)[index], extra or None, do_cfg=False)


@dataclass
class OmniPortraitOutput:
    """Images, the identities as bound for this call, the guidance state (``None`` when it was off; its ``config``
    is what ran), whether the images were decoded in bands, and whether that was because a whole decode ran out of
    GPU memory."""

    images: list[Image.Image] | torch.Tensor
    identities: list[BoundIdentity] = field(default_factory=list)
    guidance: ReferenceGuidance | None = None
    decoded_in_bands: bool = False
    decode_ran_out_of_memory: bool = False

    def memory_fallbacks(self) -> list[str]:
        """What this call went on with after running out of GPU memory, in words: "the split feature pass", "eager
        steps" (instead of CUDA graphs), "a banded decode"."""
        fell_back = self.guidance.fell_back if self.guidance is not None else {}
        words = [f"the {value} feature pass" if name == "feature_pass" else "eager steps" for name, value in
                 fell_back.items()]
        return words + ["a banded decode"] * self.decode_ran_out_of_memory


def _as_prepared_reference(identity: Identity):
    """The identity's reference as a prepared reference (face found, aligned crop available)."""
    reference = identity.reference
    if hasattr(reference, "aligned"):
        return reference
    from omniportrait.faces import prepare_reference

    return prepare_reference(reference, face_index=identity.face_index)


class OmniPortraitMixin:
    """Sampling loop and identity handling shared by :class:`OmniPortraitSDPipeline` and the SDXL one.

    Each architecture's class provides ``encode_text(prompt, negative_prompt, num_images, do_cfg, height,
    width, bound) -> Conditioning`` (text encoding, ``e_mix`` injection, extra UNet conditioning).
    """

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "pivot_encoder"]
    upcast_vae_in_fp16 = False
    banded_decode: bool | None = None  # set by enable_banded_decode / disable_banded_decode; None: decodes_in_bands
    decode_band_mib: float = DEFAULT_BAND_MIB

    def enable_banded_decode(self, band_mib: float = DEFAULT_BAND_MIB) -> None:
        """Decode latents in horizontal bands (:mod:`omniportrait.models.banded_decode`): the same image up to
        floating-point rounding, with a lower memory peak. Unlike diffusers' VAE tiling, nothing is blended: each
        layer sees the whole image. The default where the decode runs in fp32 on CUDA (:meth:`decodes_in_bands`)."""
        if not band_mib > 0:
            raise ConfigError(f"decode band size must be a positive number of MiB, got {band_mib}")
        self.banded_decode, self.decode_band_mib = True, band_mib

    def disable_banded_decode(self) -> None:
        """Decode with diffusers' whole decode (a decode that runs out of GPU memory is still done in bands)."""
        self.banded_decode = False

    def decodes_in_bands(self) -> bool:
        """Whether the decode runs in bands: as :meth:`enable_banded_decode` / :meth:`disable_banded_decode` set it,
        else where an fp16 pipeline's VAE decodes in fp32 on CUDA (SDXL's ``force_upcast``, as diffusers does). There
        the whole decode is a generation's memory peak, and the bands take about as long (``benchmarks/results/``)."""
        if self.banded_decode is not None:
            return self.banded_decode
        return self._execution_device.type == "cuda" and self.upcasts_vae()

    def upcasts_vae(self) -> bool:
        """Whether the VAE runs in fp32 for this pipeline's calls, where fp16 overflows (SDXL's ``force_upcast``)."""
        vae = self.vae
        return self.upcast_vae_in_fp16 and vae.dtype == torch.float16 and vae.config.force_upcast

    @classmethod
    def from_diffusers(cls, pipe, pivot_encoder=None):
        """Wrap a loaded diffusers SD/SDXL pipeline, sharing its components."""
        return cls(**pipe.components, pivot_encoder=pivot_encoder)

    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_call_inputs(self, prompt: str, height: int, width: int, steps: int, num_images: int) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("prompt must be a non-empty string")
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ConfigError(f"height and width must be positive multiples of {multiple}, got {width}x{height}")
        if steps < 1:
            raise ConfigError(f"num_inference_steps must be at least 1, got {steps}")
        if num_images < 1:
            raise ConfigError(f"num_images_per_prompt must be at least 1, got {num_images}")

    def bind_identities(self, prompt: str, identities: list[Identity]) -> list[BoundIdentity]:
        """Locate each identity's class word, prepare its reference and encode ``e_ref``."""
        bound = [
            BoundIdentity(identity, locate_class_word(self.tokenizer, prompt, identity.class_word, identity.occurrence))
            for identity in identities
        ]
        check_disjoint(bound)
        if bound and self.pivot_encoder is None:
            warnings.warn(NO_PIVOT_WARNING, stacklevel=3)
        for item in bound:
            item.reference = _as_prepared_reference(item.identity)
            if self.pivot_encoder is not None:
                crop = item.reference.aligned(self.pivot_encoder.image_size).image
                with torch.no_grad():
                    run_offload_hook(self.pivot_encoder)  # encode_image is not its forward
                    device = input_device(self.pivot_encoder, self._execution_device)
                    pixels = self.pivot_encoder.preprocess([crop], device)
                    item.e_ref = self.pivot_encoder.encode_image(pixels)
        return bound

    def mix_identities(self, prompt_embeds: torch.Tensor, bound: list[BoundIdentity]) -> torch.Tensor:
        usable = [item for item in bound if item.e_ref is not None]
        if not usable:
            return prompt_embeds
        with torch.no_grad():
            return inject_identities(prompt_embeds, usable, self.pivot_encoder)

    def unet_noise(self, latents: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """The UNet's noise prediction; rows ``[uncond, cond]`` when ``cond`` carries CFG."""
        model_input = torch.cat([latents] * 2) if cond.do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        return self.unet(
            model_input, t, encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs=cond.added_cond_kwargs, return_dict=False,
        )[0]

    def cfg_noise(self, latents: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guided noise of one batched UNet pass (or the plain prediction without CFG)."""
        noise = self.unet_noise(latents, t, cond)
        return classifier_free(*noise.chunk(2), guidance_scale) if cond.do_cfg else noise

    def predict_noise(self, latents, t, step_index: int, cond: Conditioning, guidance_scale: float):
        """The noise the scheduler steps with, without guidance (Reference-Based Guidance brings its own)."""
        with torch.no_grad():
            return self.cfg_noise(latents, t, cond, guidance_scale)

    def denoise(self, latents, timesteps, cond: Conditioning, guidance_scale: float, generator,
                predict_noise=None) -> torch.Tensor:
        predict_noise = predict_noise or self.predict_noise
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        with self.progress_bar(total=len(timesteps)) as progress:
            for step_index, t in enumerate(timesteps):
                noise = predict_noise(latents, t, step_index, cond, guidance_scale)
                latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
                progress.update()
        return latents

    @contextmanager
    def vae_in_working_precision(self):
        """Yield the VAE, in fp32 for the call where fp16 overflows (SDXL's ``force_upcast``), as diffusers does."""
        vae, upcast = self.vae, self.upcasts_vae()
        # torch's own Module.to: diffusers' override logs a float32-modules warning on every dtype cast
        if upcast:
            torch.nn.Module.to(vae, torch.float32)
        try:
            yield vae
        finally:
            if upcast:
                torch.nn.Module.to(vae, torch.float16)

    @torch.no_grad()
    def encode_image_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latent means (fp32) of ``pixels`` in [-1, 1], e.g. the reference of Reference-Based Guidance."""
        with self.vae_in_working_precision() as vae:
            latents = vae.encode(pixels.to(input_device(vae, self._execution_device), vae.dtype)).latent_dist.mean
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str, generator=None):
        return self.decode_images(latents, output_type, generator)[0]

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor, output_type: str, generator=None) -> tuple[object, bool, bool]:
        """The images, whether they were decoded in bands, and whether because a whole decode ran out of memory."""
        if output_type == "latent":
            return latents, False, False
        in_bands = self.decodes_in_bands() and supports_bands(self.vae)  # not, say, with VAE tiling on
        with self.vae_in_working_precision() as vae:
            latents = latents.to(vae.dtype) / vae.config.scaling_factor
            image, ran_out_of_memory = self.decode_or_fall_back(vae, latents, in_bands, generator)
        images = self.image_processor.postprocess(image, output_type=output_type)
        return images, in_bands or ran_out_of_memory, ran_out_of_memory

    def decode_or_fall_back(self, vae, latents: torch.Tensor, in_bands: bool, generator=None) -> tuple[torch.Tensor, bool]:
        """The banded decode, or diffusers' whole one; and whether the whole one ran out of GPU memory, in which case
        (SDXL's fp32 decode is where its plain generation peaks) it is done again in bands, with a warning: the same
        image up to rounding, instead of losing the sampled latents."""
        if in_bands:
            return decode_in_bands(vae, latents, self.decode_band_mib), False
        try:
            return vae.decode(latents, return_dict=False, generator=generator)[0], False
        except torch.OutOfMemoryError:
            pass  # retried below, once the error's traceback no longer holds the failed decode's tensors
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        warnings.warn(f"the VAE decode at {width}x{height} ran out of GPU memory; decoded in bands instead (the same "
                      "image up to rounding; --banded-decode or pipe.enable_banded_decode() starts that way)",
                      stacklevel=4)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return decode_in_bands(vae, latents, self.decode_band_mib), True

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        identities: list[Identity] | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        rb_guidance: RBGuidanceConfig | None = None,
    ) -> OmniPortraitOutput:
        """Draw ``prompt`` with each identity bound to its class word.

        Defaults are the paper's: DDIM (the pipeline's scheduler), 50 steps, CFG ``w = 7.5``, and
        Reference-Based Guidance with :class:`RBGuidanceConfig` defaults whenever identities are given
        (``rb_guidance=RBGuidanceConfig(enabled=False)`` turns it off).
        """
        height = height or self.default_size()
        width = width or self.default_size()
        self.check_call_inputs(prompt, height, width, num_inference_steps, num_images_per_prompt)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        bound = self.bind_identities(prompt, list(identities or []))
        cond = self.encode_text(prompt, negative_prompt, num_images_per_prompt, do_cfg, height, width, bound)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        latents = self.prepare_latents(
            num_images_per_prompt, self.unet.config.in_channels, height, width,
            cond.prompt_embeds.dtype, device, generator, latents,
        )
        guidance = self.reference_guidance(rb_guidance, bound, height, width, num_images_per_prompt)
        with guidance.sampling() if guidance else nullcontext():
            latents = self.denoise(latents, timesteps, cond, guidance_scale, generator,
                                   guidance.noise if guidance else None)
        if guidance is not None:
            guidance.finish()
        images, in_bands, ran_out_of_memory = self.decode_images(latents, output_type, generator)
        self.maybe_free_model_hooks()
        return OmniPortraitOutput(images=images, identities=bound, guidance=guidance, decoded_in_bands=in_bands,
                                  decode_ran_out_of_memory=ran_out_of_memory)

    def reference_guidance(self, config: RBGuidanceConfig | None, bound, height, width, num_images):
        """The RB-Guidance state for this call, or ``None`` when it is off or there is no identity."""
        config = config or RBGuidanceConfig()
        if not bound or not config.enabled:
            return None
        from omniportrait.guidance.rb import ReferenceGuidance

        return ReferenceGuidance(self, config, bound, height, width, num_images)
