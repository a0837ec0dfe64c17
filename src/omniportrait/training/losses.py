"""The training objective of the Pivot ID Encoder, eq. 5 (paper §3.2), as small callables.

``L = L_diff + η · L_loc``: ``L_diff = E‖ε − ε_θ(z_t, t, C)‖²`` and
``L_loc = 1/(hw) Σ_ij (A_t(i, j) − M(i, j))²``, where ``A_t`` is the cross-attention mass of the ``e_mix``
token (heads and the latent/4 layers averaged, see :mod:`omniportrait.attention`) and ``M`` the face mask,
both at 16×16 (DESIGN §2). Tiny models whose latent/4 maps are smaller than 16 compare at their map size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omniportrait.attention import resize_map


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5, first term: mean squared error between the UNet's prediction and its target (ε or v)."""
    return F.mse_loss(prediction.float(), target.float())


def loc_map_size(map_size: tuple[int, int], wanted: int = 16) -> tuple[int, int]:
    """The side the localization loss works at: ``wanted`` (16), or the maps' own size when smaller."""
    return min(wanted, map_size[0]), min(wanted, map_size[1])


def localization_loss(maps: torch.Tensor, masks: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Eq. 5, second term, per sample: ``mean_ij (A(i, j) − M(i, j))²``.

    Args:
        maps: ``(B, 1, h, w)`` e_mix cross-attention mass.
        masks: ``(B, 1, H, W)`` face masks in [0, 1] at any size; average-pooled (area) to the map size.
        size: the loss resolution (paper: 16), capped at the map size.
    Returns:
        ``(B,)`` loss of each sample.
    """
    target = loc_map_size(tuple(maps.shape[-2:]), size)
    attention = resize_map(maps.float(), target)
    mask = resize_map(masks.float(), target)
    return (attention - mask).pow(2).flatten(1).mean(1)


@dataclass
class LossTerms:
    """The scalar terms of one micro-batch; ``localization`` is over the samples that kept their condition."""

    total: torch.Tensor
    diffusion: torch.Tensor
    localization: torch.Tensor
    kept: int


@dataclass
class FaceLocalizationObjective:
    """``L = L_diff + η · L_loc`` (eq. 5); samples whose condition was dropped get no localization term.

    Args:
        eta: weight of the localization term (paper: 2e-3).
        size: resolution of the localization term (paper: 16).
    """

    eta: float = 2e-3
    size: int = 16

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor,
                 keep: torch.Tensor) -> LossTerms:
        diff = diffusion_loss(prediction, target)
        per_sample = localization_loss(maps, masks, self.size)
        weights = keep.to(per_sample.dtype)
        kept = int(keep.sum())
        loc = (per_sample * weights).sum() / max(kept, 1)
        return LossTerms(diff + self.eta * loc, diff.detach(), loc.detach(), kept)
