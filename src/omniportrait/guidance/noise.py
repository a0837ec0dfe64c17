"""The noise the scheduler steps with: classifier-free guidance (eq. 3) and the guided noise (eq. 11)."""

from __future__ import annotations

import torch


def classifier_free(uncond: torch.Tensor, text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Eq. 3: ``ε(∅) + w·(ε(y) − ε(∅))``."""
    return uncond + guidance_scale * (text - uncond)


def guidance_active(timestep: float, start: float, num_train_timesteps: int = 1000) -> bool:
    """Eq. 11's schedule: the guidance runs on steps with ``t ≤ t̂ = u·T``."""
    return float(timestep) <= start * num_train_timesteps


def guided_noise(noise: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``ε̂ = ε_cfg + ∇_{z_t} E``, used in both terms of the DDIM update."""
    return noise + gradient.to(noise.dtype)
