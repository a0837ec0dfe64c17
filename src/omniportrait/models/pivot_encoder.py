"""The Pivot ID Encoder (paper §3.2).

A CLIP vision tower turns the aligned reference face crop into ``e_ref``; a fusion module mixes it with the
text-encoder output ``e_txt`` of the class word into ``e_mix``, which then replaces ``e_txt`` in the prompt
embeddings (post-fusion, DESIGN §2). For SDXL ``e_txt`` is the per-token concatenation of both text encoders'
states (768 + 1280 = 2048 wide).

Two fusions (the config's ``fusion``):

* ``linear`` (the paper's, the default): ``e_mix = W · concat(e_ref, e_txt) + b``.
* ``mlp`` (PhotoMaker v1's ``FuseModule``, TencentARC/PhotoMaker ``photomaker/model.py``): two
  LayerNorm → Linear → GELU → Linear blocks and a final LayerNorm. The first block takes
  ``concat(e_txt, e_ref)`` (text first) and its output is added to ``e_txt``; the second adds its input
  (residual); the LayerNorm closes. PhotoMaker's ``e_ref`` is the pooled CLIP output through two
  projections, 768 and 1280 wide, concatenated (the config's ``second_projection_dim`` = 1280).
  :mod:`omniportrait.models.photomaker` converts its checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

# OpenAI / OpenCLIP image normalisation constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP ViT-L/14 vision tower (the paper's OpenCLIP laion2B ViT-L/14 has this shape).
VIT_L_14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="gelu",
)


FUSIONS = ("linear", "mlp")
"""``linear``: the paper's one Linear over ``concat(e_ref, e_txt)``; ``mlp``: PhotoMaker v1's fuse module."""


class FusionBlock(nn.Module):
    """LayerNorm → Linear → GELU → Linear, plus the input when ``residual`` (one block of PhotoMaker's fuse
    module; its attribute names ``layernorm``, ``fc1``, ``fc2`` are the checkpoint's)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, residual: bool):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual fusion block needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class MLPFusion(nn.Module):
    """PhotoMaker v1's fusion: ``e = mlp1(concat(e_txt, e_ref)) + e_txt``; ``e_mix = layer_norm(mlp2(e))`` with
    ``mlp1`` not residual and ``mlp2`` residual (``FuseModule.fuse_fn``, TencentARC/PhotoMaker model.py)."""

    def __init__(self, ref_width: int, text_width: int, hidden_dim: int):
        super().__init__()
        self.mlp1 = FusionBlock(text_width + ref_width, hidden_dim, text_width, residual=False)
        self.mlp2 = FusionBlock(text_width, hidden_dim, text_width, residual=True)
        self.layer_norm = nn.LayerNorm(text_width)

    def forward(self, e_ref: torch.Tensor, e_txt: torch.Tensor) -> torch.Tensor:
        mixed = self.mlp1(torch.cat([e_txt, e_ref], dim=-1)) + e_txt
        return self.layer_norm(self.mlp2(mixed))


class LinearFusion(nn.Linear):
    """The paper's fusion: ``e_mix = W · concat(e_ref, e_txt) + b`` (its tensors are ``weight`` and ``bias``)."""

    def __init__(self, ref_width: int, text_width: int):
        super().__init__(ref_width + text_width, text_width)

    def forward(self, e_ref: torch.Tensor, e_txt: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.cat([e_ref, e_txt], dim=-1))


class PivotIDEncoder(ModelMixin, ConfigMixin):
    """CLIP vision tower + fusion producing the mixed pivot embedding ``e_mix``.

    Args:
        vision_config: keyword arguments of :class:`transformers.CLIPVisionConfig` (default ViT-L/14).
        text_width: width of the text embedding it fuses with (768 for SD1.5, 2048 for SDXL).
        fusion: ``linear`` (the paper's) or ``mlp`` (PhotoMaker v1's), see :data:`FUSIONS`.
        second_projection_dim: width of a second projection of the pooled CLIP output whose result is
            concatenated to the first's in ``e_ref`` (PhotoMaker: 1280); 0 = none.
        fusion_hidden_dim: hidden width of the ``mlp`` fusion blocks (default: ``text_width``, as PhotoMaker).
        trained_with_localization_loss: set by training when the face localization loss (eq. 5) was on, so that the
            class word's attention marks the face and RB-Guidance's ``auto`` mask source uses it (DESIGN §2).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, vision_config: dict | None = None, text_width: int = 768, fusion: str = "linear",
                 second_projection_dim: int = 0, fusion_hidden_dim: int | None = None,
                 trained_with_localization_loss: bool = False):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        config = CLIPVisionConfig(**(vision_config or VIT_L_14))
        self.vision = CLIPVisionModelWithProjection(config)
        self.projection_2 = (nn.Linear(config.hidden_size, second_projection_dim, bias=False)
                             if second_projection_dim else None)
        ref_width = config.projection_dim + second_projection_dim
        if fusion == "mlp":
            self.fuse = MLPFusion(ref_width, text_width, fusion_hidden_dim or text_width)
        else:
            self.fuse = LinearFusion(ref_width, text_width)

    @classmethod
    def from_photomaker(cls, path) -> "PivotIDEncoder":
        """The ``mlp``-fusion encoder of a PhotoMaker v1 checkpoint (``.bin`` or ``.safetensors``), its
        dimensions read from the weights; its UNet LoRA is not part of it (see
        :mod:`omniportrait.models.photomaker`)."""
        from omniportrait.models.photomaker import encoder_from_checkpoint, read_checkpoint

        return encoder_from_checkpoint(read_checkpoint(path))

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    @property
    def ref_width(self) -> int:
        """Width of ``e_ref``: the projection's, plus the second projection's if any."""
        return self.vision.config.projection_dim + self.config.second_projection_dim

    def init_fusion_as_identity(self) -> None:
        """Start training from ``e_mix = e_txt`` (text-only behaviour), the image part at zero. Only the linear
        fusion can start there (the ``mlp`` fusion ends in a LayerNorm)."""
        if self.config.fusion != "linear":
            raise ValueError(f"only the linear fusion can be initialised as the identity, not {self.config.fusion}")
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
        """``e_ref`` ``(N, ref_width)``: the pooled CLIP output through the projection (CLIP's ``image_embeds``),
        concatenated with its second projection when there is one (PhotoMaker's ``id_embeds``)."""
        pooled = self.vision.vision_model(pixel_values=pixel_values.to(self.dtype)).pooler_output
        e_ref = self.vision.visual_projection(pooled)
        if self.projection_2 is not None:
            e_ref = torch.cat([e_ref, self.projection_2(pooled)], dim=-1)
        return e_ref

    def fuse_embeddings(self, e_ref: torch.Tensor, e_txt: torch.Tensor) -> torch.Tensor:
        """``e_mix`` from ``e_ref`` ``(N, P)`` and ``e_txt`` ``(N, D)`` or ``(N, K, D)`` (``e_ref`` broadcasts over
        the K tokens), in ``e_txt``'s dtype; the fusion runs in its own."""
        if e_txt.dim() == 3:
            e_ref = e_ref[:, None, :].expand(-1, e_txt.shape[1], -1)
        dtype = next(self.fuse.parameters()).dtype
        return self.fuse(e_ref.to(dtype), e_txt.to(dtype)).to(e_txt.dtype)

    def forward(self, pixel_values: torch.Tensor, e_txt: torch.Tensor) -> torch.Tensor:
        return self.fuse_embeddings(self.encode_image(pixel_values), e_txt)
