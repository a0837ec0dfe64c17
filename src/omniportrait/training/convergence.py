"""Measure how the face localization loss trains on a synthetic dataset whose face mask is known.

``python -m omniportrait.training.convergence --output DIR [--steps 150 --learning-rate 3e-2 --eta 100]``
writes a synthetic record folder, trains the PIE of the ``tiny-sd15`` model on it and prints, every
``--probe-every`` steps, the :class:`~omniportrait.training.probe.LocalizationProbe` numbers: the
localization loss of eq. 5 and the correlation of the e_mix map with the mask on fixed records, noise and
timesteps. ``--stock-vae`` keeps the tiny model's random VAE (whose latents hold almost no picture, see
:func:`~omniportrait.training.synthetic.sharpen_tiny_vae`); by default it is sharpened. The measured
curves are in ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from omniportrait.training.config import TrainConfig

PROBE_RECORDS = 12


@dataclass
class CurvePoint:
    step: int
    localization_loss: float
    correlation: float
    mean_attention: float


def tiny_training_pipeline(arch: str = "sd15"):
    """The tiny pipeline of a preset, with its tiny PIE, for training experiments."""
    from omniportrait.models.tiny import tiny_components
    from omniportrait.pipelines.loading import PIPELINE_CLASSES

    tiny = tiny_components(arch)
    return PIPELINE_CLASSES[arch](**tiny.components, pivot_encoder=tiny.pivot_encoder)


def measure(config: TrainConfig, probe_every: int = 25, sharpen_vae: bool = True, records: int = 32,
            arch: str = "sd15") -> list[CurvePoint]:
    """Write the synthetic data into ``config.data``, train, and return the probe curve (step 0 first)."""
    from omniportrait.training.data import BatchStream
    from omniportrait.training.probe import LocalizationProbe
    from omniportrait.training.synthetic import sharpen_tiny_vae, write_synthetic_dataset
    from omniportrait.training.trainer import PivotTrainer

    write_synthetic_dataset(config.data, records, seed=config.seed)
    pipe = tiny_training_pipeline(arch)
    trainer = PivotTrainer(config, pipe=pipe)
    stream = BatchStream(trainer.source, pipe.tokenizer, trainer.resolution, PROBE_RECORDS)
    probe = LocalizationProbe(next(iter(stream)))
    if sharpen_vae:
        sharpen_tiny_vae(pipe.vae, probe.batch.pixel_values)
    curve = [CurvePoint(0, **asdict(probe(trainer)))]

    def record(step: int, current) -> None:
        if step % probe_every == 0 or step == config.max_steps:
            curve.append(CurvePoint(step, **asdict(probe(current))))

    trainer.train(on_step=record)
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omniportrait.training.convergence", description=__doc__)
    parser.add_argument("--output", required=True, help="run folder (the data goes to OUTPUT/data)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=3e-2)
    parser.add_argument("--eta", type=float, default=100.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--probe-every", type=int, default=25)
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--stock-vae", action="store_true", help="keep the tiny model's random VAE as it is")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output = Path(args.output)
    config = TrainConfig(
        data=str(output / "data"), output=str(output / "run"), preset=f"tiny-{args.arch}", max_steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, eta=args.eta, seed=args.seed,
        num_workers=0, sample_every=0, checkpoint_every=args.steps, progress=False, log_every=1,
    )
    curve = measure(config, args.probe_every, not args.stock_vae, arch=args.arch)
    start = curve[0].localization_loss
    for point in curve:
        print(json.dumps({**asdict(point), "ratio": round(point.localization_loss / start, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
