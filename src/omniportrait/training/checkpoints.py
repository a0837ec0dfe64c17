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


def export_pivot_encoder(pivot_encoder, destination: Path) -> Path:
    """Write the trained PIE to ``destination`` in ``from_pretrained`` format, replacing it atomically."""
    destination = Path(destination)
    temp = destination.with_name(f"{TEMP_PREFIX}{destination.name}")
    old = destination.with_name(f"{TEMP_PREFIX}old-{destination.name}")
    shutil.rmtree(temp, ignore_errors=True)
    pivot_encoder.save_pretrained(str(temp))
    fsync_dir(temp)
    if destination.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
    os.replace(temp, destination)
    shutil.rmtree(old, ignore_errors=True)
    return destination
