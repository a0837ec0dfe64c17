"""Training logs: one JSON line per log step (always) and TensorBoard scalars (when installed).

``OUTPUT/logs/train.jsonl`` gets ``{"step", "loss", "diffusion_loss", "localization_loss", "lr",
"step_time_s", "samples_per_s", "kept"}`` every ``log_every`` steps (means over the steps since the last
line), plus ``{"event": "start" | "resume" | "checkpoint" | "samples" | "end", ...}`` lines. Lines reach the
file at each checkpoint (see :class:`RunLog`), so a resumed run appends exactly after the checkpoint it
resumes from.
"""

from __future__ import annotations

import json
import os
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
    """Writes the log of the main process; other processes get a disabled instance.

    Lines and TensorBoard values are held back until :meth:`flush`, which the trainer calls right after each
    checkpoint and at the end: the log on disk then always ends at a checkpoint, a run that fails before its
    first checkpoint leaves no log at all, and a resumed run does not log the same steps twice.
    """

    folder: Path
    enabled: bool = True
    tensorboard: bool = True
    history: list[dict] = field(default_factory=list)
    _writer: object | None = None
    _lines: list[str] = field(default_factory=list)
    _board: list = field(default_factory=list)

    def scalars(self, values: dict) -> None:
        self.history.append(values)
        if not self.enabled:
            return
        self._append(values)
        self._board += [("scalar", f"train/{name}", value, values["step"])
                        for name, value in values.items() if name != "step"]

    def event(self, name: str, **fields) -> None:
        if self.enabled:
            self._append({"event": name, "time": time.time(), **fields})

    def images(self, step: int, images) -> None:
        if not (self.enabled and self.tensorboard):
            return
        import numpy as np

        self._board += [("image", f"samples/{index}", np.asarray(image), step) for index, image in enumerate(images)]

    def flush(self) -> None:
        """Append the held-back lines to ``train.jsonl`` (synced to disk) and hand the values to TensorBoard."""
        if not self.enabled or not (self._lines or self._board):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOG_FILE, "a") as stream:
            stream.write("".join(self._lines))
            stream.flush()
            os.fsync(stream.fileno())
        self._lines = []
        if self.tensorboard and self._board and self._writer is None:
            self._writer = tensorboard_writer(self.folder)
        if self._writer is not None:
            for kind, tag, value, step in self._board:
                if kind == "scalar":
                    self._writer.add_scalar(tag, value, step)
                else:
                    self._writer.add_image(tag, value, step, dataformats="HWC")
            self._writer.flush()
        self._board = []

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()

    def _append(self, values: dict) -> None:
        self._lines.append(json.dumps(values) + "\n")


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
