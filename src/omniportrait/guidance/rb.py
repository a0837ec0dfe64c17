"""Reference-Based Guidance for one generation (paper §3.3, §4.6, eqs. 6-11).

:class:`ReferenceGuidance` holds what one call needs: each identity's reference features and mask, the attention
store that yields the generated masks, and the two kinds of step (:meth:`~ReferenceGuidance.plain_noise`,
:meth:`~ReferenceGuidance.noise_and_gradient`) whose noise replaces plain CFG:
``ε̂ = ε_cfg + Σ_i M_gen,i ⊙ ∇_{z_t} E_i`` on the steps with ``t ≤ u·T``. How those steps run (CUDA graphs, the
fallbacks after running out of GPU memory) is :mod:`omniportrait.guidance.steps`'s business.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from omniportrait.attention import (
    AttentionStore,
    attention_layers,
    attention_modules,
    keeps_rows_apart,
    record_attention,
)
from omniportrait.guidance.calibration import CALIBRATION_FIELDS
from omniportrait.guidance.config import DEFAULT_DIFT_BLOCK, RBGuidanceConfig
from omniportrait.guidance.energy import Correspondence, background_masked, energy, match_features
from omniportrait.guidance.features import capture_features, features_only, noisy_reference_latents
from omniportrait.guidance.mask import regional_mask, resize_mask
from omniportrait.guidance.mask_source import MaskSource
from omniportrait.guidance.noise import guided_noise
from omniportrait.guidance.recompute import gelu_gates, gelu_gates_recomputed, weights_frozen
from omniportrait.guidance.steps import StepRunner, graphs_decided
from omniportrait.identity import BoundIdentity, locate_class_word

# Static loss scaling for the backward pass in fp16/bf16: E's gradient is small (~p/(1+S)² per point) and
# would underflow in half precision; the scale is divided out in fp32 afterwards.
HALF_PRECISION_GRAD_SCALE = 2.0**12
NON_FINITE_WARNING = "Reference-Based Guidance produced a non-finite gradient on {} step(s); guidance skipped there"


@dataclass
class ReferenceFeatures:
    """``D_ref`` ``(C, h, w)`` at ``t0`` and ``M_ref`` at the same size, for one identity."""

    features: torch.Tensor
    mask: torch.Tensor
    crop: object  # PIL image the features were taken from
    crop_mask: np.ndarray


@dataclass
class StepRecord:
    """What the last guided step saw (kept for ``--save-masks``), and counts over the generation.

    Non-finite gradients are counted on the gradient's device, in place (a replayed CUDA graph adds to the same
    counter), and read only when asked for, so sampling never waits for the GPU to finish a backward pass before
    it queues the next step.
    """

    gen_masks: torch.Tensor | None = None
    correspondences: list[list[Correspondence]] = field(default_factory=list)
    feature_size: tuple[int, int] | None = None
    gradient_steps: int = 0
    reused_steps: int = 0
    nonfinite: torch.Tensor | None = None
    energies: list[torch.Tensor] = field(default_factory=list)
    gradients: list[torch.Tensor] = field(default_factory=list)
    step_stats: torch.Tensor | None = None  # the last guided step's CALIBRATION_FIELDS per identity, written in place
    calibration: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (t, copy of step_stats) per step

    def write_step_stats(self, stats: torch.Tensor) -> None:
        """Keep this step's statistics in a tensor updated in place (a replayed CUDA graph writes the same one)."""
        if self.step_stats is None or self.step_stats.shape != stats.shape:
            self.step_stats = stats.clone()
        else:
            self.step_stats.copy_(stats)

    def count_nonfinite(self, finite: torch.Tensor) -> None:
        if self.nonfinite is None:
            self.nonfinite = torch.zeros((), dtype=torch.int32, device=finite.device)
        self.nonfinite.add_((~finite).int())

    def nonfinite_state(self) -> torch.Tensor | None:
        """A copy of the non-finite count, for :meth:`restore_nonfinite` (a step that failed after counting)."""
        return None if self.nonfinite is None else self.nonfinite.clone()

    def restore_nonfinite(self, state: torch.Tensor | None) -> None:
        if state is None:
            self.nonfinite = None
        else:
            self.nonfinite.copy_(state)

    def copied(self) -> "StepRecord":
        """This record with its own copies of the last step's tensors (a replayed CUDA graph's outputs live in the
        graph's memory pool, which is freed only once nothing refers to it)."""
        correspondences = [[replace(c, similarity=c.similarity.clone(), nearest=c.nearest.clone(),
                                    reference_mask=c.reference_mask.clone(), generated_mask=c.generated_mask.clone())
                            for c in per_image]
                           for per_image in self.correspondences]
        return replace(self, gen_masks=None if self.gen_masks is None else self.gen_masks.clone(),
                       step_stats=None if self.step_stats is None else self.step_stats.clone(),
                       correspondences=correspondences, energies=[e.clone() for e in self.energies],
                       gradients=[g.clone() for g in self.gradients])

    @property
    def skipped_steps(self) -> int:
        """Steps whose gradient was not finite and was dropped."""
        return 0 if self.nonfinite is None else int(self.nonfinite)

    @property
    def guided_steps(self) -> int:
        """Steps that added a freshly computed gradient."""
        return self.gradient_steps - self.skipped_steps


