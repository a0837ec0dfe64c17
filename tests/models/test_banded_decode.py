"""The banded VAE decode gives diffusers' decode, up to rounding, with less memory alive at once."""

import pytest
import torch

from benchmarks.count import decode_peak_gib
from omniportrait.models.banded_decode import (
    channel_moments,
    decode_in_bands,
    pooled_moments,
    resnet_in_bands,
    resnet_recomputed_in_bands,
    supports_bands,
)
from omniportrait.models.tiny import tiny_vae

ONE_ROW = 1e-6  # MiB: every band is a single row, so every band needs its neighbours from the next


@pytest.fixture(scope="module")
def vae():
    model = tiny_vae().eval()
    with torch.no_grad():  # random GroupNorm affines, so a wrong scale or shift shows
        for norm in [m for m in model.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return model


def latents(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("band_mib", [ONE_ROW, 0.02, 64])
@pytest.mark.parametrize("size", [(8, 8), (7, 13)])
def test_bands_give_diffusers_decode(vae, band_mib, size):
    z = latents(*size)
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
        banded = decode_in_bands(vae, z, band_mib)
    assert banded.shape == expected.shape
    assert torch.allclose(banded, expected, atol=1e-5, rtol=1e-5), (banded - expected).abs().max()


@pytest.mark.parametrize("layers", [resnet_in_bands, resnet_recomputed_in_bands])
@pytest.mark.parametrize("band_bytes", [1, 4 * 2 * 8 * 11 * 3])  # one row, three rows
def test_a_resnet_in_bands_is_diffusers_resnet(layers, band_bytes):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    resnet = ResnetBlock2D(in_channels=8, out_channels=4, temb_channels=None, groups=2, eps=1e-6).eval()
    with torch.no_grad():
        for norm in (resnet.norm1, resnet.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 8, 7, 11) * 2
        expected = resnet(x, None)
        banded = layers(resnet, x, band_bytes)
    assert resnet.conv_shortcut is not None
    assert torch.allclose(banded, expected, atol=1e-5, rtol=1e-5), (banded - expected).abs().max()


def test_two_images_in_a_batch_are_normalised_each_on_its_own(vae):
    z = torch.cat([latents(6, 6, seed=1), latents(6, 6, seed=2) * 3])
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
        banded = decode_in_bands(vae, z, ONE_ROW)
    assert torch.allclose(banded, expected, atol=1e-5, rtol=1e-5)


def test_a_resnets_output_scale_is_applied():
    model = tiny_vae().eval()
    model.decoder.up_blocks[0].resnets[1].output_scale_factor = 2.0
    z = latents(8, 8)
    with torch.no_grad():
        assert torch.allclose(decode_in_bands(model, z, ONE_ROW), model.decode(z, return_dict=False)[0], atol=1e-5)


def test_half_precision_bands_stay_within_half_precision_rounding(vae):
    z = latents(8, 8)
    half = torch.nn.Module.to(vae, torch.float16)
    try:
        with torch.no_grad():
            expected = half.decode(z.half(), return_dict=False)[0].float()
            banded = decode_in_bands(half, z.half(), ONE_ROW)
    finally:
        torch.nn.Module.to(vae, torch.float32)
    assert banded.dtype == torch.float16
    assert (banded.float() - expected).abs().max() < 2e-2 * expected.abs().max()


def test_group_moments_combine_bands_into_the_whole_tensors_moments():
    x = torch.randn(2, 8, 9, 5, dtype=torch.float64).float() * 3 + 1
    mean, var = pooled_moments(*channel_moments(x, rows=2), groups=4)
    grouped = x.reshape(2, 4, -1)
    assert torch.allclose(mean, grouped.mean(-1), atol=1e-6)
    assert torch.allclose(var, grouped.var(-1, correction=0), atol=1e-5)


def test_decoders_of_another_shape_or_with_grad_go_through_diffusers(vae):
    z = latents(8, 8)
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
    assert supports_bands(vae) is False  # grad is on here
    assert torch.equal(decode_in_bands(vae, z, ONE_ROW).detach(), expected)
    other = tiny_vae().eval()
    other.decoder.conv_act = torch.nn.GELU()
    with torch.no_grad():
        assert not supports_bands(other)
        assert torch.equal(decode_in_bands(other, z, ONE_ROW), other.decode(z, return_dict=False)[0])
        other.decoder.conv_act = torch.nn.SiLU()
        other.enable_tiling()  # diffusers' tiles: decoded as diffusers does
        assert not supports_bands(other)
        assert not supports_bands(torch.nn.Linear(2, 2))


def test_bands_lower_the_peak_of_the_real_sdxl_decode_at_1024():
    from benchmarks.architectures import vae as real_vae

    with torch.device("meta"):
        model = real_vae(0.13025)
    z = torch.zeros(1, 4, 128, 128, device="meta")
    diffusers_peak = decode_peak_gib(model, z, None)
    banded_peak = decode_peak_gib(model, z, 32)
    assert diffusers_peak == pytest.approx(3.0, abs=0.01)  # 256 channels at 1024², three of them at once
    assert banded_peak < 0.55 * diffusers_peak  # the last block's resnets hold their input and output only


def test_an_offloaded_vae_is_moved_by_its_hook_before_the_bands_run(vae):
    """accelerate's offloading moves a module to its device in a hook that diffusers' decode calls; the bands call
    the decoder's layers directly, so they call it too."""
    from types import SimpleNamespace

    moved = []
    vae._hf_hook = SimpleNamespace(pre_forward=moved.append)
    try:
        with torch.no_grad():
            decode_in_bands(vae, latents(8, 8), ONE_ROW)
    finally:
        del vae._hf_hook
    assert moved == [vae]


def test_a_vae_whose_layers_are_offloaded_one_by_one_decodes_whole():
    """accelerate's sequential offload leaves every layer's weights on ``meta`` until that layer's own hook runs;
    the bands read the weights directly, so such a VAE decodes as diffusers does."""
    from accelerate import cpu_offload

    offloaded, z = tiny_vae().eval(), latents(8, 8)
    with torch.no_grad():
        expected = offloaded.decode(z, return_dict=False)[0]
        cpu_offload(offloaded, execution_device=torch.device("cpu"))
        assert offloaded.decoder.conv_out.weight.device.type == "meta"
        assert not supports_bands(offloaded)
        assert torch.equal(decode_in_bands(offloaded, z, ONE_ROW), expected)
