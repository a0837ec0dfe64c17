"""What the UNet (and a ControlNet) are given at every step of one generation, and the call's arguments."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


def halve(value, index: int):
    """Half ``index`` of a CFG-batched tensor (or of each tensor of a list, as IP-Adapter's image embeds are)."""
    if isinstance(value, (list, tuple)):
        return [item.chunk(2)[index] for item in value]
    return value.chunk(2)[index]


@dataclass
class ControlInputs:
    """A ControlNet's conditioning for one generation, as diffusers' ControlNet pipelines prepare it.

    ``image``: the control image(s) (one per ControlNet of a multi-ControlNet), batched like the UNet input
    (doubled under CFG unless ``guess_mode``). ``scale``: ``controlnet_conditioning_scale``; ``start``/``end``: each
    ControlNet's ``control_guidance_start``/``end`` as fractions of the ``steps``.
    """

    image: torch.Tensor | list[torch.Tensor]
    scale: float | list[float]
    start: list[float]
    end: list[float]
    multi: bool = False
    guess_mode: bool = False
    steps: int = 1

    def scale_at(self, step: int) -> float | list[float]:
        """The conditioning scale at ``step``: zero for a ControlNet outside its start-end window."""
        keeps = [1.0 - float(step / self.steps < start or (step + 1) / self.steps > end)
                 for start, end in zip(self.start, self.end)]
        if self.multi:
            scales = self.scale if isinstance(self.scale, (list, tuple)) else [self.scale] * len(keeps)
            return [scale * keep for scale, keep in zip(scales, keeps)]
        scale = self.scale[0] if isinstance(self.scale, (list, tuple)) else self.scale
        return scale * keeps[0]

    def constant(self) -> bool:
        """Whether every step uses the same scale (a CUDA graph captured at one step holds for all)."""
        return all(self.scale_at(step) == self.scale_at(0) for step in range(self.steps))


@dataclass
class Conditioning:
    """UNet conditioning for one generation; tensors are ``cat([uncond, cond])`` when CFG is on.

    ``half`` names which half a conditioning derived from a CFG one is (``"uncond"``/``"cond"``), so that a
    ControlNet in guess mode leaves the unconditional half without residuals, as diffusers does.
    """

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict | None = None
    do_cfg: bool = True
    timestep_cond: torch.Tensor | None = None
    cross_attention_kwargs: dict | None = None
    control: ControlInputs | None = None
    half: str | None = None

    def conditional(self) -> Conditioning:
        """The conditional half only (for passes that need no unconditional branch)."""
        return self.halved(1) if self.do_cfg else self

    def unconditional(self) -> Conditioning:
        """The unconditional half only; requires CFG."""
        return self.halved(0)

    def halved(self, index: int) -> Conditioning:
        extra = {name: halve(value, index) for name, value in (self.added_cond_kwargs or {}).items()}
        control = self.control
        if control is not None and not control.guess_mode:
            image = [halve(item, index) for item in control.image] if isinstance(control.image, list) \
                else halve(control.image, index)
            control = replace(control, image=image)
        timestep_cond = self.timestep_cond
        if timestep_cond is not None and timestep_cond.shape[0] == self.prompt_embeds.shape[0]:
            timestep_cond = halve(timestep_cond, index)
        return replace(self, prompt_embeds=halve(self.prompt_embeds, index), added_cond_kwargs=extra or None,
                       do_cfg=False, timestep_cond=timestep_cond, control=control, half=("uncond", "cond")[index])

    def unet_kwargs(self) -> dict:
        """The UNet's keyword arguments besides the sample and timestep."""
        return dict(encoder_hidden_states=self.prompt_embeds, added_cond_kwargs=self.added_cond_kwargs,
                    timestep_cond=self.timestep_cond, cross_attention_kwargs=self.cross_attention_kwargs)

    def for_reference(self, text: Conditioning) -> Conditioning:
        """The reference pass's conditioning: ``text`` (the reference prompt's) with this call's extra inputs that the
        UNet needs whatever the prompt (IP-Adapter image embeds, LoRA scale), taken from the conditional half, first
        row; no control."""
        rows = text.prompt_embeds.shape[0]
        own = self.conditional()
        extra = dict(text.added_cond_kwargs or {})
        if own.added_cond_kwargs and "image_embeds" in own.added_cond_kwargs:
            extra["image_embeds"] = [embeds[:1].expand(rows, *embeds.shape[1:])
                                     for embeds in own.added_cond_kwargs["image_embeds"]]
        return replace(text, added_cond_kwargs=extra or None, cross_attention_kwargs=self.cross_attention_kwargs)


@dataclass
class GenerationCall:
    """One call's arguments as diffusers' SD/SDXL (ControlNet) pipelines take them, plus ours (``identities``,
    ``rb_guidance``). ``text`` holds the architecture's own text-encoding arguments (SDXL's second prompts, pooled
    embeddings and size conditioning), ``control`` the ControlNet arguments."""

    prompt: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    denoising_end: float | None = None
    guidance_scale: float = 7.5
    negative_prompt: str | list[str] | None = None
    num_images_per_prompt: int = 1
    eta: float = 0.0
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    ip_adapter_image: object = None
    ip_adapter_image_embeds: list[torch.Tensor] | None = None
    output_type: str = "pil"
    return_dict: bool = True
    cross_attention_kwargs: dict | None = None
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    callback_on_step_end: object = None
    callback_on_step_end_tensor_inputs: list[str] = field(default_factory=lambda: ["latents"])
    identities: list | None = None
    rb_guidance: object = None
    text: dict = field(default_factory=dict)
    control: dict = field(default_factory=dict)

    TEXT_ARGUMENTS = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                      "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size")
    CONTROL_ARGUMENTS = ("image", "controlnet_conditioning_scale", "guess_mode", "control_guidance_start",
                         "control_guidance_end")

    @classmethod
    def from_arguments(cls, arguments: dict) -> GenerationCall:
        """The call from a ``__call__``'s ``locals()``."""
        arguments = dict(arguments)
        arguments.pop("self", None)
        text = {name: arguments.pop(name) for name in cls.TEXT_ARGUMENTS if name in arguments}
        control = {name: arguments.pop(name) for name in cls.CONTROL_ARGUMENTS if name in arguments}
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in arguments.items() if name in known}, text=text, control=control)

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs when the scale is above 1, as in diffusers."""
        return self.guidance_scale > 1.0

    def prompts(self) -> list[str] | None:
        if self.prompt is None:
            return None
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def batch_size(self) -> int:
        prompts = self.prompts()
        return len(prompts) if prompts is not None else self.prompt_embeds.shape[0]
