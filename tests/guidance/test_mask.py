import pytest
import torch

from omniportrait.guidance.mask import assign_disjoint, minmax, refine_with_self_attention, regional_mask, sharpen


def test_minmax_and_sharpen_keep_unit_range_and_order():
    x = torch.rand(2, 3, 5, 5)
    y = sharpen(x, iterations=3, power=2.0)
    assert torch.isclose(minmax(y).amax(dim=(-1, -2)), torch.ones(2, 3)).all()
    flat_x, flat_y = x.flatten(-2), y.flatten(-2)
    assert torch.equal(flat_x.argsort(-1), flat_y.argsort(-1))  # monotone map keeps the order


@pytest.mark.parametrize("layers_per_call", [1, 2, 16])
def test_sdpa_refinement_equals_explicit_self_attention_product(layers_per_call):
    torch.manual_seed(0)
    batch, heads, h, w, d, n = 2, 3, 4, 5, 8, 2
    maps = torch.rand(batch, n, h, w)
    qk = [(torch.randn(batch, heads, h * w, d), torch.randn(batch, heads, h * w, d)) for _ in range(3)]
    qk.append((torch.randn(batch, 2 * heads, h * w, d), torch.randn(batch, 2 * heads, h * w, d)))  # another shape
    refined = refine_with_self_attention(maps, qk, layers_per_call)
    explicit = []
    for q, k in qk:
        attention = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1).mean(1)  # (B, hw, hw), head mean
        explicit.append(attention @ maps.flatten(-2).transpose(1, 2))
    expected = torch.stack(explicit).mean(0).transpose(1, 2).reshape(batch, n, h, w)
    assert torch.allclose(refined, expected, atol=1e-5)


def test_masks_of_several_identities_never_share_a_pixel():
    maps = torch.rand(1, 3, 8, 8)
    masks = assign_disjoint(minmax(maps), threshold=0.2)
    assert (masks.sum(dim=1) <= 1).all()
    assert masks.any()


def test_regional_mask_finds_a_blob():
    maps = torch.zeros(1, 1, 8, 8)
    maps[..., 2:5, 3:6] = 1.0
    mask = regional_mask(maps + 0.01 * torch.rand(1, 1, 8, 8), qk=[])
    assert mask[0, 0, 2:5, 3:6].all() and mask.sum() == 9
