"""How a generation's sampling steps run: eagerly, or captured once as CUDA graphs and replayed; and what they go on
with after running out of GPU memory.

:class:`StepRunner` takes the two kinds of step :class:`~omniportrait.guidance.rb.ReferenceGuidance` defines (the
unguided ``plain`` step and the ``guided`` one) and runs them the way the configuration and the device allow. The
steps themselves know nothing of graphs or memory: they change only tensors in place across steps, so that a replay
(which runs no Python) updates the same state an eager call does.

Out of GPU memory, a call goes on with less instead of losing the generation, each time with one warning:
a batched ``cfg`` guided step is taken again with the ``split`` pass (the same noise and gradient, a lower peak),
and a step whose capture as a CUDA graph ran out runs eagerly.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch

from omniportrait.errors import ConfigError
from omniportrait.guidance.config import RBGuidanceConfig
from omniportrait.guidance.graph import CudaGraphs, GraphedStep, replays_without_input_scaling
from omniportrait.models.offload import has_offload_hooks

SPLIT_AFTER_OUT_OF_MEMORY = ("a guided step with the batched cfg feature pass ran out of GPU memory; it and the later "
                             "steps use the split pass (--rb-feature-pass split: the same noise and gradient, a lower "
                             "peak, slower)")
EAGER_AFTER_OUT_OF_MEMORY = ("capturing a sampling step as a CUDA graph ran out of GPU memory; it and the later steps "
                             "run eagerly (--no-rb-cuda-graph: the same images, more host time)")


def graph_problem(pipe, backend=CudaGraphs, cond=None) -> str | None:
    """Why ``pipe``'s steps cannot be captured as CUDA graphs, or None: they need a CUDA device, a scheduler a
    replayed step can contain, the UNet's weights in place (offloading moves them during the call, layerwise
    casting recasts them), and a ControlNet scale that stays the same over the steps."""
    if cond is not None and cond.control is not None and not cond.control.constant():
        return ("CUDA graphs (--rb-cuda-graph) need a ControlNet scale that is the same at every step "
                "(control_guidance_start 0 and end 1)")
    unet = pipe.unet
    if has_offload_hooks(unet):
        return ("CUDA graphs (--rb-cuda-graph) need the UNet's weights in place, without hooks that move or "
                "recast them (CPU offloading, layerwise casting)")
    problem = backend.problem(unet.device)
    if problem:
        return problem
    scheduler = copy.deepcopy(pipe.scheduler)  # probed on a copy: Euler's first call sets its step index
    probe = torch.zeros(1, device=scheduler.timesteps.device)
    if not replays_without_input_scaling(scheduler, probe, scheduler.timesteps[0]):
        return (f"CUDA graphs (--rb-cuda-graph) need a scheduler that does not scale the model input, such as "
                f"DDIM (the default); {type(scheduler).__name__} does")
    return None


def graphs_decided(config: RBGuidanceConfig, pipe, backend=CudaGraphs, cond=None) -> RBGuidanceConfig:
    """``config`` with ``cuda_graph`` decided before anything runs: where left to us (None), on where the steps can be
    captured; where asked for, a clear error where they cannot."""
    if config.cuda_graph is False:
        return config
    problem = graph_problem(pipe, backend, cond)
    if config.cuda_graph and problem:
        raise ConfigError(problem)
    return replace(config, cuda_graph=problem is None)


class StepRunner:
    """Runs the ``plain`` and ``guided`` steps of one :class:`ReferenceGuidance` (``guidance``).

    With ``cuda_graph`` each kind is captured on its first call (for the conditioning and scale of that call) and
    replayed after. Without ``gradient_interval`` no plain step follows the first guided one, so the plain graph is
    dropped before the guided one is captured; with it, the steps that reuse a gradient replay the plain graph.
    """

    graph_backend = CudaGraphs

    def __init__(self, guidance):
        self.guidance = guidance
        self.graphs: dict[str, GraphedStep] = {}
        self.graph_inputs: tuple | None = None  # the conditioning and scale the graphs were captured with
        self.fell_back: dict = {}  # config fields changed after running out of GPU memory, as changed

    @property
    def config(self) -> RBGuidanceConfig:
        return self.guidance.config

    def plain(self, latents, t, cond, guidance_scale: float) -> torch.Tensor:
        step = self.guidance.plain_noise
        if not self.config.cuda_graph:
            return step(latents, t, cond, guidance_scale)
        return self.replayed("plain", step, step, latents, t, cond, guidance_scale)

    def guided(self, latents, t, cond, guidance_scale: float, masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided step; ``masks`` (fixed ``M_gen``) runs it eagerly."""
        if not self.config.cuda_graph or masks is not None:
            return self.eager_guided(latents, t, cond, guidance_scale, masks)
        return self.replayed("guided", self.guidance.guided_step, self.eager_guided, latents, t, cond,
                             guidance_scale)

    def eager_guided(self, latents, t, cond, guidance_scale: float, masks=None):
        """A guided step, not captured; a batched ``cfg`` step that runs out of memory goes on with ``split``."""
        def step():
            return self.guidance.guided_step(latents, t, cond, guidance_scale, masks)

        if self.config.feature_pass != "cfg" or not cond.do_cfg:
            return step()
        return self.out_of_memory_fallback(step, step, SPLIT_AFTER_OUT_OF_MEMORY, feature_pass="split")

    def replayed(self, kind: str, compute: Callable, eager: Callable, latents, t, cond, guidance_scale: float):
        """``compute``'s step as the ``kind`` graph. If its first call (warm-up, then capture) runs out of memory, a
        guided ``cfg`` step is captured again with the ``split`` pass, any other runs ``eager`` from then on."""
        step = self.graphed(kind, compute, cond, guidance_scale)

        def replay():
            return step(latents, torch.as_tensor(t, device=latents.device))

        def captured_again():
            del self.graphs[kind]  # its warm-up or capture failed: nothing captured, nothing held
            return self.replayed(kind, compute, eager, latents, t, cond, guidance_scale)

        if step.eager:
            return eager(latents, t, cond, guidance_scale)
        if step.replay is not None:
            return replay()
        if kind == "guided" and self.config.feature_pass == "cfg" and cond.do_cfg:
            return self.out_of_memory_fallback(replay, captured_again, SPLIT_AFTER_OUT_OF_MEMORY, feature_pass="split")
        return self.out_of_memory_fallback(replay, lambda: eager(latents, t, cond, guidance_scale),
                                           EAGER_AFTER_OUT_OF_MEMORY, cuda_graph=False)

    def graphed(self, kind: str, compute: Callable, cond, guidance_scale: float) -> GraphedStep:
        """The ``kind`` step captured for this conditioning and scale (captured again if either changes)."""
        if self.graph_inputs is None or self.graph_inputs[0] is not cond or self.graph_inputs[1] != guidance_scale:
            self.graphs, self.graph_inputs = {}, (cond, guidance_scale)
        if kind not in self.graphs:
            if kind == "guided" and self.config.gradient_interval == 1:
                self.graphs.pop("plain", None)

            def step(z, timestep):
                return compute(z, timestep, cond, guidance_scale)

            self.graphs[kind] = GraphedStep(step, self.graph_backend)
        return self.graphs[kind]

    def out_of_memory_fallback(self, step: Callable, fallback: Callable, warning: str, **changes):
        """``step()``; out of GPU memory: the guidance's step state as before it, ``changes`` made to the config for
        the rest of the call, ``warning``, and ``fallback()``: the images and counts of a call that ran with
        ``changes`` from the start."""
        state = self.guidance.step_state()
        try:
            return step()
        except torch.OutOfMemoryError:
            pass  # taken again below, once the error's traceback no longer holds the failed step's tensors
        self.guidance.restore_step_state(state)
        self.guidance.config = replace(self.config, **changes)
        self.fell_back.update(changes)
        if not self.config.cuda_graph:
            self.graphs, self.graph_inputs = {}, None
        warnings.warn(warning, stacklevel=7)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return fallback()

    def finish(self) -> bool:
        """Drop the captured steps with their memory; whether a guided step was replayed from a graph (its outputs
        then live in the graph's memory, which the caller copies out)."""
        replayed = "guided" in self.graphs
        self.graphs, self.graph_inputs = {}, None
        return replayed
