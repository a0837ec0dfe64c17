"""Diffusion features (DIFT, Tang et al. 2023): the output of one UNet up-block, after its upsampler."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class StopForward(Exception):
    """Raised by the feature hook to end a UNet pass once the features exist."""


@contextmanager
def capture_features(unet, block: int, rows: slice | None = None, stop: bool = False, grad_after: bool = True):
    """Yield a list that receives ``up_blocks[block]``'s output (selected rows) on each UNet call.

    With ``stop=True`` the forward ends right after that block (catch :class:`StopForward`). With
    ``grad_after=False`` the rest of the forward runs without autograd: the blocks after the features build no
    graph, so their activations are not kept for a backward pass that never reaches them.
    """
    captured: list[torch.Tensor] = []
    grad_mode = torch.is_grad_enabled()

    def hook(module, inputs, output):
        captured.append(output if rows is None else output[rows])
        if stop:
            raise StopForward
        if not grad_after:
            torch.set_grad_enabled(False)

    handle = unet.up_blocks[block].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_mode)


def features_only(unet, block: int, sample, timestep, **unet_kwargs):
    """One UNet pass stopped after ``up_blocks[block]``; returns its output ``(B, C, h, w)``. ``unet_kwargs``: the
    UNet's other arguments (``encoder_hidden_states``, ``added_cond_kwargs``, ControlNet residuals, …)."""
    with capture_features(unet, block, stop=True) as captured:
        try:
            unet(sample, timestep, **unet_kwargs, return_dict=False)
        except StopForward:
            pass
    return captured[0]


def noisy_reference_latents(latents: torch.Tensor, timestep: int, count: int, seed: int,
                            alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``count`` seeded forward-diffusion samples ``√ᾱ·z0 + √(1−ᾱ)·ε`` of one latent at ``timestep``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((count, *latents.shape[1:]), generator=generator).to(latents.device, latents.dtype)
    alpha = alphas_cumprod[timestep].to(latents.device, latents.dtype)
    return alpha.sqrt() * latents.expand(count, -1, -1, -1) + (1 - alpha).sqrt() * noise
