"""Tiny real components built offline from small configs with fixed seeds.

They back the ``tiny-sd15`` / ``tiny-sdxl`` presets and the test suite: the same classes as the real
checkpoints (UNet, VAE, CLIP text and vision towers, CLIP BPE tokenizer), only much smaller, so every code
path runs in seconds on a CPU without any download. The UNet keeps the block layout of the real model
(SD1.5: cross-attention in down blocks 0-2 and up blocks 1-3; SDXL: in down blocks 1-2 and up blocks 0-1)
so that layer-selecting defaults (the DIFT block index, the attention resolution latent/4) mean the same
thing on both sizes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from omniportrait.models.pivot_encoder import PivotIDEncoder

TINY_SEED = 0
TINY_IMAGE_SIZE = 64
TINY_TEXT_WIDTH = 32

# Words that get a single BPE token in the tiny vocabulary; any other word is spelled letter by letter,
# which exercises multi-token class words.
WHOLE_WORDS = (
    "a an the and on in at of with by to is her his their photo portrait picture of "
    "woman man person girl boy lady child people women men wearing riding sitting standing "
    "beach city street park forest snow night sunset red blue black white hat"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable-unicode map used by byte-level BPE (GPT-2 / CLIP tokenizers)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    offset = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + offset)
            offset += 1
    return {byte: chr(code) for byte, code in zip(printable, chars)}


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that fuse ``word</w>`` into one token."""
    merges, current = [], word[0]
    for index, char in enumerate(word[1:], start=1):
        nxt = char + "</w>" if index == len(word) - 1 else char
        merges.append((current, nxt))
        current += nxt
    return merges


def write_tiny_tokenizer_files(folder: Path) -> Path:
    """Write a small CLIP BPE vocabulary (every byte, plus :data:`WHOLE_WORDS`) into ``folder``."""
    symbols = list(bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    # Longer words first: BPE applies the lowest-ranked merge first, so a short word's merges ("an")
    # must not break the chain of a longer one ("woman").
    for word in sorted(dict.fromkeys(w for w in WHOLE_WORDS if len(w) > 1), key=len, reverse=True):
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
                vocab_tokens.append(left + right)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


@lru_cache(maxsize=None)
def _tokenizer_folder() -> Path:
    return write_tiny_tokenizer_files(Path(tempfile.mkdtemp(prefix="omniportrait-tiny-tok-")))


def tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    folder = _tokenizer_folder()
    return CLIPTokenizer.from_pretrained(
        str(folder), pad_token=pad_token, model_max_length=77, local_files_only=True
    )


def tiny_text_config(vocab_size: int, projection_dim: int = TINY_TEXT_WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(TINY_SEED)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_IMAGE_SIZE,
    )


def tiny_unet(arch: str) -> UNet2DConditionModel:
    """SD1.5 layout: 4 levels, cross-attention in the first three; SDXL layout: 3 levels, in the last two.

    As in the real models, the deepest cross-attention level sits at latent/4 (SD1.5 ``down_blocks.2`` /
    ``up_blocks.1``; SDXL ``down_blocks.2``, ``mid_block``, ``up_blocks.0``).
    """
    torch.manual_seed(TINY_SEED)
    common = dict(
        layers_per_block=1,
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        norm_num_groups=16,
        attention_head_dim=2,
    )
    if arch == "sd15":
        return UNet2DConditionModel(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_TEXT_WIDTH,
            **common,
        )
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TINY_TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_WIDTH,
        **common,
    )


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = TINY_SEED) -> ControlNetModel:
    """A ControlNet made from ``unet`` as ``ControlNetModel.from_unet`` makes one, with its zero-initialised
    convolutions (the outputs and the control image's embedding) set to small random values so that its residuals change the image (a trained ControlNet's do). Its
    conditioning embedding downsamples the control image by 2, the tiny VAE's factor."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero_initialised = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                            controlnet.controlnet_cond_embedding.conv_out]
        for block in zero_initialised:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.05)
    return controlnet


def tiny_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's training schedule (scaled-linear betas 0.00085..0.012, T=1000)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def tiny_pivot_encoder(text_width: int) -> PivotIDEncoder:
    torch.manual_seed(TINY_SEED)
    return PivotIDEncoder(vision_config=tiny_vision_config().to_dict(), text_width=text_width)


@dataclass
class TinyComponents:
    """Keyword arguments for a diffusers pipeline constructor, plus the matching pivot encoder."""

    components: dict
    pivot_encoder: PivotIDEncoder


def tiny_components(arch: str) -> TinyComponents:
    """All components of a tiny SD1.5 (``arch="sd15"``) or SDXL (``arch="sdxl"``) pipeline."""
    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"arch must be 'sd15' or 'sdxl', got {arch!r}")
    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)
    torch.manual_seed(TINY_SEED)
    components = dict(unet=tiny_unet(arch), vae=tiny_vae(), scheduler=tiny_scheduler(), tokenizer=tokenizer)
    if arch == "sd15":
        torch.manual_seed(TINY_SEED)
        components.update(
            text_encoder=CLIPTextModel(tiny_text_config(vocab_size)),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        return TinyComponents(components, tiny_pivot_encoder(TINY_TEXT_WIDTH))
    torch.manual_seed(TINY_SEED)
    components["text_encoder"] = CLIPTextModel(tiny_text_config(vocab_size))
    torch.manual_seed(TINY_SEED + 1)
    components["text_encoder_2"] = CLIPTextModelWithProjection(tiny_text_config(vocab_size))
    components["tokenizer_2"] = tiny_tokenizer(pad_token="!")
    return TinyComponents(components, tiny_pivot_encoder(2 * TINY_TEXT_WIDTH))


def tiny_image_encoder() -> tuple:
    """A tiny CLIP image tower with projection and its processor (32×32 crops): the ``image_encoder`` and
    ``feature_extractor`` an IP-Adapter needs, built offline."""
    from transformers import CLIPVisionModelWithProjection

    try:  # the PIL processor where transformers has one: the default one asks for torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    torch.manual_seed(TINY_SEED)
    encoder = CLIPVisionModelWithProjection(tiny_vision_config())
    side = tiny_vision_config().image_size
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return encoder, processor


def tiny_ip_adapter(unet: UNet2DConditionModel, image_embed_dim: int, seed: int = TINY_SEED) -> dict:
    """A random IP-Adapter state dict for ``unet`` in the layout of the released checkpoints: ``image_proj``
    (a linear map of the image embedding to 4 tokens, and their LayerNorm) and ``ip_adapter`` (``to_k_ip`` and
    ``to_v_ip`` of every cross-attention layer, numbered 1, 3, 5, … in the UNet's processor order)."""
    generator = torch.Generator().manual_seed(seed)
    width, tokens = unet.config.cross_attention_dim, 4

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.05

    image_proj = {"proj.weight": random(width * tokens, image_embed_dim), "proj.bias": random(width * tokens),
                  "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _attention_width(unet, name)
        ip_adapter[f"{key_id}.to_k_ip.weight"] = random(hidden, width)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = random(hidden, width)
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _attention_width(unet: UNet2DConditionModel, processor_name: str) -> int:
    """The channel width of the attention layer ``processor_name`` (as diffusers' IP-Adapter loader finds it)."""
    widths = unet.config.block_out_channels
    if processor_name.startswith("mid_block"):
        return widths[-1]
    block = int(processor_name.split(".")[1])
    return list(reversed(widths))[block] if processor_name.startswith("up_blocks") else widths[block]
