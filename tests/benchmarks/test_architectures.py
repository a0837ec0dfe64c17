"""The real architectures with random weights: the published models' sizes, frozen, built without a download."""

import pytest
import torch

from benchmarks.architectures import real_components

UNET_PARAMETERS = {"sd15": 859.5e6, "sdxl": 2567.5e6}  # the published UNets' parameter counts


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_the_components_have_the_published_unet_size_and_are_frozen(arch):
    parts, pivot_encoder = real_components(arch, dtype=torch.float16, device="meta")
    unet = parts["unet"]
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(UNET_PARAMETERS[arch], rel=1e-3)
    modules = [module for module in [*parts.values(), pivot_encoder] if isinstance(module, torch.nn.Module)]
    assert all(p.dtype == torch.float16 and not p.requires_grad for m in modules for p in m.parameters())
    assert ("text_encoder_2" in parts) == (arch == "sdxl")
