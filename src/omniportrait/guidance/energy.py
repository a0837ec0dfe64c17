"""Diffusion-feature correspondence and the guidance energy (paper eqs. 7, 8, 10)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Correspondence:
    """``S`` (differentiable through the generated features) and the matched generated point per reference point."""

    similarity: torch.Tensor
    matches: torch.Tensor  # flat index into the generated map, one per reference point
    reference_points: torch.Tensor  # flat index into the reference map


def match_features(generated: torch.Tensor, gen_mask: torch.Tensor, reference: torch.Tensor,
                   ref_mask: torch.Tensor, reduction: str = "sum") -> Correspondence:
    """Eqs. 7-8 for one image and one identity.

    ``generated`` ``(C, hg, wg)`` and ``reference`` ``(C, hr, wr)`` are L2-normalised per point; each
    reference point inside ``ref_mask`` is matched, without grad, to its nearest generated point inside
    ``gen_mask`` (the paper's "p ∈ M^ref" under the argmin reads M^gen); then
    ``S = Σ (cos(D_gen[p_gen], D_ref[p_ref]) + 1) / 2`` (or the mean).
    """
    gen_points = gen_mask.flatten().nonzero().flatten()
    ref_points = ref_mask.flatten().nonzero().flatten()
    gen = F.normalize(generated.flatten(1)[:, gen_points].float(), dim=0)
    ref = F.normalize(reference.flatten(1)[:, ref_points].float(), dim=0)
    with torch.no_grad():
        nearest = (ref.T @ gen).argmax(dim=1)
    cosine = (gen[:, nearest] * ref).sum(0)
    scores = (cosine + 1) / 2
    similarity = scores.sum() if reduction == "sum" else scores.mean()
    return Correspondence(similarity, gen_points[nearest], ref_points)


def energy(similarity: torch.Tensor, strength: float) -> torch.Tensor:
    """Eq. 10: ``E = p / (1 + S)``."""
    return strength / (1 + similarity)
