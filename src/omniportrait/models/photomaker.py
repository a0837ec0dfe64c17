"""PhotoMaker v1 checkpoints as Pivot ID Encoders (a public pivot, DESIGN §3).

PhotoMaker v1 (``TencentARC/PhotoMaker``, ``photomaker-v1.bin``, Apache-2.0, SDXL) has the paper's Pivot ID
Encoder architecture with an MLP fusion. Facts read from TencentARC/PhotoMaker ``photomaker/model.py`` and
``photomaker/pipeline.py`` (v1):

* The checkpoint is a torch pickle of ``{"id_encoder": state dict, "lora_weights": state dict}``; its
  ``.safetensors`` form holds the same tensors as ``id_encoder.KEY`` and ``lora_weights.KEY``.
* ``id_encoder`` is a ``CLIPVisionModelWithProjection`` (ViT-L/14: 1024 wide, 24 layers, 16 heads, patch 14,
  224², projection 768; ``hidden_act`` left at transformers' default ``quick_gelu``) with two extra parts:
  ``visual_projection_2`` (1024 → 1280, no bias) and ``fuse_module`` (``mlp1``, ``mlp2`` each with
  ``layernorm``, ``fc1``, ``fc2``; then ``layer_norm``). ``id_embeds`` = concat(visual_projection(pooled),
  visual_projection_2(pooled)) = 2048 wide; ``fuse_fn`` = ``layer_norm(mlp2(mlp1(concat(text, id)) + text))``
  with ``mlp1`` not residual (4096 → 2048 → 2048) and ``mlp2`` residual (2048 → 2048 → 2048); GELU is exact.
* The text state it fuses with is SDXL's per-token concat of both encoders' penultimate states (2048), so
  the converted encoder is for SDXL only.
* Images go through transformers' default ``CLIPImageProcessor`` (224², OpenAI CLIP mean/std), as our
  :meth:`~omniportrait.models.pivot_encoder.PivotIDEncoder.preprocess` does for a square aligned crop.
* ``lora_weights`` is a UNet LoRA (rank 64, every attention layer) in diffusers' attention-processor format
  (``unet.….attn1.processor.to_q_lora.down.weight``), which ``load_lora_weights`` reads.

One difference: PhotoMaker finds the class word through a trigger word written after it ("a man img"),
which it removes from the prompt; OmniPortrait binds the class word itself (``--identity PHOTO:man``), so
prompts need no trigger word. PhotoMaker also stacks several photos of one person as repeated class tokens;
we fuse one reference per identity.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omniportrait.errors import ConfigError

if TYPE_CHECKING:  # importing this module stays cheap (the CLI checks paths with it before loading torch)
    import torch

ID_ENCODER = "id_encoder"
LORA_WEIGHTS = "lora_weights"
LORA_FILE = "photomaker_lora.safetensors"
"""The UNet LoRA beside a converted encoder's weights; ``--pivot-encoder FOLDER`` loads it with the encoder."""
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
HEAD_WIDTH = 64
"""Width of one attention head of CLIP ViT-L/14 (1024 / 16 heads); the weights do not record the head count."""
HIDDEN_ACT = "quick_gelu"
"""PhotoMaker's vision config does not set ``hidden_act``, so it is ``CLIPVisionConfig``'s default."""
SKIPPED_KEYS = ("vision_model.embeddings.position_ids",)
"""A buffer older transformers saved with CLIP; not a weight."""
REQUIRED_KEYS = (
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
    "vision_model.post_layernorm.weight",
    "visual_projection.weight",
    "visual_projection_2.weight",
    "fuse_module.mlp1.layernorm.weight",
    "fuse_module.mlp1.fc1.weight",
    "fuse_module.mlp1.fc2.weight",
    "fuse_module.mlp2.layernorm.weight",
    "fuse_module.mlp2.fc1.weight",
    "fuse_module.mlp2.fc2.weight",
    "fuse_module.layer_norm.weight",
)
"""The ``id_encoder`` tensors the conversion reads dimensions from; the rest are checked when loading."""
OUR_PREFIXES = {"vision_model.": "vision.vision_model.", "visual_projection.": "vision.visual_projection.",
                "visual_projection_2.": "projection_2.", "fuse_module.": "fuse."}
"""PhotoMaker ``id_encoder`` key prefix → :class:`PivotIDEncoder` key prefix (longest match first)."""
OLD_LORA_KEY = re.compile(r"(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)"
                          r"\.weight")
