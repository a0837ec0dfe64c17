"""Reference-Based Guidance for one generation (paper §3.3, §4.6, eqs. 6-11).

:class:`ReferenceGuidance` holds what one call needs: each identity's reference features and mask, the
attention store that yields the generated masks, and the step function that replaces plain CFG:
``ε̂ = ε_cfg + Σ_i M_gen,i ⊙ ∇_{z_t} E_i`` on the steps with ``t ≤ u·T``.
"""

from __future__ import annotations

import copy
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
from omniportrait.errors import ConfigError
from omniportrait.guidance.config import DEFAULT_DIFT_BLOCK, RBGuidanceConfig
from omniportrait.guidance.energy import Correspondence, energy, match_features
from omniportrait.guidance.features import capture_features, features_only, noisy_reference_latents
from omniportrait.guidance.graph import CudaGraphs, GraphedStep, replays_without_input_scaling
from omniportrait.guidance.mask import regional_mask, resize_mask
from omniportrait.guidance.recompute import gelu_gates, gelu_gates_recomputed, weights_frozen
from omniportrait.models.offload import has_hooks
from omniportrait.pipelines.base import classifier_free
from omniportrait.pipelines.identity import BoundIdentity, locate_class_word

# Static loss scaling for the backward pass in fp16/bf16: E's gradient is small (~p/(1+S)² per point) and
# would underflow in half precision; the scale is divided out in fp32 afterwards.
HALF_PRECISION_GRAD_SCALE = 2.0**12
NON_FINITE_WARNING = "Reference-Based Guidance produced a non-finite gradient on {} step(s); guidance skipped there"
SPLIT_AFTER_OUT_OF_MEMORY = ("a guided step with the batched cfg feature pass ran out of GPU memory; it and the later "
                             "steps use the split pass (--rb-feature-pass split: the same noise and gradient, a lower "
                             "peak, slower)")
