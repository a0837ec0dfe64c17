"""The meta-device cost counter, on the tiny SD1.5 UNet: counts what the guided step variants really differ in."""

from collections import Counter

import torch
from diffusers import UNet2DConditionModel

from benchmarks.count_guidance import VARIANTS, count_step
from omniportrait.models.tiny import tiny_components


def meta_unet():
    config = tiny_components("sd15").components["unet"].config
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config).to(torch.float16).requires_grad_(False)


def test_the_feature_passes_differ_in_what_they_compute_and_keep():
    unet = meta_unet()
    counts = {variant: count_step(unet, "sd15", variant, 32, unet.config.cross_attention_dim)
              for variant in VARIANTS}
    assert counts["plain"][0] > 0 and counts["plain"][1] == 0
    assert counts["cfg"][0] == counts["cfg-full-graph"][0] > counts["plain"][0]
    assert 0 < counts["separate"][1] < counts["cfg"][1] < counts["cfg-gate-kept"][1] < counts["cfg-full-graph"][1]
    assert counts["cfg"][0] == counts["cfg-gate-kept"][0]  # recomputing the gate adds no counted FLOPs
    # split: the same passes as cfg with the backward over the conditional half only
    assert counts["plain"][0] < counts["split"][0] < counts["cfg"][0]
    assert counts["split"][1] == counts["separate"][1]
    # the projection recomputed: more FLOPs (a matmul per block in the backward), less kept
    for variant in ("cfg-every-row", "split"):
        flops, kept = counts[f"{variant}-projection"]
        assert flops > counts[variant][0] and 0 < kept < counts[variant][1]
    # the gates keeping the conditional row only: less kept; with the projection recomputed, no more FLOPs either
    assert counts["cfg"][0] == counts["cfg-every-row"][0] and counts["cfg"][1] < counts["cfg-every-row"][1]
    assert counts["cfg-projection"][0] == counts["cfg"][0]
    assert counts["cfg-projection"][1] < counts["cfg-every-row-projection"][1] < counts["cfg-every-row"][1]


def test_what_is_kept_per_autograd_node_adds_up_to_the_total():
    unet, by_node = meta_unet(), Counter()
    _, kept = count_step(unet, "sd15", "cfg", 32, unet.config.cross_attention_dim, by_node)
    assert abs(sum(by_node.values()) - kept) < 1024  # a few scalars a division keeps bypass the pack hook
    assert by_node["GeluGateBackward"] > 0 and by_node["NativeLayerNormBackward0"] > 0
