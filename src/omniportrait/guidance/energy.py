"""Diffusion-feature correspondence, the guidance energy and its background masking (paper eqs. 7-10)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Correspondence:
    """``S`` (differentiable through the generated features) and, per reference point, its matched generated point."""

    similarity: torch.Tensor
    nearest: torch.Tensor  # flat index into the generated map, one per point of the reference map
    reference_mask: torch.Tensor  # flat boolean mask of the reference points that count
    generated_mask: torch.Tensor  # flat boolean mask of the generated points they may match (M_gen)

    @property
    def reference_points(self) -> torch.Tensor:
        """Flat indices of the reference points inside ``M_ref``."""
        return self.reference_mask.nonzero().flatten()

    @property
    def generated_points(self) -> torch.Tensor:
        """``|M_gen|``: the generated points the reference points could match."""
        return self.generated_mask.sum()

    @property
    def matches(self) -> torch.Tensor:
        """The generated point matched to each of :attr:`reference_points`."""
        return self.nearest[self.reference_mask]


def match_features(generated: torch.Tensor, gen_mask: torch.Tensor, reference: torch.Tensor,
                   ref_mask: torch.Tensor, reduction: str = "sum") -> Correspondence:
    """Eqs. 7-8 for one image and one identity.

    ``generated`` ``(C, hg, wg)`` and ``reference`` ``(C, hr, wr)`` are L2-normalised per point; each
    reference point inside ``ref_mask`` is matched, without grad, to its nearest generated point inside
    ``gen_mask`` (the paper's "p ∈ M^ref" under the argmin reads M^gen); then
    ``S = Σ (cos(D_gen[p_gen], D_ref[p_ref]) + 1) / 2`` (or the mean). Shapes never depend on the masks: every
    point is matched and the masks weigh the scores, so the GPU is never waited for (an empty ``gen_mask``
    gives ``S = 0``).
    """
    gen_inside, ref_inside = gen_mask.flatten(), ref_mask.flatten()
    gen = F.normalize(generated.flatten(1).float(), dim=0)
    ref = F.normalize(reference.flatten(1).float(), dim=0)
    with torch.no_grad():
        nearest = (ref.T @ gen).masked_fill(~gen_inside, float("-inf")).argmax(dim=1)
    scores = ((gen[:, nearest] * ref).sum(0) + 1) / 2 * (ref_inside & gen_inside.any())
    similarity = scores.sum() if reduction == "sum" else scores.sum() / ref_inside.sum().clamp_min(1)
    return Correspondence(similarity, nearest, ref_inside, gen_inside)


def energy(similarity: torch.Tensor, strength: float) -> torch.Tensor:
    """Eq. 10: ``E = p / (1 + S)``."""
    return strength / (1 + similarity)


def background_masked(gradient: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 9: the gradient w.r.t. ``z_t`` kept inside ``M_gen`` (at latent size) and zero in the background."""
    return gradient * mask.to(gradient.dtype)
