"""DIFT feature capture on a tiny UNet."""

import pytest
import torch

from omniportrait.guidance.features import capture_features, features_only
from tests.conftest import build


@pytest.fixture(scope="module")
def tiny_sd15():
    return build("sd15")


def context(width: int) -> torch.Tensor:
    return torch.randn(1, 77, width, generator=torch.Generator().manual_seed(1))


def unet_call(pipe, sample):
    return pipe.unet(sample, torch.tensor(500), encoder_hidden_states=context(pipe.unet.config.cross_attention_dim),
                     return_dict=False)[0]


def sample_requiring_grad():
    return torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)


def test_no_grad_after_the_block_keeps_the_features_gradient_and_drops_the_rest_of_the_graph(tiny_sd15):
    gradients, grad_mode = [], torch.is_grad_enabled()
    for grad_after in (True, False):
        sample = sample_requiring_grad()
        with torch.enable_grad(), capture_features(tiny_sd15.unet, 1, grad_after=grad_after) as captured:
            output = unet_call(tiny_sd15, sample)
        assert torch.is_grad_enabled() is grad_mode
        assert captured[0].requires_grad and output.requires_grad is grad_after
        with torch.enable_grad():
            gradients.append(torch.autograd.grad(captured[0].square().mean(), sample)[0])
    assert gradients[0].abs().max() > 0
    assert torch.equal(gradients[0], gradients[1])


def test_features_only_matches_the_captured_output_of_a_full_pass(tiny_sd15):
    sample = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_features(tiny_sd15.unet, 1) as captured:
        unet_call(tiny_sd15, sample)
        early = features_only(tiny_sd15.unet, 1, sample, torch.tensor(500),
                              encoder_hidden_states=context(tiny_sd15.unet.config.cross_attention_dim))
    assert torch.equal(early, captured[0])
