"""Shared lifecycle of the SD1.5 and SDXL OmniPortrait pipelines.

``check_inputs -> bind identities -> encode prompt (+ e_mix) -> prepare latents -> denoise -> decode``,
following diffusers' pipelines. The architecture-specific parts (text encoding, UNet extra conditioning,
VAE upcasting) are small methods the two subclasses provide; everything else lives here once.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import BaseOutput
from PIL import Image

from omniportrait.errors import ClassWordError, ConfigError
from omniportrait.guidance.config import RBGuidanceConfig
from omniportrait.guidance.noise import classifier_free
from omniportrait.identity import BoundIdentity, Identity, check_disjoint, inject_identities, locate_class_word
from omniportrait.models.banded_decode import DEFAULT_BAND_MIB, decode_in_bands, supports_bands
from omniportrait.models.offload import input_device, run_offload_hook
from omniportrait.pipelines.conditioning import Conditioning, GenerationCall

if TYPE_CHECKING:
    from omniportrait.guidance.rb import ReferenceGuidance

IP_ADAPTER_FACE_SIZE = 224  # the aligned face crop an IP-Adapter takes as its image (CLIP's input size)
NO_PIVOT_WARNING = (
    "no pivot encoder loaded: the prompt runs text-only and identity will be weak; use a public pivot: on SDXL "
    "PhotoMaker v1 (--pivot-encoder photomaker-v1.bin, or a folder made by omniportrait convert photomaker), on SD1.5 "
    "or SDXL an IP-Adapter face model (--ip-adapter h94/IP-Adapter/models/ip-adapter-plus-face_sd15.safetensors; "
    "pipe.load_ip_adapter); or train one (omniportrait train). README, Real use"
)


@dataclass
class OmniPortraitOutput(BaseOutput):
    """diffusers' pipeline output plus ours: the identities as bound for this call, the guidance state (``None`` when
    it was off; its ``config`` is what ran), whether the images were decoded in bands, and whether that was because a
    whole decode ran out of GPU memory. ``nsfw_content_detected`` is always ``None``: no safety checker runs."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    identities: list[BoundIdentity] = field(default_factory=list)
    guidance: ReferenceGuidance | None = None
    decoded_in_bands: bool = False
    decode_ran_out_of_memory: bool = False

    def calibration(self) -> list[dict]:
        """Per guided step, what the guidance did (:mod:`omniportrait.guidance.calibration`); empty when it was off."""
        return self.guidance.calibration() if self.guidance is not None else []

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
    """Sampling loop and identity handling shared by the SD1.5 and SDXL pipelines and their ControlNet variants.

    Each concrete class keeps its diffusers base's ``__call__`` signature and hands the arguments to
    :meth:`generate`; it provides ``encode_text(prompt, negative_prompt, num_images, do_cfg, height, width, bound,
    **text) -> Conditioning`` (text encoding, ``e_mix`` injection, extra UNet conditioning).
    """

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

    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_call(self, call: GenerationCall, height: int, width: int) -> None:
        """diffusers' own input checks for this pipeline, then ours."""
        values = {**vars(call), **call.text, **call.control, "height": height, "width": width, "callback_steps": None}
        names = inspect.signature(self.check_inputs).parameters
        self.check_inputs(**{name: values[name] for name in names if name in values})
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ConfigError(f"height and width must be positive multiples of {multiple}, got {width}x{height}")
        if call.timesteps is None and call.sigmas is None and call.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be at least 1, got {call.num_inference_steps}")
        if call.num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt must be at least 1, got {call.num_images_per_prompt}")
        prompts = call.prompts()
        if prompts is not None and not all(isinstance(text, str) and text.strip() for text in prompts):
            raise ConfigError("prompt must be a non-empty string or a list of them")
        if call.identities and prompts is None:
            raise ConfigError("identities need the prompt as text: the class word's token positions cannot be read "
                              "from prompt_embeds")

    def bind_identities(self, prompt: str | list[str], identities: list[Identity]) -> list[BoundIdentity]:
        """Locate each identity's class word, prepare its reference and encode ``e_ref``. With a list of prompts the
        word must stand at the same token positions in each (its ``e_mix`` replaces those positions in every row)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        bound = [BoundIdentity(identity, locate_class_word(self.tokenizer, prompts[0], identity.class_word,
                                                           identity.occurrence))
                 for identity in identities]
        for item in bound:
            for other in prompts[1:]:
                if locate_class_word(self.tokenizer, other, item.identity.class_word,
                                     item.identity.occurrence) != item.positions:
                    raise ClassWordError(f"class word {item.identity.class_word!r} stands at other token positions "
                                         f"in {other!r} than in {prompts[0]!r}; give identities one prompt at a time")
        check_disjoint(bound)
        if bound and self.pivot_encoder is None and not self.has_ip_adapter():
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

    def unet_inputs(self, latents: torch.Tensor, model_input: torch.Tensor, t, cond: Conditioning) -> dict:
        """The UNet's keyword arguments for ``model_input`` (the scaled, CFG-batched ``latents``): the conditioning's,
        plus a ControlNet's residuals where the pipeline has one (:meth:`control_residuals`)."""
        return {**cond.unet_kwargs(), **self.control_residuals(latents, model_input, t, cond)}

    def control_residuals(self, latents, model_input, t, cond: Conditioning) -> dict:
        """A ControlNet's residuals for the UNet; none here (the ControlNet pipelines provide them)."""
        return {}

    def unet_noise(self, latents: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """The UNet's noise prediction; rows ``[uncond, cond]`` when ``cond`` carries CFG."""
        model_input = torch.cat([latents] * 2) if cond.do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        return self.unet(model_input, t, **self.unet_inputs(latents, model_input, t, cond), return_dict=False)[0]

    def combine_noise(self, uncond: torch.Tensor, text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance (eq. 3), rescaled by ``guidance_rescale`` as diffusers does (Lin et al. 2023,
        §3.4)."""
        noise = classifier_free(uncond, text, guidance_scale)
        rescale = getattr(self, "_guidance_rescale", 0.0)
        return rescale_noise_cfg(noise, text, guidance_rescale=rescale) if rescale > 0 else noise

    def cfg_noise(self, latents: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guided noise of one batched UNet pass (or the plain prediction without CFG)."""
        noise = self.unet_noise(latents, t, cond)
        return self.combine_noise(*noise.chunk(2), guidance_scale) if cond.do_cfg else noise

    def predict_noise(self, latents, t, step_index: int, cond: Conditioning, guidance_scale: float):
        """The noise the scheduler steps with, without guidance (Reference-Based Guidance brings its own)."""
        with torch.no_grad():
            return self.cfg_noise(latents, t, cond, guidance_scale)

    def denoise(self, latents, timesteps, cond: Conditioning, call: GenerationCall, predict_noise=None):
        """diffusers' denoising loop: a noise prediction and a scheduler step per timestep, then the step callback
        (which may change the latents and the conditioning); an interrupt skips the remaining steps."""
        predict_noise = predict_noise or self.predict_noise
        extra_step_kwargs = self.prepare_extra_step_kwargs(call.generator, call.eta)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for step_index, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._step_index = step_index
                noise = predict_noise(latents, t, step_index, cond, call.guidance_scale)
                latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if call.callback_on_step_end is not None:
                    latents, cond = self.step_callback(call, step_index, t, latents, cond)
                progress.update()
        return latents

    def callback_tensors(self, latents, cond: Conditioning) -> dict:
        """What a step callback may read, by diffusers' names."""
        tensors = {"latents": latents, "prompt_embeds": cond.prompt_embeds}
        if cond.do_cfg:
            tensors["negative_prompt_embeds"] = cond.unconditional().prompt_embeds
        extra = cond.added_cond_kwargs or {}
        if "text_embeds" in extra:
            tensors.update(add_text_embeds=extra["text_embeds"], add_time_ids=extra["time_ids"])
            if cond.do_cfg:
                tensors.update(negative_pooled_prompt_embeds=extra["text_embeds"].chunk(2)[0],
                               negative_add_time_ids=extra["time_ids"].chunk(2)[0])
        if cond.control is not None:
            tensors["image"] = cond.control.image
        return tensors

    def step_callback(self, call: GenerationCall, step_index: int, t, latents, cond: Conditioning):
        """``callback_on_step_end(self, i, t, tensors)``: what it returns replaces the latents, the prompt embeddings
        and SDXL's added conditioning, as in diffusers."""
        available = self.callback_tensors(latents, cond)
        tensors = {name: available[name] for name in call.callback_on_step_end_tensor_inputs if name in available}
        returned = call.callback_on_step_end(self, step_index, t, tensors) or {}
        latents = returned.pop("latents", latents)
        if "prompt_embeds" in returned:
            cond = replace(cond, prompt_embeds=returned["prompt_embeds"])
        extra = dict(cond.added_cond_kwargs or {})
        for ours, theirs in (("text_embeds", "add_text_embeds"), ("time_ids", "add_time_ids")):
            if theirs in returned:
                extra[ours] = returned[theirs]
        return latents, replace(cond, added_cond_kwargs=extra or None)

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

    def default_call_size(self, call: GenerationCall) -> tuple[int, int]:
        """``(height, width)`` of the call: as given, else the UNet's default size."""
        return call.height or self.default_size(), call.width or self.default_size()

    @torch.no_grad()
    def generate(self, call: GenerationCall):
        """One generation: diffusers' lifecycle (check inputs, encode the prompt, prepare timesteps and latents,
        denoise, decode) with each identity's ``e_mix`` in the prompt and, by default whenever identities are given,
        Reference-Based Guidance on the steps below ``t̂`` (``rb_guidance=RBGuidanceConfig(enabled=False)`` turns it
        off)."""
        height, width = self.default_call_size(call)
        self.check_call(call, height, width)
        self._guidance_scale, self._guidance_rescale = call.guidance_scale, call.guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = call.clip_skip, call.cross_attention_kwargs
        self._denoising_end, self._interrupt = call.denoising_end, False
        device = self._execution_device
        bound = self.bind_identities(call.prompts(), list(call.identities or [])) if call.identities else []
        timesteps = self.call_timesteps(call, device)
        cond = self.conditioning(call, height, width, bound, len(timesteps))
        rows = call.batch_size() * call.num_images_per_prompt
        latents = self.prepare_latents(rows, self.unet.config.in_channels, height, width, cond.prompt_embeds.dtype,
                                       device, call.generator, call.latents)
        guidance = self.reference_guidance(call.rb_guidance, bound, height, width, rows, cond)
        with guidance.sampling() if guidance else nullcontext():
            latents = self.denoise(latents, timesteps, cond, call, guidance.noise if guidance else None)
        if guidance is not None:
            guidance.finish()
        images, in_bands, ran_out_of_memory = self.decode_images(latents, call.output_type, call.generator)
        self.maybe_free_model_hooks()
        output = OmniPortraitOutput(images=images, identities=bound, guidance=guidance, decoded_in_bands=in_bands,
                                    decode_ran_out_of_memory=ran_out_of_memory)
        return output if call.return_dict else self.output_tuple(output)

    def output_tuple(self, output: OmniPortraitOutput) -> tuple:
        """What diffusers' pipeline of this kind returns with ``return_dict=False``: ``(images, nsfw)``."""
        return output.images, output.nsfw_content_detected

    def conditioning(self, call: GenerationCall, height: int, width: int, bound, steps: int) -> Conditioning:
        """The UNet conditioning of the call: the prompt with ``e_mix``, IP-Adapter image embeds, the guidance-scale
        embedding of a UNet that takes one, the attention kwargs (LoRA scale), and a ControlNet's inputs."""
        lora_scale = (call.cross_attention_kwargs or {}).get("scale")
        cond = self.encode_text(call.prompt, call.negative_prompt, call.num_images_per_prompt, call.do_cfg, height,
                                width, bound, prompt_embeds=call.prompt_embeds,
                                negative_prompt_embeds=call.negative_prompt_embeds, lora_scale=lora_scale,
                                clip_skip=call.clip_skip, **call.text)
        rows = call.batch_size() * call.num_images_per_prompt
        extra = dict(cond.added_cond_kwargs or {})
        adapter_image = call.ip_adapter_image
        if adapter_image is None and call.ip_adapter_image_embeds is None and bound and self.has_ip_adapter():
            adapter_image = [[item.reference.aligned(IP_ADAPTER_FACE_SIZE).image for item in bound]]  # the pivot
        if adapter_image is not None or call.ip_adapter_image_embeds is not None:
            extra["image_embeds"] = self.prepare_ip_adapter_image_embeds(
                adapter_image, call.ip_adapter_image_embeds, self._execution_device, rows, call.do_cfg)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(call.guidance_scale - 1).repeat(rows)
            timestep_cond = self.get_guidance_scale_embedding(scale, embedding_dim=self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=self._execution_device, dtype=cond.prompt_embeds.dtype)
        return replace(cond, added_cond_kwargs=extra or None, timestep_cond=timestep_cond,
                       cross_attention_kwargs=call.cross_attention_kwargs,
                       control=self.prepare_control(call, height, width, rows, steps))

    def has_ip_adapter(self) -> bool:
        """Whether the UNet carries an IP-Adapter (``load_ip_adapter``): with identities and no adapter image of the
        call's own, each identity's aligned face crop is the adapter's image (the IP-Adapter as the pivot)."""
        return getattr(self.unet, "encoder_hid_proj", None) is not None

    def prepare_control(self, call: GenerationCall, height: int, width: int, rows: int, steps: int):
        """A ControlNet's inputs for the call; none here (the ControlNet pipelines provide them)."""
        return None

    def call_timesteps(self, call: GenerationCall, device) -> torch.Tensor:
        """The scheduler's timesteps for the call; with SDXL's ``denoising_end``, those before its cutoff."""
        timesteps, _ = retrieve_timesteps(self.scheduler, call.num_inference_steps, device, call.timesteps,
                                          call.sigmas)
        end = call.denoising_end
        if end is not None and isinstance(end, float) and 0 < end < 1:
            train_steps = self.scheduler.config.num_train_timesteps
            cutoff = int(round(train_steps - end * train_steps))
            timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        return timesteps

    def reference_guidance(self, config: RBGuidanceConfig | None, bound, height, width, num_images, cond=None):
        """The RB-Guidance state for this call, or ``None`` when it is off or there is no identity."""
        config = config or RBGuidanceConfig()
        if not bound or not config.enabled:
            return None
        from omniportrait.guidance.rb import ReferenceGuidance

        return ReferenceGuidance(self, config, bound, height, width, num_images, cond)
