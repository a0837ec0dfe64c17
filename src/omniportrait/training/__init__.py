"""Training of the Pivot ID Encoder with the face localization loss (paper §3.2, eq. 5), on accelerate.

``omniportrait train --data DIR_OR_SHARDS --preset sd15 --output RUN --max-steps N [--resume]``, or::

    from omniportrait.training import TrainConfig, train
    result = train(TrainConfig(data="records/", output="run/", preset="sd15"))
    result.pivot_encoder  # RUN/pivot_encoder, loadable with --pivot-encoder / PivotIDEncoder.from_pretrained

See ``docs/training.md``. Importing this package is cheap; the trainer (torch, diffusers, accelerate)
loads on first use.
"""

from omniportrait.training.config import TrainConfig

_LAZY = {"PivotTrainer", "TrainResult", "train"}


def __getattr__(name: str):
    if name in _LAZY:
        from omniportrait.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'omniportrait.training' has no attribute {name!r}")


__all__ = ["PivotTrainer", "TrainConfig", "TrainResult", "train"]
