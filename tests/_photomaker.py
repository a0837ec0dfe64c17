"""Tiny random checkpoints in PhotoMaker v1's layout and a reference of its fused embedding.

Layout (TencentARC/PhotoMaker ``photomaker/model.py``): ``id_encoder`` holds a CLIP vision tower with projection
(``vision_model.*``, ``visual_projection.weight``), ``visual_projection_2.weight`` and ``fuse_module.*``;
``lora_weights`` a UNet LoRA in diffusers' attention-processor format. Dimensions scaled down so that
``id_embeds`` (both projections) and the fused text state are 2 × TINY_TEXT_WIDTH wide, the tiny SDXL's.

The reference is written from the paper-level description, not from our module: ``e_ref`` = concat of the
two projections of the pooled CLIP output; block(x) = fc2(GELU(fc1(LayerNorm(x)))); the first block takes
concat(text, e_ref) and is added to the text state, the second is residual, then a LayerNorm.
"""

from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from omniportrait.models.tiny import TINY_TEXT_WIDTH

TEXT = 2 * TINY_TEXT_WIDTH
PROJECTION = 24
PROJECTION_2 = TEXT - PROJECTION
FUSION_HIDDEN = 48
LORA_RANK = 4


def tiny_photomaker_vision_config() -> CLIPVisionConfig:
    """ViT-L/14's shape scaled down: 64-wide heads (one), patch 8 on 32², quick_gelu (CLIP's default)."""
    return CLIPVisionConfig(hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=1,
                            image_size=32, patch_size=8, projection_dim=PROJECTION)


def _random(generator: torch.Generator, *shape: int, scale: float = 0.1, around: float = 0.0) -> torch.Tensor:
    return around + scale * torch.randn(shape, generator=generator)


def tiny_id_encoder_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``id_encoder`` state dict with PhotoMaker's keys (LayerNorms random too, so they matter)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vision = CLIPVisionModelWithProjection(tiny_photomaker_vision_config())
    state = {key: value.clone() for key, value in vision.state_dict().items()}
    state["visual_projection_2.weight"] = _random(generator, PROJECTION_2, 64)
    for block, width_in in (("mlp1", 2 * TEXT), ("mlp2", TEXT)):
        state[f"fuse_module.{block}.layernorm.weight"] = _random(generator, width_in, around=1.0)
        state[f"fuse_module.{block}.layernorm.bias"] = _random(generator, width_in)
        state[f"fuse_module.{block}.fc1.weight"] = _random(generator, FUSION_HIDDEN, width_in)
        state[f"fuse_module.{block}.fc1.bias"] = _random(generator, FUSION_HIDDEN)
        state[f"fuse_module.{block}.fc2.weight"] = _random(generator, TEXT, FUSION_HIDDEN)
        state[f"fuse_module.{block}.fc2.bias"] = _random(generator, TEXT)
    state["fuse_module.layer_norm.weight"] = _random(generator, TEXT, around=1.0)
    state["fuse_module.layer_norm.bias"] = _random(generator, TEXT)
    return state


def tiny_lora_state(unet, seed: int = 1) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on every attention projection of ``unet``, under PhotoMaker's key names."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(("attn1", "attn2")):
            continue
        for proj, linear in (("to_q", module.to_q), ("to_k", module.to_k), ("to_v", module.to_v),
                             ("to_out", module.to_out[0])):
            key = f"unet.{name}.processor.{proj}_lora"
            state[f"{key}.down.weight"] = _random(generator, LORA_RANK, linear.in_features, scale=0.3)
            state[f"{key}.up.weight"] = _random(generator, linear.out_features, LORA_RANK, scale=0.3)
    return state


def write_bin(path: Path, id_encoder: dict, lora: dict | None) -> Path:
    """The ``.bin`` form: ``torch.save`` of a dict of tensor dicts."""
    checkpoint = {"id_encoder": id_encoder}
    if lora is not None:
        checkpoint["lora_weights"] = lora
    torch.save(checkpoint, path)
    return path


def write_safetensors(path: Path, id_encoder: dict, lora: dict | None) -> Path:
    """The ``.safetensors`` form: the same tensors, flat, under ``id_encoder.`` and ``lora_weights.``."""
    from safetensors.torch import save_file

    flat = {f"id_encoder.{key}": value.contiguous() for key, value in id_encoder.items()}
    flat.update({f"lora_weights.{key}": value.contiguous() for key, value in (lora or {}).items()})
    save_file(flat, str(path))
    return path


def _block(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    normed = F.layer_norm(x, x.shape[-1:], state[f"{prefix}.layernorm.weight"], state[f"{prefix}.layernorm.bias"])
    hidden = F.gelu(F.linear(normed, state[f"{prefix}.fc1.weight"], state[f"{prefix}.fc1.bias"]))
    return F.linear(hidden, state[f"{prefix}.fc2.weight"], state[f"{prefix}.fc2.bias"])


@torch.no_grad()
def reference_fused(state: dict, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """PhotoMaker's fused class-token embedding for one image per row: ``pixels`` ``(N, 3, S, S)``,
    ``text`` ``(N, TEXT)``."""
    vision = CLIPVisionModelWithProjection(tiny_photomaker_vision_config())
    vision.load_state_dict({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))})
    pooled = vision.eval().vision_model(pixel_values=pixels).pooler_output
    id_embeds = torch.cat([F.linear(pooled, state["visual_projection.weight"]),
                           F.linear(pooled, state["visual_projection_2.weight"])], dim=-1)
    mixed = _block(state, "fuse_module.mlp1", torch.cat([text, id_embeds], dim=-1)) + text
    mixed = _block(state, "fuse_module.mlp2", mixed) + mixed
    return F.layer_norm(mixed, mixed.shape[-1:], state["fuse_module.layer_norm.weight"],
                        state["fuse_module.layer_norm.bias"])