EAGER_AFTER_OUT_OF_MEMORY = ("capturing a sampling step as a CUDA graph ran out of GPU memory; it and the later steps "
                             "run eagerly (--no-rb-cuda-graph: the same images, more host time)")


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
                                    reference_mask=c.reference_mask.clone()) for c in per_image]
                           for per_image in self.correspondences]
        return replace(self, gen_masks=None if self.gen_masks is None else self.gen_masks.clone(),
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
    """State and step function of RB-Guidance for one call of an OmniPortrait pipeline."""

    graph_backend = CudaGraphs  # how ``cuda_graph`` steps are captured (see omniportrait.guidance.graph)

    def __init__(self, pipe, config: RBGuidanceConfig, bound: list[BoundIdentity], height: int, width: int,
                 num_images: int):
        self.pipe, self.bound = pipe, bound
        self.config = config = self.graphs_decided(config)
        self.block = dift_block_for(pipe, config)
        self.latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        self.num_images = num_images
        self.cfg_rows = slice(num_images, 2 * num_images)  # the conditional rows of a batched CFG pass
        self.references = [self.reference_features(item, min(height, width)) for item in bound]
        self.store = self.attention_store(rows=self.cfg_rows)
        self.gelu_gates = gelu_gates(pipe.unet)
        self.attention_modules = attention_modules(pipe.unet)
        self.record = StepRecord()
        self.active_steps = 0
        self.last_gradient: torch.Tensor | None = None
        self._schedule: list[float] | None = None
        self._graphs: dict[str, GraphedStep] = {}  # "plain" / "guided" steps captured as CUDA graphs
        self._graph_inputs: tuple | None = None  # the conditioning and scale they were captured with
        self.fell_back: dict = {}  # config fields changed after running out of GPU memory, as changed

    # ----- setup ------------------------------------------------------------------------------------------
    def graphs_decided(self, config: RBGuidanceConfig) -> RBGuidanceConfig:
        """``config`` with ``cuda_graph`` decided before anything runs: where left to us (None), on when the steps
        can be captured (:meth:`graph_problem`); where asked for, a clear error when they cannot."""
        if config.cuda_graph is False:
            return config
        problem = self.graph_problem()
        if config.cuda_graph and problem:
            raise ConfigError(problem)
        return replace(config, cuda_graph=problem is None)

    def graph_problem(self) -> str | None:
        """Why this pipeline's steps cannot be captured, or None: they need a CUDA device, a scheduler a replayed
        step can contain, and the UNet's weights in place (accelerate's offloading moves them during the call,
        diffusers' layerwise casting recasts them)."""
        unet = self.pipe.unet
        if has_hooks(unet):  # its weights may wait on the CPU or on meta, or be recast when called
            return ("CUDA graphs (--rb-cuda-graph) need the UNet's weights in place, without hooks that move or "
                    "recast them (CPU offloading, layerwise casting)")
        problem = self.graph_backend.problem(unet.device)
        if problem:
            return problem
        scheduler = copy.deepcopy(self.pipe.scheduler)  # probed on a copy: Euler's first call sets its step index
        probe = torch.zeros(1, device=scheduler.timesteps.device)
        if not replays_without_input_scaling(scheduler, probe, scheduler.timesteps[0]):
            return (f"CUDA graphs (--rb-cuda-graph) need a scheduler that does not scale the model input, such as "
                    f"DDIM (the default); {type(scheduler).__name__} does")
        return None

    def attention_store(self, rows: slice | None) -> AttentionStore:
        unet, divisor = self.pipe.unet, self.config.attention_divisor
        return AttentionStore([item.positions for item in self.bound], attention_layers(unet, divisor, "attn2"),
                              attention_layers(unet, divisor, "attn1"), self.latent_size, rows)

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
        timestep = torch.tensor(config.ref_timestep, device=pipe._execution_device)
        features = features_only(pipe.unet, self.block, noisy, timestep, cond.prompt_embeds,
                                 cond.added_cond_kwargs).float().mean(0)
        mask = torch.from_numpy(aligned.mask.astype(np.float32))[None, None]
        mask = F.interpolate(mask, size=features.shape[-2:], mode="area")[0, 0] > 0.5
        return ReferenceFeatures(features, mask.to(features.device), aligned.image, aligned.mask)

    # ----- per step -----------------------------------------------------------------------------------------
    def noise(self, latents, t, step_index: int, cond, guidance_scale: float) -> torch.Tensor:
        """Eq. 11: plain CFG above ``t̂`` (attention still recorded for the mask), guided CFG below.

        Below ``t̂`` the gradient is recomputed on every ``gradient_interval``-th step and reused in between.
        """
        self.store.clear()
        if not self.config.active_at(self.host_timestep(t, step_index), self.pipe.scheduler.config.num_train_timesteps):
            return self.plain_noise(latents, t, cond, guidance_scale)
        self.active_steps += 1
        if (self.active_steps - 1) % self.config.gradient_interval:
            self.record.reused_steps += 1
            return self.plain_noise(latents, t, cond, guidance_scale) + self.last_gradient.to(latents.dtype)
        return self.guided_noise(latents, t, cond, guidance_scale)

    def host_timestep(self, t, step_index: int) -> float:
        """``t`` as a number without waiting for the GPU: a CUDA timestep is read from a host copy of the schedule
        (taken once per generation)."""
        if not torch.is_tensor(t) or t.device.type == "cpu":
            return float(t)
        if self._schedule is None:
            self._schedule = self.pipe.scheduler.timesteps.tolist()
        return self._schedule[step_index]

    @contextmanager
    def sampling(self):
        """For the denoising loop: the UNet's weights frozen, as diffusers' ``from_pretrained`` does not leave them.

        The guidance differentiates the latents only, but a weight that requires grad makes autograd keep its
        layer's input for a weight gradient never taken: SDXL 1024², ``cfg``, 8.81 GiB kept instead of 6.38
        (``python -m benchmarks.count_guidance --weights-require-grad``). Once per call: freezing SDXL's 1,680
        weight tensors takes milliseconds."""
        with weights_frozen(self.pipe.unet):
            yield

    def finish(self) -> None:
        """End of sampling: drop the last step's attention (SDXL: ~0.3 GiB of q/k, which would otherwise stay
        alive through the VAE decode, the peak of a generation) and the captured steps with their memory, and warn
        once if any gradient was not finite (checked here, not at every step)."""
        self.store.clear()
        if "guided" in self._graphs:
            self.record, self.last_gradient = self.record.copied(), None
        self._graphs, self._graph_inputs = {}, None
        skipped = self.record.skipped_steps
        if skipped:
            warnings.warn(NON_FINITE_WARNING.format(skipped), stacklevel=3)

    def plain_noise(self, latents, t, cond, guidance_scale: float) -> torch.Tensor:
        """CFG noise without a gradient, recording the cross-attention for the running-mean mask.

        With ``cuda_graph`` this step is captured and replayed too: on the unguided steps before the first guided
        one, and on the steps that reuse a gradient (``gradient_interval``).
        """
        if not self.config.cuda_graph:
            return self.compute_plain_noise(latents, t, cond, guidance_scale)
        return self.replayed("plain", self.compute_plain_noise, self.compute_plain_noise, latents, t, cond,
                             guidance_scale)

    def compute_plain_noise(self, latents, t, cond, guidance_scale: float) -> torch.Tensor:
        """One unguided step (the self-attention is recorded only on the steps that build a mask); like
        :meth:`compute_noise_and_gradient`, it may be captured as a CUDA graph."""
        self.store.clear()
        with torch.no_grad(), record_attention(self.pipe.unet, self.store, self_attention=False):
            noise = self.pipe.cfg_noise(latents, t, cond, guidance_scale)
        self.store.accumulate()
        return noise

    def guided_noise(self, latents, t, cond, guidance_scale: float) -> torch.Tensor:
        noise, self.last_gradient = self.noise_and_gradient(latents, t, cond, guidance_scale)
        return noise + self.last_gradient.to(noise.dtype)

    def noise_and_gradient(self, latents, t, cond, guidance_scale: float, masks: torch.Tensor | None = None):
        """``(ε_cfg, Σ_i M_gen,i ⊙ ∇E_i)`` at ``z_t``; ``masks`` fixes ``M_gen`` instead of computing it.

        With ``cuda_graph`` the step is captured on its first call and replayed after (:mod:`.graph`).
        """
        self.record.gradient_steps += 1
        if not self.config.cuda_graph or masks is not None:
            return self.eager_noise_and_gradient(latents, t, cond, guidance_scale, masks)
        return self.replayed("guided", self.compute_noise_and_gradient, self.eager_noise_and_gradient, latents, t,
                             cond, guidance_scale)

    def eager_noise_and_gradient(self, latents, t, cond, guidance_scale: float, masks=None):
        """One guided step, not captured. A batched ``cfg`` step that runs out of GPU memory is taken again with the
        ``split`` pass, and so are the later steps, with a warning: the same noise and gradient at a lower peak
        (SDXL 1024²: 9.39 instead of 11.27 GiB, counted), instead of losing the generation."""
        def step():
            return self.compute_noise_and_gradient(latents, t, cond, guidance_scale, masks)

        if self.config.feature_pass != "cfg" or not cond.do_cfg:
            return step()
        return self.out_of_memory_fallback(step, step, SPLIT_AFTER_OUT_OF_MEMORY, feature_pass="split")

    def replayed(self, kind: str, compute, eager, latents, t, cond, guidance_scale: float):
        """``compute``'s step as the ``kind`` CUDA graph (:meth:`graphed`). A replay allocates nothing; if the first
        call (the eager warm-up, then the capture) runs out of GPU memory, a guided ``cfg`` step is captured with
        the ``split`` pass instead (SDXL 1024² on the H100: 9.87 instead of 11.73 GiB, as fast), and any other
        step and the later ones run ``eager`` (which may fall back further), each with a warning. A step whose
        capture failed otherwise runs ``eager`` too."""
        step = self.graphed(kind, compute, cond, guidance_scale)

        def replay():
            return step(latents, self.as_tensor(t, latents))

        def captured_again():
            del self._graphs[kind]  # its warm-up or capture failed: nothing captured, nothing held
            return self.replayed(kind, compute, eager, latents, t, cond, guidance_scale)

        if step.eager:
            return eager(latents, t, cond, guidance_scale)
        if step.replay is not None:
            return replay()
        if kind == "guided" and self.config.feature_pass == "cfg" and cond.do_cfg:
            return self.out_of_memory_fallback(replay, captured_again, SPLIT_AFTER_OUT_OF_MEMORY, feature_pass="split")
        return self.out_of_memory_fallback(replay, lambda: eager(latents, t, cond, guidance_scale),
                                           EAGER_AFTER_OUT_OF_MEMORY, cuda_graph=False)

    def out_of_memory_fallback(self, step, fallback, warning: str, **changes):
        """``step()``; if it runs out of GPU memory: the running-mean attention and the non-finite count as before
        it (a capture that runs out of memory does so after its warm-up updated both), ``changes`` made to the config
        for the rest of the call (captured steps dropped with their memory once ``cuda_graph`` is off), ``warning``,
        and ``fallback()``. The images and counts then equal a call that ran with ``changes`` from the start."""
        running_mean, nonfinite = self.store.running_mean_state(), self.record.nonfinite_state()
        try:
            return step()
        except torch.OutOfMemoryError:
            pass  # taken again below, once the error's traceback no longer holds the failed step's tensors
        self.store.restore_running_mean(running_mean)
        self.record.restore_nonfinite(nonfinite)
        self.config = replace(self.config, **changes)
        self.fell_back.update(changes)
        if not self.config.cuda_graph:
            self._graphs, self._graph_inputs = {}, None
        warnings.warn(warning, stacklevel=6)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return fallback()

    def graphed(self, kind: str, compute, cond, guidance_scale: float) -> GraphedStep:
        """The ``kind`` step captured for this conditioning and scale (captured again if either changes).

        Without ``gradient_interval`` no plain step follows the first guided one, so the plain step's graph is
        dropped before the guided one is captured and its memory serves the guided capture instead of being held
        beside it; with it, the steps that reuse a gradient replay the plain graph, which stays.
        """
        if self._graph_inputs is None or self._graph_inputs[0] is not cond or self._graph_inputs[1] != guidance_scale:
            self._graphs, self._graph_inputs = {}, (cond, guidance_scale)
        if kind not in self._graphs:
            if kind == "guided" and self.config.gradient_interval == 1:
                self._graphs.pop("plain", None)

            def step(z, timestep):
                return compute(z, timestep, cond, guidance_scale)

            self._graphs[kind] = GraphedStep(step, self.graph_backend)
        return self._graphs[kind]

    @staticmethod
    def as_tensor(t, like: torch.Tensor) -> torch.Tensor:
        """The timestep as a tensor on the latents' device (a graph's input buffer)."""
        return torch.as_tensor(t, device=like.device)

    def compute_noise_and_gradient(self, latents, t, cond, guidance_scale: float, masks=None):
        """One guided step. It starts from an empty attention store and changes only tensors in place across
        steps, so it may be captured as a CUDA graph (whose warm-up and capture run it twice in a row). The
        feed-forward gates keep less for the backward (:mod:`.recompute`; the same gradient), in a batched CFG pass
        only the conditional rows (:meth:`gate_rows`)."""
        self.store.clear()
        latents = latents.detach().requires_grad_(True)
        passes = {"cfg": self.cfg_pass, "split": self.split_pass, "separate": self.separate_pass}
        with torch.enable_grad(), gelu_gates_recomputed(self.gelu_gates, self.config.recompute, self.gate_rows(cond)):
            noise, features = passes[self.config.feature_pass](latents, t, cond, guidance_scale)
            masks = self.generated_masks() if masks is None else masks
            gradient = self.energy_gradient(latents, features, masks)
        return noise.detach(), gradient

    def gate_rows(self, cond) -> slice | None:
        """The rows the feed-forward gates keep for the backward: a batched CFG pass's conditional rows, the only ones
        the energy reads, while every attention layer keeps rows apart (:func:`keeps_rows_apart`), so that the
        others get a zero gradient; otherwise every row."""
        if self.config.feature_pass != "cfg" or not cond.do_cfg:
            return None
        if not all(keeps_rows_apart(module.processor) for module in self.attention_modules):
            return None
        return self.cfg_rows

    def cfg_pass(self, latents, t, cond, guidance_scale: float):
        """The batched CFG pass with grad up to the DIFT block; features from its conditional rows."""
        rows = self.cfg_rows if cond.do_cfg else None
        with record_attention(self.pipe.unet, self.store), \
                capture_features(self.pipe.unet, self.block, rows, grad_after=False) as captured:
            noise = self.pipe.cfg_noise(latents, t, cond, guidance_scale)
        return noise, captured[0]

    def split_pass(self, latents, t, cond, guidance_scale: float):
        """CFG as two passes: unconditional without grad, conditional with grad up to the DIFT block.

        Same noise and gradient as :meth:`cfg_pass`, but autograd keeps and differentiates only the conditional
        rows, which are all the energy depends on: half the backward and half its memory.
        """
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
        return classifier_free(uncond, text, guidance_scale), captured[0]

    def separate_pass(self, latents, t, cond, guidance_scale: float):
        """Memory-lean mode: the CFG pass without grad, then a conditional pass with grad stopped after the DIFT
        block."""
        with torch.no_grad(), record_attention(self.pipe.unet, self.store):
            noise = self.pipe.cfg_noise(latents, t, cond, guidance_scale)
        conditional = cond.conditional()
        model_input = self.pipe.scheduler.scale_model_input(latents, t)
        return noise, features_only(self.pipe.unet, self.block, model_input, t, conditional.prompt_embeds,
                                    conditional.added_cond_kwargs)

    @torch.no_grad()
    def generated_masks(self) -> torch.Tensor:
        """``M_gen`` per identity ``(B, n, h, w)`` from the running-mean cross-attention and this step's q/k."""
        mean_maps = self.store.accumulate()
        c = self.config
        return regional_mask(mean_maps, self.store.self_qk, c.mask_iterations, c.mask_power, c.mask_threshold)

    def energy_gradient(self, latents, features, masks) -> torch.Tensor:
        """``Σ_i M_gen,i ⊙ ∇_{z_t} E_i`` (eqs. 8-10); zero if not finite (counted, see :meth:`finish`)."""
        feature_masks = resize_mask(masks, tuple(features.shape[-2:]))
        latent_masks = resize_mask(masks, tuple(latents.shape[-2:]))
        total = torch.zeros_like(latents, dtype=torch.float32)
        correspondences, energies, gradients = [], [], []
        for index, reference in enumerate(self.references):
            per_image = [match_features(features[b], feature_masks[b, index], reference.features, reference.mask,
                                        self.config.reduction) for b in range(features.shape[0])]
            identity_energy = sum(energy(c.similarity, self.config.strength) for c in per_image)
            last = index == len(self.references) - 1
            scale = HALF_PRECISION_GRAD_SCALE if latents.dtype in (torch.float16, torch.bfloat16) else 1.0
            gradient, = torch.autograd.grad(identity_energy * scale, latents, retain_graph=not last)
            gradient = gradient.float() / scale
            if self.config.background_masking:
                gradient = gradient * latent_masks[:, index : index + 1].to(gradient.dtype)
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
