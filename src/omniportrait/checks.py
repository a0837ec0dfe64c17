"""Checks of the model files a user can name, before anything is loaded or sampled.

Every flag that takes weights (``--base``, ``--pivot-encoder``, training checkpoints, and the plug-ins'
``--controlnet``, ``--ip-adapter``, ``--lora``, ``--init``) runs its path through these functions first. A
file of the wrong kind, cut short, with the wrong tensors or a broken config is refused with one
:class:`~omniportrait.errors.ConfigError` line naming the file and what is wrong, instead of a library
traceback minutes later. The checks read headers and configs, not the weights themselves, except for torch
files, which can only be checked by loading them (always with ``weights_only=True``: DESIGN §5 forbids
unpickling arbitrary objects).
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from omniportrait.errors import ConfigError

SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024
"""The safetensors format caps its JSON header at 100 MB; a larger length means the file is not one."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _existing_file(path: str | Path, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not file.is_file():
        raise ConfigError(f"{what} {path} is not a file")
    return file


def read_safetensors_header(path: str | Path, what: str = "weights file") -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking that its header parses and that the file holds
    every byte the header promises (a truncated download or copy fails here)."""
    file = _existing_file(path, what)
    size = file.stat().st_size
    try:
        with open(file, "rb") as stream:
            head = stream.read(8)
            if len(head) < 8:
                raise ConfigError(f"{what} {path} is not a safetensors file ({size} bytes, too short)")
            (length,) = struct.unpack("<Q", head)
            if length > min(SAFETENSORS_HEADER_LIMIT, size - 8):
                raise ConfigError(f"{what} {path} is not a safetensors file (its first bytes are no header length)")
            raw = stream.read(length)
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{what} {path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{what} {path} is not a safetensors file (its header is not a table of tensors)")
    return _tensor_table(header, size - 8 - length, path, what)


def _tensor_table(header: dict, data_size: int, path, what: str) -> dict[str, TensorInfo]:
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in entry["data_offsets"])
            tensors[name] = TensorInfo(str(entry["dtype"]), tuple(int(v) for v in entry["shape"]), start, end)
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"{what} {path} is not a safetensors file (entry {name!r} is malformed)") from None
    needed = max((info.end for info in tensors.values()), default=0)
    if needed > data_size:
        raise ConfigError(f"{what} {path} is truncated: its header promises {needed} bytes of tensors, the file "
                          f"holds {data_size}; download or copy it again")
    return tensors


def check_safetensors_file(path: str | Path, required_keys: Iterable[str] = (),
                           required_prefixes: Iterable[str] = (), what: str = "weights file",
                           expected: str = "") -> dict[str, TensorInfo]:
    """A complete safetensors file holding ``required_keys`` and a tensor under each of ``required_prefixes``.

    ``expected`` names what the file should be (e.g. "a Stable Diffusion checkpoint") in the refusal.
    """
    tensors = read_safetensors_header(path, what)
    missing = [key for key in required_keys if key not in tensors]
    missing += [f"{prefix}*" for prefix in required_prefixes if not any(k.startswith(prefix) for k in tensors)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        kind = f"; it is not {expected}" if expected else ""
        raise ConfigError(f"{what} {path} lacks the tensors {shown}{kind}")
    return tensors


def check_torch_file(path: str | Path, what: str = "weights file"):
    """The object a torch file holds, loaded with ``weights_only=True``: tensors and plain containers only.
    A truncated file, a file of another kind and a pickle of arbitrary objects are each refused in one line."""
    import pickle
    import zipfile

    import torch

    file = _existing_file(path, what)
    try:
        with warnings.catch_warnings():  # torch's notice about the pickle protocol is not the user's concern
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ConfigError(f"{what} {path} holds Python objects besides weights; it is refused because loading "
                              "it would run its code (convert it to .safetensors)") from None
        raise ConfigError(f"{what} {path} is not a readable torch file ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{what} {path} is not a complete torch file ({reason[:160]})") from None


def read_json_config(path: str | Path, what: str = "config") -> dict:
    """A JSON object from ``path``; ``ConfigError`` when it is missing, unreadable or not a JSON object."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{what} {path} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path} holds {type(value).__name__}, not a JSON object")
    return value


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
"""The weight files diffusers and transformers write with ``save_pretrained`` (safetensors, unsharded)."""


