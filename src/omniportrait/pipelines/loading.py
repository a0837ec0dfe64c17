"""Presets and loading: tiny offline models, hub ids, local folders and single-file checkpoints."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from omniportrait.errors import ConfigError
from omniportrait.pipelines.base import NO_PIVOT_WARNING
from omniportrait.pipelines.sd15 import OmniPortraitSDPipeline
from omniportrait.pipelines.sdxl import OmniPortraitSDXLPipeline

ARCHS = ("sd15", "sdxl")
PIPELINE_CLASSES = {"sd15": OmniPortraitSDPipeline, "sdxl": OmniPortraitSDXLPipeline}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Preset:
    """A named starting point: architecture, base weights (``None`` = tiny, built offline) and image size."""

    name: str
    arch: str
    base: str | None
    size: int
    about: str


PRESETS = {
    preset.name: preset
    for preset in (
        Preset("tiny-sd15", "sd15", None, 64, "tiny SD1.5-shaped model with random weights; offline, seconds on CPU"),
        Preset("tiny-sdxl", "sdxl", None, 64, "tiny SDXL-shaped model with random weights; offline, seconds on CPU"),
        Preset("sd15", "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, "Stable Diffusion 1.5 (hub)"),
        Preset("sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 1024, "SDXL base 1.0 (hub)"),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_device(device: str | None) -> torch.device:
    """``auto``/``None`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        present = ", ".join(f"cuda:{index}" for index in range(torch.cuda.device_count()))
        raise ConfigError(f"device {device!r} is not on this machine; its CUDA devices: {present}")
    return resolved


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``/``None``: fp16 on CUDA, fp32 elsewhere."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


def sniff_single_file_arch(path: Path) -> str:
    """SDXL checkpoints carry a second text encoder under ``conditioner.embedders.1``."""
    if path.suffix != ".safetensors":
        raise ConfigError(f"cannot tell the architecture of {path.name}; pass --arch sd15 or --arch sdxl")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = handle.keys()
    return "sdxl" if any(key.startswith("conditioner.embedders.1") for key in keys) else "sd15"


def folder_arch(path: Path) -> str:
    index = json.loads((path / "model_index.json").read_text())
    return "sdxl" if "XL" in index.get("_class_name", "") or "text_encoder_2" in index else "sd15"


def _no_safety_checker(arch: str) -> dict:
    """SD1.5 repos ship a safety checker; like other portrait tools we do not load it (README says so)."""
    return {"safety_checker": None, "requires_safety_checker": False} if arch == "sd15" else {}


def load_base(base: str, arch: str | None, dtype: torch.dtype):
    """A diffusers pipeline (SD or SDXL) from a hub id, a local diffusers folder or a single file; local files
    are checked first (:func:`check_base`), so a wrong or damaged file is one line, not a library traceback."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    diffusers_classes = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
    kind = check_base(base)
    path = Path(base).expanduser()
    if kind == "single-file":
        arch = arch or sniff_single_file_arch(path)
        with _as_config_error(base):
            return arch, diffusers_classes[arch].from_single_file(str(path), torch_dtype=dtype)
    if kind == "folder":
        arch = arch or folder_arch(path)
        with _as_config_error(base):
            return arch, diffusers_classes[arch].from_pretrained(str(path), torch_dtype=dtype,
                                                                 **_no_safety_checker(arch))
    return _load_from_hub(base, arch, dtype, diffusers_classes)


def check_base(base: str) -> str:
    """What ``base`` names: ``single-file``, ``folder`` (each checked by :mod:`omniportrait.checks`) or ``hub``.
    ``ConfigError`` for a missing path or a file that is not a Stable Diffusion checkpoint."""
    from omniportrait.checks import check_diffusers_folder, check_single_file_checkpoint

    path = Path(base).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"checkpoint file {base} does not exist")
        check_single_file_checkpoint(path)
        return "single-file"
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"{base} is not a diffusers folder (no model_index.json) nor a .safetensors file")
        check_diffusers_folder(path)
        return "folder"
    if os.path.sep in base and not base.count("/") == 1:
        raise ConfigError(f"checkpoint path {base} does not exist")
    return "hub"


@contextmanager
def _as_config_error(source: str):
    """Library failures reading a checked local checkpoint (tensors of unexpected shapes, say) as one line."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"{source} could not be loaded as a Stable Diffusion 1.5/XL model ({reason}); "
                          "pass --arch if it is the other architecture, or check the file") from None


def _load_from_hub(repo_id: str, arch: str | None, dtype, diffusers_classes):
    from diffusers import DiffusionPipeline

    kwargs = dict(torch_dtype=dtype)
    try:
        if arch is None:
            config = DiffusionPipeline.load_config(repo_id)
            arch = "sdxl" if "XL" in config.get("_class_name", "") else "sd15"
        return arch, diffusers_classes[arch].from_pretrained(repo_id, **kwargs, **_no_safety_checker(arch))
    except OSError as err:
        raise ConfigError(
            f"could not load {repo_id!r} from the Hugging Face Hub or its cache ({str(err).splitlines()[0]}); "
            "check the id, your network and HF_HUB_OFFLINE, or pass a local folder / .safetensors file"
        ) from err


def check_pivot_encoder(path: str):
    """The pivot encoder ``path`` names, checked without building it: a PhotoMaker v1 checkpoint file
    (:func:`omniportrait.models.photomaker.read_checkpoint`, returned) or a ``save_pretrained`` folder whose
    config builds a ``PivotIDEncoder``, whose weights file holds exactly that model's tensors, complete, and
    whose UNet LoRA (``photomaker_lora.safetensors``), if any, is a complete LoRA file (the folder returned)."""
    from omniportrait.checks import check_model_folder, check_state_matches
    from omniportrait.models.photomaker import LORA_FILE, is_checkpoint_file, read_checkpoint
    from omniportrait.models.pivot_encoder import PivotIDEncoder
    from omniportrait.pipelines.plugins import check_lora_file

    if is_checkpoint_file(path):
        return read_checkpoint(path)
    what = "pivot encoder"
    checked = check_model_folder(path, what, class_name=PivotIDEncoder.__name__, required_config=("text_width",))
    try:
        with torch.device("meta"):
            skeleton = PivotIDEncoder.from_config(checked.config)
    except Exception as err:  # noqa: BLE001 - whatever the config's values break, it is the config's fault
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise ConfigError(f"{what} config {checked.path / 'config.json'} does not describe a PivotIDEncoder "
                          f"({reason})") from None
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    check_state_matches(checked.tensors, expected, checked.weights, f"{what} weights")
    if (checked.path / LORA_FILE).exists():
        check_lora_file(checked.path / LORA_FILE)
    return checked


@dataclass(frozen=True)
class Pivot:
    """A loaded pivot encoder and the UNet LoRA it was trained with (PhotoMaker's; ``None`` for ours): a state
    dict (from a checkpoint) or a ``.safetensors`` file (beside a converted encoder)."""

    encoder: object
    lora: dict | Path | None
    source: str


def read_pivot(path: str, text_width: int) -> Pivot:
    """The pivot encoder of a folder or a PhotoMaker v1 checkpoint (converted on load; a warning when it has no
    LoRA), checked to fuse ``text_width``-wide text states."""
    from omniportrait.models.photomaker import (
        LORA_FILE,
        PhotoMakerCheckpoint,
        encoder_from_checkpoint,
        warn_no_lora,
    )
    from omniportrait.models.pivot_encoder import PivotIDEncoder

    checked = check_pivot_encoder(path)
    if isinstance(checked, PhotoMakerCheckpoint):
        check_text_width(checked.id_encoder["fuse_module.layer_norm.weight"].shape[0], "mlp", path, text_width)
        if checked.lora is None:
            warn_no_lora(path)
        return Pivot(encoder_from_checkpoint(checked), checked.lora, path)
    check_text_width(checked.config["text_width"], checked.config.get("fusion", "linear"), path, text_width)
    lora = checked.path / LORA_FILE
    return Pivot(PivotIDEncoder.from_pretrained(str(checked.path)), lora if lora.is_file() else None, path)


def check_pivot_arch(checked, path: str, arch: str | None) -> None:
    """Before loading the base model: a PhotoMaker checkpoint (SDXL only) with an SD1.5 ``arch`` is refused."""
    from omniportrait.models.photomaker import PhotoMakerCheckpoint

    if arch == "sd15" and isinstance(checked, PhotoMakerCheckpoint):
        raise ConfigError(f"pivot encoder {path} is PhotoMaker's, made for SDXL; it does not fit an SD1.5 model: "
                          "use --preset sdxl (or an SDXL --base)")


def check_text_width(encoder_width: int, fusion: str, path: str, width: int) -> None:
    """The encoder fuses text states as wide as the pipeline's (PhotoMaker's: SDXL's 2048)."""
    if encoder_width == width:
        return
    if fusion == "mlp":
        raise ConfigError(f"pivot encoder {path} is PhotoMaker's, made for SDXL: it fuses {encoder_width}-wide text "
                          f"states but this model's are {width} wide; use --preset sdxl (or an SDXL --base)")
    raise ConfigError(
        f"pivot encoder {path} fuses {encoder_width}-wide text states but this model's are "
        f"{width} wide; use an encoder trained for this architecture"
    )


def load_pivot_encoder(path: str, text_width: int):
    """The encoder alone (its LoRA, if any, not loaded): see :func:`read_pivot`."""
    return read_pivot(path, text_width).encoder


def text_width(pipe) -> int:
    return pipe.unet.config.cross_attention_dim


def load_pipeline(
    preset: str | None = "tiny-sd15",
    base: str | None = None,
    arch: str | None = None,
    pivot_encoder: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    scheduler: str = "ddim",
):
    """The OmniPortrait pipeline for a preset or any base model, on the given device and dtype.

    Args:
        preset: one of :data:`PRESETS`; gives the architecture and default base weights.
        base: hub id, local diffusers folder or ``.safetensors`` file; overrides the preset's weights.
        arch: ``sd15`` or ``sdxl`` when it cannot be read from ``base``.
        pivot_encoder: folder written by ``PivotIDEncoder.save_pretrained`` (with the UNet LoRA of a converted
            PhotoMaker, if any) or a PhotoMaker v1 checkpoint file. Tiny presets bring their own.
        scheduler: one of :data:`omniportrait.pipelines.schedulers.SCHEDULERS` (DDIM by default, as the paper).
    """
    from omniportrait.pipelines.schedulers import make_scheduler

    chosen = get_preset(preset) if preset else None
    if arch is not None and arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; use sd15 or sdxl")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    pie = None
    if base is None and chosen is not None and chosen.base is None:
        from omniportrait.models.tiny import tiny_components

        tiny = tiny_components(chosen.arch)
        cls = PIPELINE_CLASSES[chosen.arch]
        pipe = cls(**tiny.components)
        pie = tiny.pivot_encoder
    else:
        source = base or chosen.base
        arch, diffusers_pipe = load_base(source, arch or (chosen.arch if chosen and not base else None), torch_dtype)
        pipe = PIPELINE_CLASSES[arch].from_pipe(diffusers_pipe)
    if pivot_encoder is not None:
        pivot = read_pivot(pivot_encoder, text_width(pipe))
        pie = pivot.encoder
        if pivot.lora is not None:
            from omniportrait.pipelines.plugins import load_pivot_lora

            load_pivot_lora(pipe, pivot.lora, pivot_encoder)
    if pie is None:
        warnings.warn(NO_PIVOT_WARNING, stacklevel=2)
    pipe.register_modules(pivot_encoder=pie)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if pipe.unet.dtype != torch_dtype:
        pipe.to(torch_dtype)
    return pipe.to(torch_device)
