"""``omniportrait`` command line: one subcommand per capability."""

from __future__ import annotations

import importlib
import os
import sys

from omniportrait.errors import OmniPortraitError

# subcommand name -> module under omniportrait.cli providing add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "generate": "generate",
    "evaluate": "evaluate",
    "build-dataset": "build_dataset",
    "train": "train",
    "control": "control",
    "convert": "convert",
    "web": "web",
}


def build_parser(parser_class=None):
    """The ``omniportrait`` parser; ``parser_class`` (default :class:`OneLineParser`) lets the web app parse the
    same command lines with refusals raised instead of printed."""
    from omniportrait import __version__

    from omniportrait.cli.args import OneLineParser

    parser = (parser_class or OneLineParser)(
        prog="omniportrait", description="Identity-customized portraits on Stable Diffusion 1.5 and SDXL."
    )
    parser.add_argument("--version", action="version", version=f"omniportrait {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(f"omniportrait.cli.{module_name}").add_parser(subparsers)
    return parser


def show_warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings in the CLI are one line for the user, without source locations."""
    print(f"omniportrait: warning: {message}", file=sys.stderr)


def quiet_libraries() -> None:
    """Keep library chatter (backend notices, deprecations) off the user's terminal; errors still show."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = show_warning_line
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a refused flag (one line already printed, status 2), --help or --version
        return stop.code if isinstance(stop.code, int) else 0
    try:
        return args.run(args)
    except OmniPortraitError as err:
        print(f"omniportrait {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"omniportrait {args.command}: interrupted", file=sys.stderr)
        return 130