@dataclass(frozen=True)
class ModelFolder:
    """A checked ``save_pretrained`` folder: its config and the tensors of its weights file."""

    path: Path
    config: dict
    weights: Path
    tensors: dict[str, TensorInfo]


def check_model_folder(path: str | Path, what: str = "model folder", class_name: str | None = None,
                       required_config: Iterable[str] = ()) -> ModelFolder:
    """A ``save_pretrained`` folder: ``config.json`` a JSON object (of ``class_name`` and holding
    ``required_config`` when given) and a complete safetensors weights file beside it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{what} {path} {'is not a folder' if folder.exists() else 'does not exist'}")
    config = read_json_config(folder / "config.json", f"{what} config")
    if class_name is not None and config.get("_class_name") not in (None, class_name):
        raise ConfigError(f"{what} {path} holds a {config.get('_class_name')}, not a {class_name}")
    missing = [key for key in required_config if key not in config]
    if missing:
        raise ConfigError(f"{what} config {folder / 'config.json'} lacks {', '.join(missing)}")
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if weights is None:
        raise ConfigError(f"{what} {path} has no weights ({' or '.join(WEIGHT_NAMES)})")
    return ModelFolder(folder, config, weights, read_safetensors_header(weights, f"{what} weights"))


def check_state_matches(tensors: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], file, what: str):
    """The tensors of ``file`` are exactly ``expected`` (name → shape): none missing, none foreign, same shapes."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"has unknown {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}"] if extra else [])
        raise ConfigError(f"{what} {file} does not match its config: it {' and '.join(parts)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ConfigError(f"{what} {file}: {name} has shape {list(tensors[name].shape)}, its config says "
                              f"{list(shape)}")


# ------------------------------------------------------------------------------ Stable Diffusion checkpoints

SINGLE_FILE_UNET_PREFIX = "model.diffusion_model."
"""Where original-format SD1.5/SDXL single-file checkpoints keep the UNet (what ``from_single_file`` reads)."""


def check_single_file_checkpoint(path: str | Path) -> None:
    """A ``--base`` single file: a complete safetensors (or weights-only torch) Stable Diffusion checkpoint."""
    file = Path(path).expanduser()
    expected = "a Stable Diffusion checkpoint (no model.diffusion_model.* UNet)"
    if file.suffix == ".safetensors":
        check_safetensors_file(file, required_prefixes=(SINGLE_FILE_UNET_PREFIX,), what="checkpoint",
                               expected=expected)
        return
    loaded = check_torch_file(file, "checkpoint")
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not any(str(k).startswith(SINGLE_FILE_UNET_PREFIX) for k in state):
        raise ConfigError(f"checkpoint {path} lacks the tensors {SINGLE_FILE_UNET_PREFIX}*; it is not {expected}")


DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder")


def check_diffusers_component(folder: Path, what: str) -> None:
    """One component folder of a diffusers pipeline: a JSON config and weights, every safetensors file of them
    complete (fp16 variants and shards included; torch ``.bin`` weights are checked when they load)."""
    read_json_config(folder / "config.json", f"{what} config")
    safetensors = sorted(folder.glob("*.safetensors"))
    if not safetensors and not any(folder.glob("*.bin")):
        raise ConfigError(f"{what} {folder} has no weights (*.safetensors or *.bin)")
    for file in safetensors:
        read_safetensors_header(file, f"{what} weights")


def check_diffusers_folder(path: str | Path) -> dict:
    """A ``--base`` diffusers folder: ``model_index.json`` readable and naming a UNet, VAE and text encoder, each
    a folder with a JSON config and complete weights."""
    folder = Path(path).expanduser()
    index = read_json_config(folder / "model_index.json", "model index")
    for name in DIFFUSERS_COMPONENTS:
        if name not in index:
            raise ConfigError(f"model index {folder / 'model_index.json'} names no {name}; it is not a Stable "
                              "Diffusion pipeline folder")
        if not (folder / name).is_dir():
            raise ConfigError(f"{folder} has no {name} folder, which its model_index.json names")
        check_diffusers_component(folder / name, f"{name} of {folder}")
    return index
