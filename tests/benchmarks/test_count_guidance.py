"""The meta-device cost counter, on the tiny SD1.5 UNet: counts what the guided step variants really differ in."""

import torch
from diffusers import UNet2DConditionModel

from benchmarks.count_guidance import count_step
from omniportrait.models.tiny import tiny_components


def test_the_feature_passes_differ_in_what_they_compute_and_keep():
    config = tiny_components("sd15").components["unet"].config
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).to(torch.float16).requires_grad_(False)
    counts = {variant: count_step(unet, "sd15", variant, 32, config.cross_attention_dim)
              for variant in ("plain", "cfg-full-graph", "cfg-gate-kept", "cfg", "split", "separate")}
    assert counts["plain"][0] > 0 and counts["plain"][1] == 0
    assert counts["cfg"][0] == counts["cfg-full-graph"][0] > counts["plain"][0]
    assert 0 < counts["separate"][1] < counts["cfg"][1] < counts["cfg-gate-kept"][1] < counts["cfg-full-graph"][1]
    assert counts["cfg"][0] == counts["cfg-gate-kept"][0]  # recomputing the gate adds no counted FLOPs
    # split: the same passes as cfg with the backward over the conditional half only
    assert counts["plain"][0] < counts["split"][0] < counts["cfg"][0]
    assert counts["split"][1] == counts["separate"][1]
