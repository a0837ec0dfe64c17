"""``omniportrait train``: train the Pivot ID Encoder with the face localization loss (paper eq. 5).

One flag per :class:`omniportrait.training.TrainConfig` field, with the paper's defaults. Runs as one
process as is; on several GPUs or nodes, under ``accelerate launch`` (``docs/training.md``).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields

from omniportrait.training.config import TrainConfig

EXAMPLE = "omniportrait train --data records/ --preset sd15 --output runs/pie --max-steps 80000 [--resume]"


def _base_type(annotation: str):
    """The element type of a field annotation such as ``int | None`` or ``tuple[str, ...]``."""
    hints = typing.get_type_hints(TrainConfig)
    return hints[annotation]


def _flag_kwargs(name: str, default) -> dict:
    kind = _base_type(name)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (typing.Union, types.UnionType):
        kind = args[0]
    if typing.get_origin(kind) is tuple:
        return {"nargs": "+", "type": str}
    return {"type": kind}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the Pivot ID Encoder on face records (accelerate; resumable)",
        description="Train the Pivot ID Encoder and its projection with the face localization loss (eq. 5). "
                    f"Example: {EXAMPLE}",
    )
    for item in fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "")
        required = item.default is MISSING and item.default_factory is MISSING
        default = None if required else (item.default if item.default is not MISSING else item.default_factory())
        kwargs = _flag_kwargs(item.name, default)
        if not required:
            kwargs["default"] = default
            help_text += f" (default: {default})" if kwargs.get("action") is None else ""
        p.add_argument(flag, dest=item.name, required=required, help=help_text, **kwargs)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{item.name: getattr(args, item.name) for item in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    from omniportrait.training import train

    config = config_from_args(args).validate()
    result = train(config)
    print(f"trained {result.step} steps; pivot encoder in {result.pivot_encoder} "
          f"(use it with: omniportrait generate --pivot-encoder {result.pivot_encoder})", file=sys.stderr)
    return 0
