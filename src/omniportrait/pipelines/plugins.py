"""Plug-ins on an OmniPortrait pipeline: ControlNets, an IP-Adapter and LoRAs (docs/plug-and-play.md).

Each plug-in is named by a hub id, a local folder or a single file, or ``tiny`` (random weights for the tiny
presets, built offline). Names are checked by :func:`check_controlnet_source`, :func:`check_ip_adapter_source` and
:func:`check_lora_file` before anything is loaded, so a wrong or damaged file is one line; the loaders then turn
library failures into one :class:`ConfigError` line too.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omniportrait.control.spec import CONTROL_KINDS, ControlSpec, check_kind, check_scale
from omniportrait.errors import ConfigError

TINY = "tiny"
"""The source that builds random plug-ins for the tiny presets."""

DEFAULT_CONTROLNETS = {
    "sd15": {"pose": "lllyasviel/control_v11p_sd15_openpose", "canny": "lllyasviel/control_v11p_sd15_canny"},
    "sdxl": {"pose": "xinsir/controlnet-openpose-sdxl-1.0", "canny": "xinsir/controlnet-canny-sdxl-1.0"},
}
"""The ControlNet each control kind uses unless ``--controlnet KIND=…`` names another; ``image`` has none."""

CONTROLNET_LICENCES = {"lllyasviel": "CreativeML OpenRAIL-M", "xinsir": "Apache-2.0"}
"""The licence of the default ControlNets, by hub owner."""

DEFAULT_IP_ADAPTERS = {"sd15": ("models", "ip-adapter_sd15.safetensors"),
                       "sdxl": ("sdxl_models", "ip-adapter_sdxl.safetensors")}
"""(subfolder, weight file) read from a hub repo named alone, as laid out in ``h94/IP-Adapter``."""

CONTROLNET_FILE_PREFIXES = ("controlnet_cond_embedding.", "control_model.", "input_hint_block.")
"""Tensors one of which every ControlNet single file holds (diffusers' layout or the original one)."""

IP_ADAPTER_PREFIXES = ("image_proj.", "ip_adapter.")
IP_ADAPTER_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE[:SCALE]``: a PEFT/kohya LoRA ``.safetensors`` file and its weight (1.0 by default)."""

    path: Path
    scale: float = 1.0

    def flag(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass(frozen=True)
class ControlNetChoice:
    """One ``--controlnet KIND=SOURCE``: the ControlNet the controls of ``kind`` use instead of the default."""

    kind: str
    source: str

    def flag(self) -> str:
        return f"{self.kind}={self.source}"


@dataclass(frozen=True)
class IPAdapterSpec:
    """``--ip-adapter SOURCE --ip-adapter-scale S --ip-adapter-image IMG``: the adapter and its image prompt (None:
    the identities' aligned face crops, the IP-Adapter as the pivot)."""

    source: str
    scale: float
    image: Path | None


def source_kind(value: str, file_suffixes: tuple[str, ...]) -> str:
    """What a model name is: ``tiny``, ``file`` (one of ``file_suffixes``), ``folder`` or ``hub`` (``owner/name``
    and optionally a path inside the repo); ``ConfigError`` for a local path that does not exist."""
    if value == TINY:
        return TINY
    path = Path(value).expanduser()
    if path.suffix in file_suffixes and path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise ConfigError(f"{value} is neither a folder nor a {' or '.join(file_suffixes)} file")
    looks_local = value.startswith(("/", ".", "~")) or os.path.sep == "\\" and "\\" in value
    if looks_local or path.suffix in file_suffixes and value.count("/") < 2 or value.count("/") < 1:
        raise ConfigError(f"{value} does not exist (give a hub id owner/name, a folder or a file)")
    return "hub"


def parse_lora(value: str) -> LoraSpec:
    """``FILE[:SCALE]`` -> :class:`LoraSpec`, read from the right so the path may contain ``:``; the file checked."""
    path, separator, last = value.rpartition(":")
    if not separator or Path(value).is_file():
        path, scale = value, 1.0
    else:
        try:
            scale = float(last)
        except ValueError:
            raise ConfigError(f"--lora {value!r}: the scale {last!r} is not a number; write FILE[:SCALE], "
                              "e.g. style.safetensors:0.7") from None
        check_scale(scale, f"--lora {value!r}")
    check_lora_file(path)
    return LoraSpec(Path(path).expanduser(), scale)


def check_lora_file(path: str | Path) -> None:
    """A complete ``.safetensors`` file with LoRA tensors (``lora_A``/``lora_B``, ``lora_down``/``lora_up``)."""
    from omniportrait.checks import read_safetensors_header

    if Path(path).suffix != ".safetensors":
        raise ConfigError(f"LoRA {path} is not a .safetensors file (torch pickles are refused, DESIGN §5)")
    tensors = read_safetensors_header(path, "LoRA")
    if not any("lora" in name for name in tensors):
        raise ConfigError(f"LoRA {path} holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up)")


def parse_controlnet_choice(value: str) -> ControlNetChoice:
    """``KIND=SOURCE`` -> :class:`ControlNetChoice`, its source checked (:func:`check_controlnet_source`)."""
    kind, separator, source = value.partition("=")
    if not separator or not source.strip():
        raise ConfigError(f"--controlnet {value!r} must look like KIND=HUB_ID_OR_PATH, e.g. "
                          "pose=lllyasviel/control_v11p_sd15_openpose")
    check_kind(kind)
    check_controlnet_source(source)
    return ControlNetChoice(kind, source)


def check_controlnet_source(source: str) -> str:
    """A ControlNet name: ``tiny``, a hub id, a ``save_pretrained`` folder or a ``.safetensors`` single file whose
    tensors are a ControlNet's. Returns its kind (:func:`source_kind`)."""
    from omniportrait.checks import check_model_folder, read_safetensors_header

    kind = source_kind(source, (".safetensors",))
    if kind == "folder":
        check_model_folder(source, "ControlNet", class_name="ControlNetModel")
    elif kind == "file":
        tensors = read_safetensors_header(source, "ControlNet")
        if not any(name.startswith(CONTROLNET_FILE_PREFIXES) for name in tensors):
            raise ConfigError(f"ControlNet {source} lacks the tensors {CONTROLNET_FILE_PREFIXES[0]}*; it is not a "
                              "ControlNet")
    return kind


def check_ip_adapter_source(source: str) -> str:
    """An IP-Adapter name: ``tiny``, a hub id (``owner/name`` or ``owner/name/SUBFOLDER/FILE``) or a local
    ``.safetensors``/``.bin`` file holding ``image_proj`` and ``ip_adapter`` weights. Returns its kind."""
    from omniportrait.checks import check_safetensors_file, check_torch_file

    kind = source_kind(source, IP_ADAPTER_SUFFIXES)
    if kind == "folder":
        raise ConfigError(f"IP-Adapter {source} is a folder; name its weights file (.safetensors or .bin)")
    if kind == "file" and source.endswith(".safetensors"):
        check_safetensors_file(source, required_prefixes=IP_ADAPTER_PREFIXES, what="IP-Adapter",
                               expected="an IP-Adapter")
    elif kind == "file":
        loaded = check_torch_file(source, "IP-Adapter")
        if not isinstance(loaded, dict) or not {"image_proj", "ip_adapter"} <= set(loaded):
            raise ConfigError(f"IP-Adapter {source} lacks image_proj and ip_adapter weights; it is not an IP-Adapter")
    return kind


def controlnet_source(kind: str, arch: str, choices: list[ControlNetChoice], tiny: bool) -> str:
    """The ControlNet the controls of ``kind`` use: the ``--controlnet`` choice, else ``tiny`` on a tiny preset,
    else the default of :data:`DEFAULT_CONTROLNETS`; ``image`` controls have no default."""
    chosen = [choice.source for choice in choices if choice.kind == kind]
    if chosen:
        return chosen[-1]
    if tiny:
        return TINY
    if kind not in DEFAULT_CONTROLNETS[arch]:
        raise ConfigError(f"--control {kind}:… has no default ControlNet; name one with --controlnet "
                          f"{kind}=HUB_ID_OR_PATH (a depth or lineart ControlNet, say)")
    return DEFAULT_CONTROLNETS[arch][kind]


def check_choices_used(controls: list[ControlSpec], choices: list[ControlNetChoice]) -> None:
    """Refuse a ``--controlnet`` for a kind that no ``--control`` uses: it would be silently ignored."""
    used = {spec.kind for spec in controls}
    for choice in choices:
        if choice.kind not in used:
            raise ConfigError(f"--controlnet {choice.flag()} names a kind no --control uses; add --control "
                              f"{choice.kind}:IMAGE or drop it")


@contextmanager
def loading(what: str, source: str):
    """Library failures loading a plug-in (a missing hub id offline, tensors of the wrong shapes) as one line."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"{what} {source} could not be loaded ({reason}); check the id or file, your network "
                          "and HF_HUB_OFFLINE, and that it fits this base model") from None


def load_controlnet(source: str, unet, seed: int):
    """One ControlNet from a checked source: ``tiny`` (random, made from ``unet``), hub id, folder or file."""
    from diffusers import ControlNetModel

    from omniportrait.models.tiny import tiny_controlnet

    kind = check_controlnet_source(source)
    if kind == TINY:
        return tiny_controlnet(unet, seed=seed)
    with loading("ControlNet", source):
        if kind == "file":
            return ControlNetModel.from_single_file(str(Path(source).expanduser()))
        return ControlNetModel.from_pretrained(str(Path(source).expanduser()) if kind == "folder" else source)


def load_controlnets(controls: list[ControlSpec], arch: str, choices: list[ControlNetChoice], unet, tiny: bool):
    """One ControlNet per control, in the UNet's dtype and device; several make a ``MultiControlNetModel``. A
    source used by several controls is loaded once."""
    from diffusers import MultiControlNetModel

    loaded: dict[str, object] = {}
    nets = []
    for index, spec in enumerate(controls):
        source = controlnet_source(spec.kind, arch, choices, tiny)
        key = source if source != TINY else f"{TINY}-{index}"
        if key not in loaded:
            loaded[key] = load_controlnet(source, unet, seed=index).to(unet.device, unet.dtype)
        nets.append(loaded[key])
    return nets[0] if len(nets) == 1 else MultiControlNetModel(nets)


def with_controlnet(pipe, controlnet):
    """The ControlNet pipeline of ``pipe``'s architecture sharing its components (its scheduler, pivot encoder,
    LoRAs and adapters included) with ``controlnet`` added."""
    from omniportrait.pipelines.controlnet import OmniPortraitSDControlNetPipeline, OmniPortraitSDXLControlNetPipeline
    from omniportrait.pipelines.sdxl import OmniPortraitSDXLPipeline

    cls = OmniPortraitSDXLControlNetPipeline if isinstance(pipe, OmniPortraitSDXLPipeline) else \
        OmniPortraitSDControlNetPipeline
    controlled = cls.from_pipe(pipe, controlnet=controlnet)
    controlled.banded_decode = getattr(pipe, "banded_decode", None)
    return controlled


PIVOT_LORA = "photomaker"
"""The PEFT adapter name of a pivot encoder's UNet LoRA (PhotoMaker's, as its own pipeline names it)."""


def load_pivot_lora(pipe, lora, source: str) -> None:
    """The UNet LoRA a pivot encoder was trained with (a state dict or a ``.safetensors`` file) as the PEFT
    adapter :data:`PIVOT_LORA`, active at scale 1."""
    if isinstance(lora, (str, Path)):
        check_lora_file(lora)
    with loading("pivot encoder LoRA of", source):
        pipe.load_lora_weights(dict(lora) if isinstance(lora, dict) else str(lora), adapter_name=PIVOT_LORA)


def load_loras(pipe, loras: list[LoraSpec]) -> None:
    """Each LoRA as a PEFT adapter ``lora0``, ``lora1``, …, all active at their scales; the pivot encoder's LoRA,
    if loaded, stays active at 1."""
    if not loras:
        return
    kept = [PIVOT_LORA] if PIVOT_LORA in pipe.get_list_adapters().get("unet", []) else []
    names = []
    for index, spec in enumerate(loras):
        check_lora_file(spec.path)
        with loading("LoRA", str(spec.path)):
            pipe.load_lora_weights(str(spec.path), adapter_name=f"lora{index}")
        names.append(f"lora{index}")
    pipe.set_adapters(kept + names, [1.0] * len(kept) + [spec.scale for spec in loras])


def hub_ip_adapter(source: str, arch: str) -> tuple[str, str, str]:
    """``owner/name`` -> (repo, subfolder, file) with :data:`DEFAULT_IP_ADAPTERS`' layout;
    ``owner/name/SUB/FOLDER/FILE`` -> its parts."""
    parts = source.split("/")
    if len(parts) == 2:
        return (source, *DEFAULT_IP_ADAPTERS[arch])
    return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]


VIT_H_ENCODER = "models/image_encoder"
"""``h94/IP-Adapter``'s OpenCLIP ViT-H/14 image encoder: SD1.5's adapters and SDXL's ``*_vit-h`` ones were trained
with it (SDXL's other adapters with ViT-bigG in ``sdxl_models/image_encoder``)."""


def image_encoder_folder(kind: str, weight_name: str) -> str:
    """Where diffusers loads the adapter's image encoder from: a hub file named ``*vit-h*`` (``ip-adapter-plus-face_
    sdxl_vit-h.safetensors``) takes the repo's ViT-H encoder; any other the ``image_encoder`` folder beside it
    (diffusers' default: ``models/image_encoder`` for SD1.5's, ``sdxl_models/image_encoder`` for SDXL's)."""
    return VIT_H_ENCODER if kind == "hub" and "vit-h" in weight_name.lower() else "image_encoder"


def load_ip_adapter(pipe, spec: IPAdapterSpec, arch: str) -> None:
    """The IP-Adapter into ``pipe``'s UNet at ``spec.scale``: ``tiny`` (random, with a tiny image encoder), a hub
    repo (its image encoder from the repo, as diffusers loads it) or a local file (an image encoder in an
    ``image_encoder`` folder beside it)."""
    kind = check_ip_adapter_source(spec.source)
    if kind == TINY:
        load_tiny_ip_adapter(pipe)
    else:
        if kind == "file":
            path = Path(spec.source).expanduser()
            where = (str(path.parent), "", path.name)
        else:
            where = hub_ip_adapter(spec.source, arch)
        with loading("IP-Adapter", spec.source):
            pipe.load_ip_adapter(where[0], subfolder=where[1], weight_name=where[2],
                                 image_encoder_folder=image_encoder_folder(kind, where[2]))
    pipe.set_ip_adapter_scale(spec.scale)


def load_tiny_ip_adapter(pipe) -> None:
    """A random IP-Adapter and a tiny image encoder, for the tiny presets."""
    from omniportrait.models.tiny import tiny_image_encoder, tiny_ip_adapter

    encoder, processor = tiny_image_encoder()
    pipe.register_modules(image_encoder=encoder.to(pipe.unet.device, pipe.unet.dtype), feature_extractor=processor)
    state = tiny_ip_adapter(pipe.unet, encoder.config.projection_dim)
    pipe.unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)  # moves them to the UNet's device, dtype


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a local file, read in blocks; ``None`` for a hub id, a folder or a file that cannot be read."""
    import hashlib

    file = Path(path).expanduser()
    digest = hashlib.sha256()
    try:
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


__all__ = ["CONTROL_KINDS", "CONTROLNET_LICENCES", "ControlNetChoice", "DEFAULT_CONTROLNETS", "IPAdapterSpec",
           "LoraSpec", "TINY", "check_choices_used", "check_controlnet_source", "check_ip_adapter_source",
           "check_lora_file", "controlnet_source", "file_sha256", "load_controlnets", "load_ip_adapter",
           "load_loras", "load_pivot_lora", "parse_controlnet_choice", "parse_lora", "with_controlnet"]
