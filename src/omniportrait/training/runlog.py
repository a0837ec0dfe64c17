"""Training logs: one JSON line per log step (always) and TensorBoard scalars (when installed).

``OUTPUT/logs/train.jsonl`` gets ``{"step", "loss", "diffusion_loss", "localization_loss", "lr",
"step_time_s", "samples_per_s", "kept"}`` every ``log_every`` steps (means over the steps since the last
line), plus ``{"event": "start" | "resume" | "checkpoint" | "samples" | "end", ...}`` lines. A resumed run
appends; steps logged after the checkpoint it resumes from are logged again with the same values.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_FILE = "train.jsonl"


@dataclass
class LossWindow:
    """Sums of the loss terms and times since the last log line."""

    loss: float = 0.0
    diffusion: float = 0.0
    localization: float = 0.0
    kept: int = 0
    samples: int = 0
    seconds: float = 0.0
    steps: int = 0

    def add(self, loss: float, diffusion: float, localization: float, kept: int, samples: int, seconds: float):
        self.loss += loss
        self.diffusion += diffusion
        self.localization += localization
        self.kept += kept
        self.samples += samples
        self.seconds += seconds
        self.steps += 1

    def summary(self, step: int, lr: float) -> dict:
        steps = max(self.steps, 1)
        return {
            "step": step, "loss": self.loss / steps, "diffusion_loss": self.diffusion / steps,
            "localization_loss": self.localization / steps, "lr": lr, "step_time_s": self.seconds / steps,
            "samples_per_s": self.samples / self.seconds if self.seconds > 0 else 0.0, "kept": self.kept,
        }


@dataclass
class RunLog:
    """Writes the log of the main process; other processes get a disabled instance."""

    folder: Path
    enabled: bool = True
    tensorboard: bool = True
    history: list[dict] = field(default_factory=list)
    _writer: object | None = None

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.tensorboard:
            self._writer = tensorboard_writer(self.folder)

    def scalars(self, values: dict) -> None:
        self.history.append(values)
        if not self.enabled:
            return
        self._append(values)
        if self._writer is not None:
            for name, value in values.items():
                if name != "step":
                    self._writer.add_scalar(f"train/{name}", value, values["step"])

    def event(self, name: str, **fields) -> None:
        if self.enabled:
            self._append({"event": name, "time": time.time(), **fields})

    def images(self, step: int, images) -> None:
        if self._writer is None:
            return
        import numpy as np

        for index, image in enumerate(images):
            self._writer.add_image(f"samples/{index}", np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _append(self, values: dict) -> None:
        with open(self.folder / LOG_FILE, "a") as stream:
            stream.write(json.dumps(values) + "\n")


def tensorboard_writer(folder: Path):
    """A TensorBoard ``SummaryWriter`` when the ``tensorboard`` package is installed, else ``None``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


def read_log(folder: Path) -> list[dict]:
    path = Path(folder) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
