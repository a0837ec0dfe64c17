"""``omniportrait web``: the Gradio app (``pip install 'omniportrait[web]'``); the model loads once, at start-up."""

from __future__ import annotations

import argparse
import sys

from omniportrait.cli.args import number, text
from omniportrait.cli.generate import add_model_arguments
from omniportrait.errors import MissingDependencyError
from omniportrait.values import Range

PORT = Range(1, 65535, integer=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "web", help="serve the web app: photos and a prompt in, portraits with their sidecars out",
        description="Serve the OmniPortrait web app (Gradio). The model loads once; requests queue one at a time.",
    )
    add_model_arguments(p, preset_note="; tiny-sd15 runs offline on a CPU")
    p.add_argument("--host", default="127.0.0.1", type=text("host"),
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", default=7860, type=number(PORT), help="port to listen on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the model files, load the pipeline once, then serve until interrupted."""
    from omniportrait.pipelines.loading import check_base, check_pivot_encoder, load_pipeline

    if args.base is not None:
        check_base(args.base)
    if args.pivot_encoder is not None:
        check_pivot_encoder(args.pivot_encoder)
    try:
        from omniportrait.web.app import build_demo, launch
    except ImportError as err:
        raise MissingDependencyError(f"the web app needs gradio ({err}); pip install 'omniportrait[web]'") from None
    pipe = load_pipeline(args.preset, args.base, args.arch, args.pivot_encoder, args.device, args.dtype, "ddim")
    demo = build_demo(pipe, preset=args.preset, base=args.base, arch=args.arch, pivot_encoder=args.pivot_encoder,
                      device=args.device, dtype=args.dtype)
    print(f"omniportrait web: serving on http://{args.host}:{args.port} (Ctrl+C stops)", file=sys.stderr)
    launch(demo, host=args.host, port=args.port, share=args.share, block=True)
    return 0
