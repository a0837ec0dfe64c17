"""The meta-device counters of ``benchmarks/count.py``: live tensors, the guided step's cost, the step peaks."""

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from benchmarks.count import (
    GUIDED,
    META,
    LiveTensorPeak,
    attention_as_on_cuda,
    count_step,
    main,
    reference_features_peak,
    step_peaks,
    weight_bytes,
)
from omniportrait.models.tiny import tiny_components


def test_the_peak_is_what_is_alive_at_once_counting_each_storage_once():
    weights = torch.ones(4096)  # made before: not counted
    with LiveTensorPeak() as live:
        a = weights * 2  # 16 KiB
        b = a + 1  # 32 KiB alive
        del a
        c = b * 3  # 32 KiB alive again
        view = c[:10]  # the same storage
        c.add_(1)  # in place: nothing new
        del b, c
    assert live.peak == 2 * 4096 * 4
    assert live.alive == 4096 * 4  # the view keeps c's storage
    del view
    assert live.alive == 0


def test_views_of_excluded_weights_are_not_counted():
    layer, x = torch.nn.Linear(256, 256, bias=False), torch.ones(1, 256)
    with LiveTensorPeak() as counted:
        transposed = layer.weight.t()  # a new tensor object on the weight's storage
    with LiveTensorPeak(exclude=[layer]) as excluded:
        transposed = layer.weight.t()
        out = x @ transposed
    assert counted.peak == 256 * 256 * 4
    assert excluded.peak == 256 * 4 and out.shape == (1, 256)


def test_attention_is_counted_as_cuda_runs_it_without_the_score_matrix():
    q = torch.zeros(1, 1, 1024, 8, device="meta")  # the CUDA kernel has a meta implementation, not a CPU one
    sdpa = F.scaled_dot_product_attention
    with LiveTensorPeak() as math:
        F.scaled_dot_product_attention(q, q, q)
    with attention_as_on_cuda(), LiveTensorPeak() as efficient:
        out = F.scaled_dot_product_attention(q, q, q)
    assert efficient.peak < 1024 * 1024 * 4 <= math.peak  # no 1024×1024 matrix
    assert out.shape == q.shape and F.scaled_dot_product_attention is sdpa  # put back


def test_the_decode_table_of_the_real_decoders(capsys):
    main(["decode", "--bands", "32", "--check-size", "0"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| decode | diffusers GiB | bands of 32 MiB |"
    sdxl = rows[2].split("|")
    assert sdxl[1].strip() == "SDXL 1024² fp32" and float(sdxl[2]) == 3.0
    assert float(sdxl[3].split()[0]) < 2.5


def test_the_feature_passes_and_recomputes_differ_in_what_they_compute_and_keep():
    config = tiny_components("sd15").components["unet"].config
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).to(torch.float16).requires_grad_(False)
    counts = {variant: count_step(unet, "sd15", variant, 16, unet.config.cross_attention_dim)
              for variant in ("plain", *GUIDED)}
    assert counts["plain"][0] > 0 and counts["plain"][1] == 0
    assert counts["plain"][0] < counts["split"][0] < counts["cfg"][0]  # split differentiates half the batch
    assert 0 < counts["separate"][1] == counts["split"][1]  # both keep the conditional forward up to the block
    assert counts["cfg"][0] == counts["cfg-gelu"][0]  # the conditional row's projection only: no more FLOPs
    for feature_pass in ("cfg", "split", "separate"):  # the projection recomputed keeps less than the gate
        assert 0 < counts[feature_pass][1] < counts[f"{feature_pass}-gelu"][1]
    assert counts["split"][0] > counts["split-gelu"][0]  # ...for a matmul per block in the backward


def test_guided_steps_hold_more_than_plain_ones_and_the_gate_more_than_the_projection(astronaut_reference):
    from benchmarks.bench import model_pipeline

    pipe, modules = model_pipeline("tiny-sd15", META, torch.float16)
    peaks = step_peaks(pipe, modules, astronaut_reference, 64)
    assert 0 < peaks["plain"] <= peaks["plain+record"] < peaks["guided-split"] < peaks["guided-cfg"]
    assert peaks["guided-cfg"] < peaks["guided-cfg-gelu"] and peaks["guided-split"] < peaks["guided-split-gelu"]
    assert weight_bytes(modules) > 0 and not any(name.startswith("vae") for name in peaks)
    assert 0 < reference_features_peak(pipe, modules, astronaut_reference, 64)