def dift_block_for(pipe, config: RBGuidanceConfig) -> int:
    if config.dift_block is not None:
        return config.dift_block
    return DEFAULT_DIFT_BLOCK["sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"]


class ReferenceGuidance:
    """State and steps of RB-Guidance for one call of an OmniPortrait pipeline."""

    def __init__(self, pipe, config: RBGuidanceConfig, bound: list[BoundIdentity], height: int, width: int,
                 num_images: int, cond=None):
        """``cond``: the call's conditioning, whose extra inputs (IP-Adapter embeds, LoRA scale) the reference pass
        takes too."""
        self.pipe, self.bound, self.call_cond = pipe, bound, cond
        self.steps = StepRunner(self)
        self.config = graphs_decided(config, pipe, self.steps.graph_backend, cond)
        self.block = dift_block_for(pipe, self.config)
        self.latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        self.cfg_rows = slice(num_images, 2 * num_images)  # the conditional rows of a batched CFG pass
        self.references = [self.reference_features(item, min(height, width)) for item in bound]
        self.store = AttentionStore([item.positions for item in bound],
                                    attention_layers(pipe.unet, self.config.attention_divisor, "attn2"),
                                    attention_layers(pipe.unet, self.config.attention_divisor, "attn1"),
                                    self.latent_size)
        self.gelu_gates = gelu_gates(pipe.unet)
        self.attention_modules = attention_modules(pipe.unet)
        self.record = StepRecord()
        self.mask_source = MaskSource(self)
        self.active_steps = 0
        self.last_gradient: torch.Tensor | None = None
        self._schedule: list[float] | None = None

    @property
    def fell_back(self) -> dict:
        """Config fields changed after running out of GPU memory, as changed."""
        return self.steps.fell_back

    @torch.no_grad()
    def reference_features(self, item: BoundIdentity, size: int) -> ReferenceFeatures:
        """DIFT features of the aligned reference face at ``t0``, averaged over ``K`` seeded noises."""
        pipe, config = self.pipe, self.config
        aligned = item.reference.aligned(size)
        latents = pipe.encode_image_latents(pipe.image_processor.preprocess(aligned.image))
        noisy = noisy_reference_latents(latents, config.ref_timestep, config.dift_ensemble, config.ref_seed,
                                        pipe.scheduler.alphas_cumprod).to(pipe.unet.dtype)
        prompt = config.ref_prompt.format(word=item.identity.class_word)
        ref_item = replace(item, positions=locate_class_word(pipe.tokenizer, prompt, item.identity.class_word))
        cond = pipe.encode_text(prompt, None, config.dift_ensemble, False, size, size, [ref_item])
        if self.call_cond is not None:
            cond = self.call_cond.for_reference(cond)
        timestep = torch.tensor(config.ref_timestep, device=pipe._execution_device)
        features = features_only(pipe.unet, self.block, noisy, timestep, **cond.unet_kwargs()).float().mean(0)
        mask = torch.from_numpy(aligned.mask.astype(np.float32))[None, None]
        mask = F.interpolate(mask, size=features.shape[-2:], mode="area")[0, 0] > 0.5
        return ReferenceFeatures(features, mask.to(features.device), aligned.image, aligned.mask)

    # ----- the denoising loop -------------------------------------------------------------------------------
    def noise(self, latents, t, step_index: int, cond, guidance_scale: float) -> torch.Tensor:
        """Eq. 11: plain CFG above ``t̂`` (attention still recorded for the mask), guided CFG below. Below ``t̂`` the
        gradient is recomputed on every ``gradient_interval``-th step and reused in between. The mask source sees
        each step's noise (``detect`` decodes the ``x̂0`` it predicts, :mod:`.mask_source`)."""
        timestep = self.host_timestep(t, step_index)
        noise = self.step_noise(latents, t, timestep, cond, guidance_scale)
        self.mask_source.remember(latents, timestep, noise)
        return noise

    def step_noise(self, latents, t, timestep: float, cond, guidance_scale: float) -> torch.Tensor:
        """:meth:`noise` at ``t`` (``timestep``: ``t`` on the host); detected masks are updated before a guided step
        that computes a gradient, outside it (a captured step runs no host code)."""
        if not self.config.active_at(timestep, self.pipe.scheduler.config.num_train_timesteps):
            return self.steps.plain(latents, t, cond, guidance_scale)
        self.active_steps += 1
        if (self.active_steps - 1) % self.config.gradient_interval:
            self.record.reused_steps += 1
            return guided_noise(self.steps.plain(latents, t, cond, guidance_scale), self.last_gradient)
        self.mask_source.before_gradient(latents, t, timestep, cond, guidance_scale)
        noise, self.last_gradient = self.noise_and_gradient(latents, t, cond, guidance_scale)
        self.record.calibration.append((timestep, self.record.step_stats.clone()))
        return guided_noise(noise, self.last_gradient)

    def host_timestep(self, t, step_index: int) -> float:
        """``t`` as a number without waiting for the GPU: a CUDA timestep is read from a host copy of the schedule."""
        if not torch.is_tensor(t) or t.device.type == "cpu":
            return float(t)
        if self._schedule is None:
            self._schedule = self.pipe.scheduler.timesteps.tolist()
        return self._schedule[step_index]

    @contextmanager
    def sampling(self):
        """For the denoising loop: the UNet's weights frozen (a weight that requires grad makes autograd keep its
        layer's input for a weight gradient the guidance never takes)."""
        with weights_frozen(self.pipe.unet):
            yield

    def finish(self) -> None:
        """End of sampling: drop the last step's attention (it would stay alive through the decode) and the captured
        steps, and warn once if any gradient was not finite."""
        self.store.clear()
        if self.steps.finish():
            self.record, self.last_gradient = self.record.copied(), None
        skipped = self.record.skipped_steps
        if skipped:
            warnings.warn(NON_FINITE_WARNING.format(skipped), stacklevel=3)

    def step_state(self) -> tuple:
        """What a step changes in place (running-mean attention, non-finite count), for :meth:`restore_step_state`."""
        return self.store.running_mean_state(), self.record.nonfinite_state()

    def restore_step_state(self, state: tuple) -> None:
        self.store.restore_running_mean(state[0])
        self.record.restore_nonfinite(state[1])

    def conditional_rows(self, cond) -> slice | None:
        """The rows of a UNet batch the guidance reads: the conditional half under CFG, else every row."""
        return self.cfg_rows if cond.do_cfg else None

    # ----- the two kinds of step (each may be captured as a CUDA graph: tensors change in place only) ------------
    def plain_noise(self, latents, t, cond, guidance_scale: float) -> torch.Tensor:
        """CFG noise without a gradient, recording the cross-attention for the running-mean mask."""
        self.store.clear()
        self.store.rows = self.conditional_rows(cond)
        with torch.no_grad(), record_attention(self.pipe.unet, self.store, self_attention=False):
            noise = self.pipe.cfg_noise(latents, t, cond, guidance_scale)
        self.store.accumulate()
        return noise

    def noise_and_gradient(self, latents, t, cond, guidance_scale: float, masks: torch.Tensor | None = None):
        """``(ε_cfg, Σ_i M_gen,i ⊙ ∇E_i)`` at ``z_t``, by :meth:`guided_step` as the step runner runs it (counted)."""
        self.record.gradient_steps += 1
        return self.steps.guided(latents, t, cond, guidance_scale, masks)

    def guided_step(self, latents, t, cond, guidance_scale: float, masks: torch.Tensor | None = None):
        """One guided step: ``(ε_cfg, Σ_i M_gen,i ⊙ ∇E_i)`` at ``z_t``; ``masks`` fixes ``M_gen`` instead of computing
        it (eq. 6)."""
        self.store.clear()
        self.store.rows = self.conditional_rows(cond)
        latents = latents.detach().requires_grad_(True)
        passes = {"cfg": self.cfg_pass, "split": self.split_pass, "separate": self.separate_pass}
        with torch.enable_grad(), gelu_gates_recomputed(self.gelu_gates, self.config.recompute, self.gate_rows(cond)):
            noise, features = passes[self.config.feature_pass](latents, t, cond, guidance_scale)
            masks = self.generated_masks() if masks is None else masks
            gradient = self.energy_gradient(latents, features, masks)
        self.record_step_stats(noise.detach())
        return noise.detach(), gradient

    def gate_rows(self, cond) -> slice | None:
        """The rows the feed-forward gates keep for the backward (:mod:`.recompute`): a batched CFG pass's conditional
        rows, where every attention layer keeps rows apart, so that the others get a zero gradient; else every row."""
        if self.config.feature_pass != "cfg" or not cond.do_cfg:
            return None
        if not all(keeps_rows_apart(module.processor) for module in self.attention_modules):
            return None
        return self.cfg_rows

    def cfg_pass(self, latents, t, cond, guidance_scale: float):
        """The batched CFG pass with grad up to the DIFT block; features from its conditional rows."""
        with record_attention(self.pipe.unet, self.store), \
                capture_features(self.pipe.unet, self.block, self.conditional_rows(cond), grad_after=False) as captured:
            noise = self.pipe.cfg_noise(latents, t, cond, guidance_scale)
        return noise, captured[0]

    def split_pass(self, latents, t, cond, guidance_scale: float):
        """CFG as two passes: unconditional without grad, conditional with grad up to the DIFT block. The noise and
        gradient of :meth:`cfg_pass`, but autograd keeps and differentiates the conditional rows only."""
        if not cond.do_cfg:
            return self.cfg_pass(latents, t, cond, guidance_scale)
        with torch.no_grad():
            uncond = self.pipe.unet_noise(latents, t, cond.unconditional())
        self.store.rows = None
        try:
            with record_attention(self.pipe.unet, self.store), \
                    capture_features(self.pipe.unet, self.block, grad_after=False) as captured:
                text = self.pipe.unet_noise(latents, t, cond.conditional())
        finally:
            self.store.rows = self.cfg_rows
        return self.pipe.combine_noise(uncond, text, guidance_scale), captured[0]

    def separate_pass(self, latents, t, cond, guidance_scale: float):
        """Memory-lean mode: the CFG pass without grad, then a conditional pass stopped after the DIFT block."""
        with torch.no_grad(), record_attention(self.pipe.unet, self.store):
            noise = self.pipe.cfg_noise(latents, t, cond, guidance_scale)
        conditional = cond.conditional()
        model_input = self.pipe.scheduler.scale_model_input(latents, t)
        inputs = self.pipe.unet_inputs(latents, model_input, t, conditional)
        return noise, features_only(self.pipe.unet, self.block, model_input, t, **inputs)

    @torch.no_grad()
    def generated_masks(self) -> torch.Tensor:
        """``M_gen`` per identity ``(B, n, h, w)``: the detected face masks where the ``detect`` source found faces (a
        fixed buffer, updated in place between steps: DESIGN §2 "Mask source"), else from the running-mean
        cross-attention and this step's q/k (eq. 6)."""
        if self.mask_source.masks is not None:
            return self.mask_source.masks
        mean_maps = self.store.accumulate()
        c = self.config
        return regional_mask(mean_maps, self.store.self_qk, c.mask_iterations, c.mask_power, c.mask_threshold)

    def record_step_stats(self, noise: torch.Tensor) -> None:
        """Per identity, :data:`CALIBRATION_FIELDS` of this step: ``S/|M_ref|`` (the mean match score in [0, 1]),
        ``|M_gen|`` and ``|M_ref|`` (points of the feature map, ``|M_gen|`` averaged over the images), and
        ``‖M_gen ⊙ ∇E‖ / ‖ε_cfg‖``, how far the guidance moves the noise relative to the noise itself."""
        noise_norm = noise.float().norm().clamp_min(1e-12)
        rows = []
        for correspondences, gradient, reference in zip(self.record.correspondences, self.record.gradients,
                                                        self.references):
            ref_points = reference.mask.sum().float()
            means = [c.similarity / ref_points.clamp_min(1) if self.config.reduction == "sum" else c.similarity
                     for c in correspondences]
            gen_points = torch.stack([c.generated_points for c in correspondences]).float().mean()
            rows.append(torch.stack([torch.stack(means).mean().detach().float(), gen_points, ref_points,
                                     gradient.norm() / noise_norm]))
        self.record.write_step_stats(torch.stack(rows))

    def calibration(self) -> list[dict]:
        """The statistics of every guided step that computed a gradient (:meth:`record_step_stats`), as numbers."""
        steps = []
        for timestep, stats in self.record.calibration:
            identities = [dict(zip(CALIBRATION_FIELDS, (float(f"{value:.6g}") for value in row)))
                          for row in stats.tolist()]
            steps.append({"timestep": timestep, "identities": identities})
        return steps

    def energy_strength(self, reference: ReferenceFeatures) -> torch.Tensor | float:
        """``p`` of eq. 10, or with ``strength_per_point`` ``p·|M_ref|`` (a deviation from the paper: the same ``p``
        then pulls alike at every feature-map size, see :class:`RBGuidanceConfig`)."""
        if not self.config.strength_per_point:
            return self.config.strength
        return self.config.strength * reference.mask.sum().float()

    def energy_gradient(self, latents, features, masks) -> torch.Tensor:
        """``Σ_i M_gen,i ⊙ ∇_{z_t} E_i`` (eqs. 7-10); zero if not finite (counted, see :meth:`finish`)."""
        feature_masks = resize_mask(masks, tuple(features.shape[-2:]))
        latent_masks = resize_mask(masks, tuple(latents.shape[-2:]))
        scale = HALF_PRECISION_GRAD_SCALE if latents.dtype in (torch.float16, torch.bfloat16) else 1.0
        total = torch.zeros_like(latents, dtype=torch.float32)
        correspondences, energies, gradients = [], [], []
        for index, reference in enumerate(self.references):
            per_image = [match_features(features[b], feature_masks[b, index], reference.features, reference.mask,
                                        self.config.reduction) for b in range(features.shape[0])]
            strength = self.energy_strength(reference)
            identity_energy = sum(energy(c.similarity, strength) for c in per_image)
            last = index == len(self.references) - 1
            gradient, = torch.autograd.grad(identity_energy * scale, latents, retain_graph=not last)
            gradient = gradient.float() / scale
            if self.config.background_masking:
                gradient = background_masked(gradient, latent_masks[:, index : index + 1])
            total = total + gradient
            gradients.append(gradient.detach())
            correspondences.append(per_image)
            energies.append(identity_energy.detach())
        self.record.gen_masks, self.record.correspondences = masks.detach(), correspondences
        self.record.feature_size = tuple(features.shape[-2:])
        self.record.energies, self.record.gradients = energies, gradients
        finite = torch.isfinite(total).all()
        self.record.count_nonfinite(finite)
        return torch.where(finite, total, torch.zeros_like(total)).detach()