"""A LoRA tensor in diffusers' attention-processor format, as PhotoMaker ships it."""


@dataclass(frozen=True)
class PhotoMakerCheckpoint:
    """The two parts of a PhotoMaker v1 file: the ID encoder's state and the UNet LoRA (``None`` when absent)."""

    path: Path
    id_encoder: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class ConvertedPhotoMaker:
    """Where ``omniportrait convert photomaker`` wrote the encoder folder and its LoRA (``None`` when absent)."""

    folder: Path
    lora: Path | None


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` names a file (a PhotoMaker checkpoint) rather than an encoder folder."""
    file = Path(path).expanduser()
    return file.suffix in CHECKPOINT_SUFFIXES and not file.is_dir()


def check_pivot_path(value: str) -> Path:
    """A ``--pivot-encoder`` value: an existing folder, or an existing PhotoMaker checkpoint file
    (:data:`CHECKPOINT_SUFFIXES`); ``ConfigError`` saying which it is not."""
    path = Path(value).expanduser()
    if not str(value).strip():
        raise ConfigError("the pivot encoder path is empty")
    if not path.exists():
        raise ConfigError(f"{value} does not exist")
    if path.is_dir():
        return path
    if path.suffix not in CHECKPOINT_SUFFIXES or not path.is_file():
        raise ConfigError(f"{value} is neither a pivot encoder folder nor a PhotoMaker checkpoint "
                          f"({', '.join(CHECKPOINT_SUFFIXES)})")
    return path


def read_checkpoint(path: str | Path) -> PhotoMakerCheckpoint:
    """The checked parts of a PhotoMaker v1 ``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``.
    ``ConfigError`` naming what is missing when it is not one."""
    from omniportrait.checks import check_torch_file, read_safetensors_header

    file = Path(path).expanduser()
    what = "PhotoMaker checkpoint"
    if file.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"{path} is not a PhotoMaker checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}); "
                          "download photomaker-v1.bin from TencentARC/PhotoMaker")
    if file.suffix == ".safetensors":
        read_safetensors_header(file, what)  # complete, a safetensors file
        parts = _split_flat(_load_safetensors(file))
    else:
        loaded = check_torch_file(file, what)
        parts = loaded if isinstance(loaded, dict) else {}
    id_encoder = parts.get(ID_ENCODER)
    if not isinstance(id_encoder, dict) or not id_encoder:
        raise ConfigError(f"{what} {path} has no {ID_ENCODER} weights; it is not a PhotoMaker v1 checkpoint "
                          f"(it should hold {ID_ENCODER} and {LORA_WEIGHTS}, as TencentARC/PhotoMaker "
                          "photomaker-v1.bin does)")
    missing = [key for key in REQUIRED_KEYS if key not in id_encoder]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConfigError(f"{what} {path}: its {ID_ENCODER} lacks {shown}; it is not a PhotoMaker v1 ID encoder")
    lora = parts.get(LORA_WEIGHTS) or None
    return PhotoMakerCheckpoint(file, dict(id_encoder), dict(lora) if isinstance(lora, dict) else None)


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; all are the file's fault
        raise ConfigError(f"PhotoMaker checkpoint {file} cannot be read ({str(err)[:160]})") from None


def _split_flat(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"id_encoder.KEY": t, "lora_weights.KEY": t}`` → ``{"id_encoder": {KEY: t}, "lora_weights": {KEY: t}}``."""
    parts: dict[str, dict[str, torch.Tensor]] = {ID_ENCODER: {}, LORA_WEIGHTS: {}}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        if part in parts and rest:
            parts[part][rest] = tensor
    return parts


def encoder_config(state: dict[str, torch.Tensor]) -> dict:
    """The :class:`PivotIDEncoder` config of a PhotoMaker ``id_encoder``, every dimension read from its tensors
    (the head count from :data:`HEAD_WIDTH`)."""
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1 or hidden % HEAD_WIDTH:
        raise ConfigError(f"PhotoMaker id_encoder has {positions} positions and width {hidden}: not a square "
                          f"image grid or not a multiple of {HEAD_WIDTH}-wide heads; it is not a CLIP ViT")
    layers = {int(key.split(".")[3]) for key in state if key.startswith("vision_model.encoder.layers.")}
    vision = dict(hidden_size=hidden, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=len(layers), num_attention_heads=hidden // HEAD_WIDTH, num_channels=channels,
                  image_size=side * patch_size, patch_size=patch_size, hidden_act=HIDDEN_ACT,
                  projection_dim=state["visual_projection.weight"].shape[0])
    return dict(vision_config=vision, text_width=state["fuse_module.layer_norm.weight"].shape[0], fusion="mlp",
                second_projection_dim=state["visual_projection_2.weight"].shape[0],
                fusion_hidden_dim=state["fuse_module.mlp1.fc1.weight"].shape[0])


def our_key(key: str) -> str:
    """A PhotoMaker ``id_encoder`` key under :class:`PivotIDEncoder`'s names (:data:`OUR_PREFIXES`)."""
    for prefix in sorted(OUR_PREFIXES, key=len, reverse=True):
        if key.startswith(prefix):
            return OUR_PREFIXES[prefix] + key[len(prefix):]
    return key


def encoder_from_checkpoint(checkpoint: PhotoMakerCheckpoint):
    """The :class:`PivotIDEncoder` (``mlp`` fusion) holding exactly the checkpoint's ID-encoder weights."""
    from omniportrait.models.pivot_encoder import PivotIDEncoder

    state = {our_key(key): tensor for key, tensor in checkpoint.id_encoder.items() if key not in SKIPPED_KEYS}
    config = encoder_config(checkpoint.id_encoder)
    if config["fusion_hidden_dim"] != checkpoint.id_encoder["fuse_module.mlp2.fc1.weight"].shape[0]:
        raise ConfigError(f"PhotoMaker checkpoint {checkpoint.path}: fuse_module.mlp1 and mlp2 have different "
                          "hidden widths; it is not a PhotoMaker v1 ID encoder")
    encoder = PivotIDEncoder(**config)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    wrong = [key for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    if missing or unknown or wrong:
        problems = [f"{label} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                    for label, keys in (("lacks", missing), ("has unknown", unknown), ("has misshapen", wrong))
                    if keys]
        raise ConfigError(f"PhotoMaker checkpoint {checkpoint.path}: its {ID_ENCODER} {'; '.join(problems)} "
                          "(our names); it is not a PhotoMaker v1 ID encoder")
    encoder.load_state_dict({key: tensor.float() for key, tensor in state.items()})
    return encoder.eval()


def lora_to_diffusers(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PhotoMaker's LoRA keys (``….attn1.processor.to_out_lora.up.weight``) under the names diffusers'
    ``save_lora_weights`` writes today (``….attn1.to_out.0.lora_B.weight``); other keys unchanged."""
    converted = {}
    for key, tensor in lora.items():
        match = OLD_LORA_KEY.fullmatch(key)
        if match:
            proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
            key = f"{match['module']}.{proj}.lora_{'A' if match['side'] == 'down' else 'B'}.weight"
        converted[key] = tensor.contiguous()
    return converted


def warn_no_lora(path: str | Path) -> None:
    warnings.warn(f"PhotoMaker checkpoint {path} has no {LORA_WEIGHTS}: its ID encoder is used without the UNet "
                  "LoRA it was trained with, so identity will be weaker", stacklevel=3)


def convert(path: str | Path, out: str | Path) -> ConvertedPhotoMaker:
    """Write a PhotoMaker v1 checkpoint as our encoder folder (``save_pretrained``, safetensors) and its LoRA
    (``OUT/photomaker_lora.safetensors``, diffusers format); a missing LoRA is a warning. ``OUT`` must not
    exist or be empty; it appears complete or not at all (written beside it, then renamed)."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(out).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; choose another or remove it")
    checkpoint = read_checkpoint(path)
    encoder = encoder_from_checkpoint(checkpoint)
    temp = folder.with_name(f".{folder.name}.converting")
    shutil.rmtree(temp, ignore_errors=True)
    encoder.save_pretrained(str(temp))
    if checkpoint.lora is not None:
        save_file(lora_to_diffusers(checkpoint.lora), str(temp / LORA_FILE), metadata={"format": "pt"})
    if folder.exists():
        folder.rmdir()
    temp.replace(folder)
    if checkpoint.lora is None:
        warn_no_lora(path)
        return ConvertedPhotoMaker(folder, None)
    return ConvertedPhotoMaker(folder, folder / LORA_FILE)
