import pytest
import torch

from omniportrait.attention import resize_map
from omniportrait.training.losses import (
    FaceLocalizationObjective,
    diffusion_loss,
    loc_map_size,
    localization_loss,
)


def ellipse_mask(size: int = 64) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = ((xs - 20) / 12.0) ** 2 + ((ys - 30) / 16.0) ** 2 <= 1
    return inside.float()[None, None]


def test_loss_is_zero_when_the_map_equals_the_pooled_mask():
    mask = ellipse_mask()
    maps = resize_map(mask, (8, 8))
    assert localization_loss(maps, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_loss_of_an_empty_map_is_the_mean_squared_mask():
    mask = ellipse_mask()
    expected = resize_map(mask, (16, 16)).pow(2).mean()
    assert localization_loss(torch.zeros(1, 1, 32, 32), mask).item() == pytest.approx(expected.item())


def test_maps_larger_than_16_are_pooled_to_16_and_smaller_maps_keep_their_size():
    assert loc_map_size((32, 32)) == (16, 16)  # SDXL at 1024
    assert loc_map_size((16, 16)) == (16, 16)  # SD1.5 at 512
    assert loc_map_size((8, 8)) == (8, 8)  # tiny models
    mask = ellipse_mask()
    maps = torch.ones(1, 1, 32, 32)
    expected = (1 - resize_map(mask, (16, 16))).pow(2).mean()
    assert localization_loss(maps, mask).item() == pytest.approx(expected.item())


def test_diffusion_loss_is_the_mean_squared_error():
    prediction, target = torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), 3.0)
    assert diffusion_loss(prediction, target).item() == pytest.approx(9.0)


def test_objective_weights_the_localization_term_and_skips_dropped_samples():
    mask = ellipse_mask().repeat(3, 1, 1, 1)
    maps = torch.rand(3, 1, 8, 8, requires_grad=True)
    prediction, target = torch.zeros(3, 4, 8, 8), torch.ones(3, 4, 8, 8)
    keep = torch.tensor([True, False, True])
    terms = FaceLocalizationObjective(eta=0.5)(prediction, target, maps, mask, keep)
    per_sample = localization_loss(maps.detach(), mask)
    assert terms.kept == 2
    assert terms.localization.item() == pytest.approx(per_sample[[0, 2]].mean().item())
    assert terms.total.item() == pytest.approx(1.0 + 0.5 * terms.localization.item())
    terms.total.backward()
    assert maps.grad[1].abs().sum() == 0  # a dropped sample gets no localization gradient
    assert maps.grad[0].abs().sum() > 0 and maps.grad[2].abs().sum() > 0


def test_a_fully_dropped_batch_has_a_zero_localization_term():
    mask = ellipse_mask().repeat(2, 1, 1, 1)
    terms = FaceLocalizationObjective()(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.rand(2, 1, 8, 8),
                                         mask, torch.tensor([False, False]))
    assert terms.kept == 0 and terms.localization.item() == 0.0
