"""The Pivot ID Encoder (paper §3.2).

A CLIP vision tower turns the aligned reference face crop into ``e_ref``; a linear layer fuses it with the
text-encoder output ``e_txt`` of the class word: ``e_mix = W · concat(e_ref, e_txt) + b``. ``e_mix`` then
replaces ``e_txt`` in the prompt embeddings (post-fusion, DESIGN §2). For SDXL ``e_txt`` is the per-token
concatenation of both text encoders' states (768 + 1280 = 2048 wide).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

# OpenAI / OpenCLIP image normalisation constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP ViT-L/14 vision tower (the paper's OpenCLIP laion2B ViT-L/14 has this shape).
VIT_L_14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="gelu",
)


class PivotIDEncoder(ModelMixin, ConfigMixin):
    """CLIP vision tower + linear fusion producing the mixed pivot embedding ``e_mix``.

    Args:
        vision_config: keyword arguments of :class:`transformers.CLIPVisionConfig` (default ViT-L/14).
        text_width: width of the text embedding it fuses with (768 for SD1.5, 2048 for SDXL).
        trained_with_localization_loss: set by training when the face localization loss (eq. 5) was on, so that the
            class word's attention marks the face and RB-Guidance's ``auto`` mask source uses it (DESIGN §2).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, vision_config: dict | None = None, text_width: int = 768,
                 trained_with_localization_loss: bool = False):
        super().__init__()
        config = CLIPVisionConfig(**(vision_config or VIT_L_14))
        self.vision = CLIPVisionModelWithProjection(config)
        self.fuse = nn.Linear(config.projection_dim + text_width, text_width)

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    def init_fusion_as_identity(self) -> None:
        """Start training from ``e_mix = e_txt`` (text-only behaviour), the image part at zero."""
        text_width = self.config.text_width
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.weight[:, -text_width:] = torch.eye(text_width)
            self.fuse.bias.zero_()

    def preprocess(self, faces: list[Image.Image], device: torch.device | None = None) -> torch.Tensor:
        """Aligned face crops -> normalised ``(N, 3, S, S)`` pixel tensor on ``device`` (default: this module's; a
        pipeline passes the device the offloading, if any, runs the module on: ``models.offload.input_device``)."""
        size = self.image_size
        arrays = [np.asarray(face.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0
                  for face in faces]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(device=device or self.device, dtype=self.dtype)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``e_ref``: the projected CLIP image embedding, ``(N, projection_dim)``."""
        return self.vision(pixel_values=pixel_values.to(self.dtype)).image_embeds

    def fuse_embeddings(self, e_ref: torch.Tensor, e_txt: torch.Tensor) -> torch.Tensor:
        """``e_mix = Linear(concat(e_ref, e_txt))``; ``e_ref`` ``(N, P)`` broadcasts over ``e_txt`` ``(N, K, D)``."""
        e_ref = e_ref.to(e_txt.dtype)
        if e_txt.dim() == 3:
            e_ref = e_ref[:, None, :].expand(-1, e_txt.shape[1], -1)
        return self.fuse(torch.cat([e_ref, e_txt], dim=-1).to(self.fuse.weight.dtype)).to(e_txt.dtype)

    def forward(self, pixel_values: torch.Tensor, e_txt: torch.Tensor) -> torch.Tensor:
        return self.fuse_embeddings(self.encode_image(pixel_values), e_txt)
