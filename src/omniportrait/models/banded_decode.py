"""A VAE decode that holds about half the memory at its peak, computed in horizontal bands.

diffusers' KL decoder reaches its memory peak in the full-resolution up-block (SDXL at 1024², fp32: a 256-channel
input of 1 GiB, its GroupNorm output and its SiLU output side by side, 3 GiB of activations). Here the up-blocks
and the output head run the same layers band by band:

- GroupNorm's statistics are taken over the whole input first (per group mean and variance, combined from the
  bands with Chan et al.'s parallel formula), so each band is normalised exactly as the whole would be;
- normalisation, SiLU and the 3×3 convolution then run on one band of rows at a time, with the rows above and
  below that the kernel reaches (zeros at the image's edges, as the convolution's own padding), written into the
  output;
- the nearest-neighbour upsampler and its convolution likewise, and the residual is added in place.

So only a layer's input and output are whole at any time; the normalised, activated input exists one band at a
time. In the last, full-resolution up-block a resnet's middle activation (its first convolution's output) is not
kept whole either: it is made band by band twice, once for the second GroupNorm's statistics and once more, with
the rows the second convolution reaches, for that convolution. That costs the block's first convolutions a second
time and leaves the resnet's input and output alone at the peak. The result equals diffusers' decode up to floating-point rounding (the statistics and the per-band
convolutions sum in a different order). Decoders of another structure are decoded as diffusers does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from omniportrait.models.offload import has_offload_hooks_below, run_offload_hook

DEFAULT_BAND_MIB = 32  # a band of an activation, in fp32, holds at most about this many MiB


def decode_in_bands(vae, latents: torch.Tensor, band_mib: float = DEFAULT_BAND_MIB) -> torch.Tensor:
    """``vae.decode(latents)[0]`` (no grad), with the up-blocks and output head computed in bands of at most
    ``band_mib`` MiB (at least one row each)."""
    if not supports_bands(vae):
        return vae.decode(latents, return_dict=False)[0]
    run_offload_hook(vae)  # the VAE moved to its device, as diffusers' decode has it
    band_bytes = int(band_mib * 2**20)
    decoder = vae.decoder
    sample = vae.post_quant_conv(latents) if vae.post_quant_conv is not None else latents
    sample = decoder.mid_block(decoder.conv_in(sample), None).to(decoder.conv_out.weight.dtype)
    last = len(decoder.up_blocks) - 1
    for index, block in enumerate(decoder.up_blocks):
        resnet_layers = resnet_recomputed_in_bands if index == last else resnet_in_bands  # the largest tensors
        for resnet in block.resnets:
            sample = resnet_layers(resnet, sample, band_bytes)
        for upsampler in block.upsamplers or []:
            sample = upsample_in_bands(upsampler.conv, sample, band_bytes)
    return norm_act_conv(sample, decoder.conv_norm_out, decoder.conv_out, band_bytes)


def supports_bands(vae) -> bool:
    """A KL decoder made of the layers this module reimplements (diffusers' SD/SDXL VAEs), used without grad,
    tiling, a spatial norm or hooks on its layers."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
    from diffusers.models.upsampling import Upsample2D

    if not isinstance(vae, AutoencoderKL) or type(vae.decoder) is not Decoder:
        return False
    decoder = vae.decoder
    if torch.is_grad_enabled() or vae.use_tiling or has_offload_hooks_below(vae):  # the bands read the weights directly
        return False
    if not isinstance(decoder.conv_norm_out, nn.GroupNorm) or not isinstance(decoder.conv_act, nn.SiLU):
        return False
    for block in decoder.up_blocks:
        if type(block) is not UpDecoderBlock2D:
            return False
        if not all(type(resnet) is ResnetBlock2D and plain_resnet(resnet) for resnet in block.resnets):
            return False
        if not all(type(up) is Upsample2D and plain_upsampler(up) for up in block.upsamplers or []):
            return False
    return True


def plain_resnet(resnet) -> bool:
    """No time embedding, no resampling, GroupNorm + SiLU around 3×3 convolutions, a 1×1 shortcut if any."""
    return (resnet.time_emb_proj is None and resnet.upsample is None and resnet.downsample is None
            and isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm)
            and isinstance(resnet.nonlinearity, nn.SiLU) and same_size_conv(resnet.conv1)
            and same_size_conv(resnet.conv2) and resnet.dropout.p == 0
            and (resnet.conv_shortcut is None or resnet.conv_shortcut.kernel_size == (1, 1)))


