"""``omniportrait convert photomaker CHECKPOINT --out DIR``: a public pivot's weights as our encoder folder.

PhotoMaker v1 (``photomaker-v1.bin`` from ``TencentARC/PhotoMaker``, or its ``.safetensors`` form) becomes a
``PivotIDEncoder`` folder (safetensors, ``mlp`` fusion, SDXL only) with its UNet LoRA beside it
(``DIR/photomaker_lora.safetensors``); ``--pivot-encoder DIR`` loads both. See
:mod:`omniportrait.models.photomaker`.
"""

from __future__ import annotations

import argparse
import sys

from omniportrait.cli.args import checked, output_folder

SOURCES = ("photomaker",)


def add_parser(subparsers) -> None:
    from omniportrait.files import check_input_file

    p = subparsers.add_parser(
        "convert", help="convert a public pivot encoder (PhotoMaker v1) into an OmniPortrait encoder folder",
        description="Convert PhotoMaker v1 (photomaker-v1.bin or .safetensors, SDXL) into a pivot encoder folder "
                    "(safetensors) with its UNet LoRA, for --pivot-encoder DIR. Example: omniportrait convert "
                    "photomaker photomaker-v1.bin --out photomaker-v1",
    )
    p.add_argument("source", choices=SOURCES, help="what the checkpoint is: photomaker (v1)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=checked(check_input_file, "file"),
                   help="the checkpoint file (.bin, loaded weights-only, or .safetensors)")
    p.add_argument("--out", required=True, type=output_folder(), help="the encoder folder to write (new or empty)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from omniportrait.models.photomaker import convert

    result = convert(args.checkpoint, args.out)
    lora = f" and its UNet LoRA {result.lora}" if result.lora else " (no LoRA)"
    print(f"wrote the PhotoMaker pivot encoder {result.folder}{lora}; use it with: omniportrait generate --preset "
          f"sdxl --pivot-encoder {result.folder} --identity PHOTO:WORD --prompt '... WORD ...'", file=sys.stderr)
    return 0
