"""The real architectures' narrow twins: the same layers as the real UNets, small enough to run on a CPU."""

import pytest
import torch

from omniportrait.models.architectures import narrow_twin_components, narrow_twin_unet, sd15_unet, sdxl_unet

REAL = {"sd15": sd15_unet, "sdxl": sdxl_unet}


def layers(unet) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in unet.named_modules()]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_the_twin_has_every_layer_of_the_real_unet_at_a_twentieth_of_its_width(arch):
    with torch.device("meta"):
        real = REAL[arch]()
    twin = narrow_twin_unet(arch, text_width=64, pooled_width=32)
    assert layers(twin) == layers(real)
    assert [c * 20 for c in twin.config.block_out_channels] == list(real.config.block_out_channels)
    real_params = sum(p.numel() for p in real.parameters())
    assert sum(p.numel() for p in twin.parameters()) < real_params / 200


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_twin_components_make_a_frozen_pipeline_that_generates(arch):
    from omniportrait.pipelines.loading import PIPELINE_CLASSES

    parts, pivot_encoder = narrow_twin_components(arch)
    assert not any(p.requires_grad for module in parts.values() if isinstance(module, torch.nn.Module)
                   for p in module.parameters())
    pipe = PIPELINE_CLASSES[arch](**parts, pivot_encoder=pivot_encoder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a woman", height=16, width=16, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()