def plain_upsampler(upsampler) -> bool:
    """Nearest ×2 interpolation followed by a 3×3 convolution."""
    return (upsampler.interpolate and upsampler.use_conv and not upsampler.use_conv_transpose
            and upsampler.norm is None and same_size_conv(getattr(upsampler, "conv", None)))


def same_size_conv(conv) -> bool:
    """A stride-1, zero-padded convolution that keeps the spatial size."""
    return (isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.padding == (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2))


def band_rows(tensor: torch.Tensor, band_bytes: int) -> int:
    """Rows per band so that a band of ``tensor``, in fp32, holds at most ``band_bytes`` (at least one row)."""
    row_bytes = 4 * tensor.shape[0] * tensor.shape[1] * tensor.shape[3]
    return max(1, band_bytes // row_bytes)


def bands(height: int, rows: int):
    """``(start, stop)`` of consecutive bands covering ``height`` rows."""
    for start in range(0, height, rows):
        yield start, min(start + rows, height)


def channel_moments(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel, the fp32 mean and biased variance of ``x`` ``(B, C, H, W)`` over ``H × W``, from
    bands of ``rows`` rows."""
    return moments_of_bands(x[:, :, start:stop] for start, stop in bands(x.shape[2], rows))


def moments_of_bands(row_bands: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel, the fp32 mean and biased variance over the rows and columns of consecutive bands
    ``(B, C, h, W)`` of one tensor, combined with Chan, Golub & LeVeque's pairwise update (an fp16 band is
    upcast on its own)."""
    count, mean, var = 0, None, None
    for band in row_bands:
        band_var, band_mean = torch.var_mean(band.float(), dim=(2, 3), correction=0)
        band_count = band.shape[2] * band.shape[3]
        if mean is None:
            count, mean, var = band_count, band_mean, band_var
            continue
        total = count + band_count
        delta = band_mean - mean
        mean = mean + delta * (band_count / total)
        var = (var * count + band_var * band_count + delta.square() * (count * band_count / total)) / total
        count = total
    return mean, var


def pooled_moments(mean: torch.Tensor, var: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and group, the mean and variance pooled from the channels' ``(B, C)`` moments (every channel
    counts the same number of points)."""
    mean, var = mean.unflatten(1, (groups, -1)), var.unflatten(1, (groups, -1))
    return mean.mean(-1), var.mean(-1) + mean.var(-1, correction=0)


def norm_scale_shift(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel ``(scale, shift)`` such that ``norm(x) = x · scale + shift``, in fp32."""
    return scale_shift(*channel_moments(x, rows), norm)


def scale_shift(mean: torch.Tensor, var: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm``'s per sample and channel ``(scale, shift)`` for an input whose channels have these moments."""
    channels = mean.shape[1]
    mean, var = pooled_moments(mean, var, norm.num_groups)
    per_group = channels // norm.num_groups
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1)
    mean = mean.repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.float() if norm.affine else rstd
    shift = -mean * scale + (norm.bias.float() if norm.affine else 0)
    return scale[:, :, None, None], shift[:, :, None, None]


def norm_act_conv(x: torch.Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, band_bytes: int) -> torch.Tensor:
    """``conv(silu(norm(x)))``, the normalised activation one band (plus the kernel's reach) at a time."""
    rows = band_rows(x, band_bytes)
    scale, shift = norm_scale_shift(x, norm, rows)
    out = x.new_empty((x.shape[0], conv.out_channels, *x.shape[2:]))
    for start, stop in bands(x.shape[2], rows):
        out[:, :, start:stop] = act_conv_rows(x, scale, shift, conv, start, stop)
    return out


def act_conv_rows(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, conv: nn.Conv2d, start: int,
                  stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``conv(silu(x · scale + shift))``, from the rows of ``x`` the kernel reaches."""
    reach = conv.padding[0]
    low, high = max(start - reach, 0), min(stop + reach, x.shape[2])
    band = F.silu(torch.addcmul(shift, x[:, :, low:high], scale), inplace=True).to(x.dtype)
    return conv_rows(band, conv, reach - (start - low), reach - (high - stop))


def conv_rows(band: torch.Tensor, conv: nn.Conv2d, pad_top: int, pad_bottom: int) -> torch.Tensor:
    """``conv`` over a band that already carries its neighbouring rows; zero rows stand in at the image's edges."""
    if pad_top or pad_bottom:
        band = F.pad(band, (0, 0, pad_top, pad_bottom))
    return F.conv2d(band, conv.weight, conv.bias, padding=(0, conv.padding[1]))


def resnet_in_bands(resnet, x: torch.Tensor, band_bytes: int) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D`` without time embedding: ``(shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))))
    / output_scale_factor``, the residual added in place band by band."""
    hidden = norm_act_conv(x, resnet.norm1, resnet.conv1, band_bytes)
    out = norm_act_conv(hidden, resnet.norm2, resnet.conv2, band_bytes)
    del hidden
    return add_shortcut(resnet, x, out, band_rows(x, band_bytes))


def resnet_recomputed_in_bands(resnet, x: torch.Tensor, band_bytes: int) -> torch.Tensor:
    """:func:`resnet_in_bands` without ``conv1``'s output whole: its bands are made once for ``norm2``'s
    statistics and again, with the rows ``conv2`` reaches, for ``conv2``."""
    rows, height = band_rows(x, band_bytes), x.shape[2]
    scale1, shift1 = norm_scale_shift(x, resnet.norm1, rows)
    hidden_bands = (act_conv_rows(x, scale1, shift1, resnet.conv1, start, stop) for start, stop in bands(height, rows))
    scale2, shift2 = scale_shift(*moments_of_bands(hidden_bands), resnet.norm2)
    reach = resnet.conv2.padding[0]
    out = x.new_empty((x.shape[0], resnet.conv2.out_channels, *x.shape[2:]))
    for start, stop in bands(height, rows):
        low, high = max(start - reach, 0), min(stop + reach, height)
        hidden = act_conv_rows(x, scale1, shift1, resnet.conv1, low, high)
        band = F.silu(torch.addcmul(shift2, hidden, scale2), inplace=True).to(x.dtype)
        out[:, :, start:stop] = conv_rows(band, resnet.conv2, reach - (start - low), reach - (high - stop))
    return add_shortcut(resnet, x, out, rows)


def add_shortcut(resnet, x: torch.Tensor, out: torch.Tensor, rows: int) -> torch.Tensor:
    """``(out + shortcut(x)) / output_scale_factor`` in place, band by band."""
    for start, stop in bands(x.shape[2], rows):
        skip = x[:, :, start:stop]
        out[:, :, start:stop] += resnet.conv_shortcut(skip) if resnet.conv_shortcut is not None else skip
    if resnet.output_scale_factor != 1:
        out /= resnet.output_scale_factor
    return out


def upsample_in_bands(conv: nn.Conv2d, x: torch.Tensor, band_bytes: int) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` without the whole upsampled input: each band of
    output rows upsamples only the input rows it reaches."""
    height = 2 * x.shape[2]
    rows = max(1, band_rows(x, band_bytes) // 2)  # output rows are twice as wide
    reach = conv.padding[0]
    out = x.new_empty((x.shape[0], conv.out_channels, height, 2 * x.shape[3]))
    for start, stop in bands(height, rows):
        low, high = max(start - reach, 0), min(stop + reach, height)
        source = x[:, :, low // 2 : (high + 1) // 2]
        band = F.interpolate(source, scale_factor=2.0, mode="nearest")[:, :, low - low // 2 * 2 :][:, :, : high - low]
        out[:, :, start:stop] = conv_rows(band, conv, reach - (start - low), reach - (high - stop))
    return out
