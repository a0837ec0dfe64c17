"""Real SD1.5 and SDXL architectures with random weights, built from configs (no download).

Speed and memory do not depend on weight values, so these give the real cost of our pipelines
(``python -m benchmarks.bench --models random-sd15 random-sdxl``); built on ``meta`` they cost nothing and let
``benchmarks/count.py`` count memory and FLOPs on any CPU.
Shapes follow the published model configs: SD1.5 UNet 860M (320-640-1280-1280, text width 768), SDXL UNet
2.6B (320-640-1280, transformer depth 1-2-10, text width 2048), the KL VAE, CLIP-L (and OpenCLIP bigG for
SDXL) text encoders, and a ViT-L/14 Pivot ID Encoder. The tokenizer is the tiny offline one.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from omniportrait.models.pivot_encoder import PivotIDEncoder
from omniportrait.models.tiny import tiny_scheduler, tiny_tokenizer

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280)


def text_encoder(cls, shape: dict):
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", **shape)
    return cls(config)


def vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
        scaling_factor=scaling_factor,
    )


SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**SD15_UNET)


def sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**SDXL_UNET)


def real_components(arch: str, dtype: torch.dtype = torch.float16, device: str = "cuda") -> tuple[dict, PivotIDEncoder]:
    """Pipeline components and a Pivot ID Encoder of the real ``sd15`` / ``sdxl`` shapes, random weights."""
    torch.manual_seed(0)
    with torch.device(device):
        parts = dict(scheduler=tiny_scheduler(), tokenizer=tiny_tokenizer())
        if arch == "sd15":
            parts.update(unet=sd15_unet(), vae=vae(0.18215), text_encoder=text_encoder(CLIPTextModel, CLIP_L),
                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pie = PivotIDEncoder(text_width=768)
        else:
            parts.update(unet=sdxl_unet(), vae=vae(0.13025), text_encoder=text_encoder(CLIPTextModel, CLIP_L),
                         text_encoder_2=text_encoder(CLIPTextModelWithProjection, OPENCLIP_BIGG),
                         tokenizer_2=tiny_tokenizer(pad_token="!"))
            pie = PivotIDEncoder(text_width=2048)
    for module in [*parts.values(), pie]:
        if isinstance(module, torch.nn.Module):
            module.to(device, dtype).eval().requires_grad_(False)
    return parts, pie
