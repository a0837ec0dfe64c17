"""``omniportrait train``: train the Pivot ID Encoder with the face localization loss (paper eq. 5).

One flag per :class:`omniportrait.training.TrainConfig` field, with the paper's defaults. Runs as one
process as is; on several GPUs or nodes, under ``accelerate launch`` (``docs/training.md``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import types
import typing
from dataclasses import MISSING, fields

from omniportrait.cli.args import checked, choice_of, number, text
from omniportrait.files import check_input_file, check_input_folder, check_output_folder
from omniportrait.training.config import TrainConfig

PATH_KINDS = {check_input_file: "file", check_input_folder: "folder", check_output_folder: "output folder"}
"""What a path flag takes, by its check (the kind of an argparse type, see omniportrait.cli.args)."""
EXAMPLE = "omniportrait train --data records/ --preset sd15 --output runs/pie --max-steps 80000 [--resume]"


@functools.lru_cache(maxsize=1)
def config_types() -> dict:
    """The resolved annotations of :class:`TrainConfig` (resolving them is slow; the parser needs them once)."""
    return typing.get_type_hints(TrainConfig)


def argument_kwargs(name: str) -> dict:
    """``add_argument`` keywords for the :class:`TrainConfig` field ``name`` from its annotation and the values
    its metadata accepts (``range``, ``choices``, ``check``), so a bad value is refused while parsing."""
    kind = config_types()[name]
    meta = TrainConfig.__dataclass_fields__[name].metadata
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # "int | None" -> int
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is tuple:
        return {"nargs": "+", "type": text("prompt")}
    if "range" in meta:
        return {"type": number(meta["range"])}
    if "choices" in meta:
        return {"type": choice_of(meta["choices"], name.replace("_", " "))}
    if "check" in meta:
        return {"type": checked(meta["check"], PATH_KINDS.get(meta["check"], name.replace("_", " ")))}
    return {"type": text(name.replace("_", " "))}


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
        kwargs = argument_kwargs(item.name)
        if not required:
            kwargs["default"] = default
            help_text += f" (default: {default})" if kwargs.get("action") is None and default is not None else ""
        p.add_argument(flag, dest=item.name, required=required, help=help_text, **kwargs)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{item.name: getattr(args, item.name) for item in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    from omniportrait.training import train

    config = config_from_args(args).validate()
    result = train(config)
    if result.main_process:
        print(f"trained {result.step} steps; pivot encoder in {result.pivot_encoder} "
              f"(use it with: omniportrait generate --pivot-encoder {result.pivot_encoder})", file=sys.stderr)
    return 0
