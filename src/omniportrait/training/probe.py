"""How well the e_mix cross-attention localizes the face, on a fixed batch with fixed noise and timesteps.

The training loss is noisy (a new batch, timestep and noise each step); this probe is not: the same
records, noise and timesteps every call, every condition kept. It reports the localization loss of eq. 5
and the Pearson correlation between the e_mix map and the face mask, both at the loss resolution.
Used by the convergence tests and by the measurement in ``docs/training.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniportrait.attention import resize_map
from omniportrait.training.data import TrainBatch
from omniportrait.training.losses import loc_map_size, localization_loss

PROBE_TIMESTEPS = (100, 250, 400, 550, 700, 850)


def map_mask_correlation(maps: torch.Tensor, masks: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Per-sample Pearson correlation of ``(B, 1, h, w)`` maps with ``(B, 1, H, W)`` masks at the loss size."""
    target = loc_map_size(tuple(maps.shape[-2:]), size)
    attention = resize_map(maps.float(), target).flatten(1)
    mask = resize_map(masks.float(), target).flatten(1)
    attention = attention - attention.mean(1, keepdim=True)
    mask = mask - mask.mean(1, keepdim=True)
    return (attention * mask).sum(1) / (attention.norm(dim=1) * mask.norm(dim=1)).clamp_min(1e-12)


@dataclass
class ProbeResult:
    localization_loss: float
    correlation: float
    mean_attention: float


@dataclass
class LocalizationProbe:
    """Fixed records, noise and timesteps (``PROBE_TIMESTEPS`` repeated over the batch)."""

    batch: TrainBatch
    seed: int = 1234
    timesteps: tuple[int, ...] = PROBE_TIMESTEPS

    @torch.no_grad()
    def __call__(self, trainer) -> ProbeResult:
        batch = self.batch
        generator = torch.Generator("cpu").manual_seed(self.seed)
        latents = trainer.encode_latents(batch.pixel_values, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        steps = torch.tensor([self.timesteps[i % len(self.timesteps)] for i in range(len(batch))],
                             device=latents.device)
        noisy = trainer.noise_scheduler.add_noise(latents, noise, steps)
        maps = trainer.identity_maps(batch, noisy, steps, torch.ones(len(batch), dtype=torch.bool))
        masks = batch.masks.to(maps.device)
        size = trainer.config.loc_size
        return ProbeResult(
            localization_loss=float(localization_loss(maps, masks, size).mean()),
            correlation=float(map_mask_correlation(maps, masks, size).mean()),
            mean_attention=float(maps.mean()),
        )
