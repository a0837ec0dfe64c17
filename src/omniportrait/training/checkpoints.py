"""Resumable checkpoints, written atomically.

``OUTPUT/checkpoints/step-N/`` holds ``accelerator.save_state`` (PIE weights as safetensors, optimizer,
LR scheduler, RNG states of every process), ``pivot_encoder/`` in ``from_pretrained`` format, and
``trainer_state.json`` (step, data position, config). It is written as ``.tmp-step-N`` and renamed when
complete, so a run killed mid-write leaves no ``step-N`` behind; ``--resume`` picks the highest complete N.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from omniportrait.errors import ConfigError
from omniportrait.files import write_json_atomic

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
PIVOT_FOLDER = "pivot_encoder"


@dataclass
class TrainState:
    """Where training stands: optimizer steps done and micro-batches each process has consumed."""

    step: int = 0
    position: int = 0


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        suffix = folder.name[len(PREFIX):]
        if folder.name.startswith(PREFIX) and suffix.isdigit() and (folder / STATE_FILE).is_file():
            found.append((int(suffix), folder))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def fsync_dir(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def save_checkpoint(accelerator, pivot_encoder, state: TrainState, run_dir: Path, extra: dict,
                    total_limit: int | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically from every process (call it on all of them)."""
    root = checkpoint_root(run_dir)
    final = root / checkpoint_name(state.step)
    temp = root / f"{TEMP_PREFIX}{checkpoint_name(state.step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(pivot_encoder).save_pretrained(str(temp / PIVOT_FOLDER))
        write_json_atomic(temp / STATE_FILE, {**asdict(state), **extra})
        fsync_dir(temp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        fsync_dir(root)
        prune_checkpoints(run_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, total_limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond ``total_limit``, and stale temporary folders."""
    root = checkpoint_root(run_dir)
    for temp in root.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(temp, ignore_errors=True)
    if total_limit is None:
        return
    for _, folder in complete_checkpoints(run_dir)[:-total_limit]:
        shutil.rmtree(folder, ignore_errors=True)


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint {folder} is unreadable ({err}); delete it to resume from an older one") from err


def load_checkpoint(accelerator, folder: Path) -> tuple[TrainState, dict]:
    """Restore model, optimizer, scheduler and RNG states; return the step, data position and saved state."""
    data = read_state(folder)
    accelerator.load_state(str(folder))
    return TrainState(step=int(data["step"]), position=int(data["position"])), data


RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")
"""What ``accelerator.save_state`` puts in each ``random_states_N.pkl``."""


@dataclass(frozen=True)
class CheckpointHealth:
    """What :func:`inspect_checkpoint` found: ``damage`` makes the checkpoint unusable; ``rng_damage`` only
    means the random states cannot be restored (resuming goes on, with a warning)."""

    folder: Path
    damage: str | None = None
    rng_damage: str | None = None


def _load_state_file(path: Path):
    """A state file of ``accelerator.save_state`` loaded as accelerate loads it: ``weights_only`` (tensors,
    containers and numpy arrays only)."""
    from accelerate.utils import load

    return load(str(path), map_location="cpu")


def _file_damage(path: Path) -> str | None:
    """Why the state file ``path`` cannot be used, or ``None``."""
    from omniportrait.checks import read_safetensors_header

    try:
        if path.suffix == ".safetensors":
            read_safetensors_header(path, "checkpoint weights")
        else:
            _load_state_file(path)
    except ConfigError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - whatever breaks the load, the file is damaged
        return f"{path.name} does not load ({' '.join(str(err).split())[:120] or type(err).__name__})"
    return None


def _rng_damage(folder: Path, world_size: int) -> str | None:
    for rank in range(world_size):
        path = folder / f"random_states_{rank}.pkl"
        if not path.is_file():
            return f"{path} is missing"
        try:
            states = _load_state_file(path)
        except Exception as err:  # noqa: BLE001
            return f"{path} does not load ({' '.join(str(err).split())[:120] or type(err).__name__})"
        if not isinstance(states, dict) or any(key not in states for key in RNG_KEYS):
            return f"{path} holds no random states of accelerate"
    return None


def inspect_checkpoint(folder: Path) -> CheckpointHealth:
    """Check a complete-looking checkpoint without restoring it: its state file, the exported PIE, the model
    weights (safetensors headers and sizes), optimizer and scheduler (``weights_only``) and RNG states."""
    from omniportrait.checks import check_model_folder

    try:
        data = read_state(folder)
        int(data["step"]), int(data["position"])
        check_model_folder(folder / PIVOT_FOLDER, "checkpoint pivot encoder")
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        return CheckpointHealth(folder, damage=str(err) or f"{STATE_FILE} lacks {err}")
    needed = {"model*.safetensors": "model weights", "optimizer*.bin": "optimizer state",
              "scheduler*.bin": "learning-rate scheduler state"}
    for pattern, what in needed.items():
        files = sorted(folder.glob(pattern))
        if not files:
            return CheckpointHealth(folder, damage=f"{folder} has no {what} ({pattern})")
        for file in files:
            damage = _file_damage(file)
            if damage:
                return CheckpointHealth(folder, damage=damage)
    return CheckpointHealth(folder, rng_damage=_rng_damage(folder, int(data.get("world_size", 1))))


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (``None`` when there is none at all).

    A damaged newer one is passed over with one warning naming it and the one used; damaged RNG states are a
    warning too (the run resumes without them). ``ConfigError`` when every checkpoint is damaged.
    """
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    newest = inspect_checkpoint(found[-1][1])
    health = newest
    for _, folder in reversed(found[:-1]):
        if health.damage is None:
            break
        health = inspect_checkpoint(folder)
    if health.damage is not None:
        raise ConfigError(f"no intact checkpoint in {checkpoint_root(run_dir)}: the newest, {newest.folder}, is "
                          f"damaged ({newest.damage}); delete the damaged ones or start a new --output")
    if health is not newest:
        warnings.warn(f"checkpoint {newest.folder} is damaged ({newest.damage}); resuming from {health.folder}, "
                      "the newest intact one", stacklevel=2)
    if health.rng_damage:
        warnings.warn(f"the random states of checkpoint {health.folder} are damaged ({health.rng_damage}); resuming "
                      "without them, so noise and dropout will not repeat an uninterrupted run", stacklevel=2)
    return health.folder


def _write_lora(lora, folder: Path) -> None:
    from safetensors.torch import save_file

    from omniportrait.models.photomaker import LORA_FILE, lora_to_diffusers

    if isinstance(lora, dict):
        save_file(lora_to_diffusers(lora), str(folder / LORA_FILE), metadata={"format": "pt"})
    else:
        shutil.copyfile(lora, folder / LORA_FILE)


def export_pivot_encoder(pivot_encoder, destination: Path, lora=None) -> Path:
    """Write the trained PIE to ``destination`` in ``from_pretrained`` format, replacing it atomically; with
    ``lora`` (the UNet LoRA of a PhotoMaker start: a state dict or a ``.safetensors`` file) written beside it as
    ``photomaker_lora.safetensors``, which ``--pivot-encoder`` loads with it."""
    destination = Path(destination)
    temp = destination.with_name(f"{TEMP_PREFIX}{destination.name}")
    old = destination.with_name(f"{TEMP_PREFIX}old-{destination.name}")
    shutil.rmtree(temp, ignore_errors=True)
    pivot_encoder.save_pretrained(str(temp))
    if lora is not None:
        _write_lora(lora, temp)
    fsync_dir(temp)
    if destination.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
    os.replace(temp, destination)
    shutil.rmtree(old, ignore_errors=True)
    return destination
