"""Regional mask of the generated face from attention (paper eq. 6; DESIGN §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omniportrait.attention import aligned_width, group_by_shape


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each map of ``(..., h, w)`` to [0, 1]."""
    flat = x.flatten(-2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(x)


def sharpen(x: torch.Tensor, iterations: int = 3, power: float = 2.0) -> torch.Tensor:
    """``x <- minmax(x)^α``, ``γ`` times (eq. 6, inner part)."""
    for _ in range(iterations):
        x = minmax(x) ** power
    return x


def refine_with_self_attention(maps: torch.Tensor, qk: list[tuple[torch.Tensor, torch.Tensor]],
                               layers_per_call: int = 16) -> torch.Tensor:
    """``Â = A_s · x`` with ``A_s`` the head- and layer-averaged self-attention (eq. 6, outer part).

    ``softmax(QKᵀ/√d)·x`` is a ``scaled_dot_product_attention`` call with the map as value, so the ``(hw)²``
    matrix is never built; layers of one shape go through one call, up to ``layers_per_call`` at a time (a few
    operations per step instead of a few per layer). The value's width is padded with zeros to a multiple of 8,
    which CUDA's fused kernels need (with one column SDPA falls back to the math path: the full matrix, in fp32).
    ``maps``: ``(B, n, h, w)``; q, k: ``(B, heads, hw, d)`` at ``h×w``.
    """
    batch, count, height, width = maps.shape
    value = F.pad(maps.flatten(-2).transpose(1, 2), (0, aligned_width(count) - count))  # (B, hw, n padded)
    total = torch.zeros(batch, height * width, count, device=maps.device)
    for group in layer_chunks(qk, layers_per_call):
        query, key = torch.cat([q for q, _ in group]), torch.cat([k for _, k in group])
        layers, heads = len(group), query.shape[1]
        v = value.to(query.dtype)[None, :, None].expand(layers, -1, heads, -1, -1).flatten(0, 1)
        attended = F.scaled_dot_product_attention(query, key, v)[..., :count].float()  # (L·B, heads, hw, n)
        total = total + attended.unflatten(0, (layers, batch)).mean(2).sum(0)
    return (total / len(qk)).transpose(1, 2).reshape(batch, count, height, width)


def layer_chunks(qk: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> list[list]:
    """Layers whose q and k shapes match, in chunks of at most ``size``."""
    groups = group_by_shape(qk, lambda pair: (pair[0].shape, pair[1].shape))
    return [group[start : start + size] for group in groups for start in range(0, len(group), size)]


def assign_disjoint(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean masks ``(B, n, h, w)``: above ``threshold`` and the strongest identity at that pixel."""
    strongest = maps.argmax(dim=1, keepdim=True)
    owner = torch.zeros_like(maps, dtype=torch.bool).scatter_(1, strongest, True)
    return (maps > threshold) & owner


def regional_mask(cross_maps: torch.Tensor, qk, iterations: int = 3, power: float = 2.0,
                  threshold: float = 0.5) -> torch.Tensor:
    """``M_gen`` per identity: sharpen, refine by self-attention, min-max, threshold ``β`` (eq. 6)."""
    sharpened = sharpen(cross_maps.float(), iterations, power)
    refined = refine_with_self_attention(sharpened, qk) if qk else sharpened
    return assign_disjoint(minmax(refined), threshold)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of boolean ``(B, n, h, w)`` masks."""
    return F.interpolate(mask.float(), size=size, mode="nearest") > 0.5
