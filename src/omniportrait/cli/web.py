"""``omniportrait web``: the Gradio app (``pip install 'omniportrait[web]'``); the model loads once, at start-up."""

from __future__ import annotations

import argparse
import sys

from omniportrait.cli.args import choice_of, device_name, dtype_name, existing_folder, number, text
from omniportrait.errors import MissingDependencyError
from omniportrait.pipelines.loading import PRESETS
from omniportrait.values import Range

PORT = Range(1, 65535, integer=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "web", help="serve the web app: photos and a prompt in, portraits with their sidecars out",
        description="Serve the OmniPortrait web app (Gradio). The model loads once; requests queue one at a time.",
    )
    p.add_argument("--preset", default="sd15", type=choice_of(PRESETS, "preset"),
                   help=f"one of {', '.join(PRESETS)} (default: sd15; tiny-sd15 runs offline on a CPU)")
    p.add_argument("--base", default=None, type=text("base model"),
                   help="hub id, diffusers folder or .safetensors file (overrides preset)")
    p.add_argument("--arch", choices=("sd15", "sdxl"), default=None, help="architecture of --base if not detected")
    p.add_argument("--pivot-encoder", default=None, type=existing_folder(),
                   help="folder of a trained PivotIDEncoder (save_pretrained)")
    p.add_argument("--device", default="auto", type=device_name, help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", type=dtype_name, help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16")
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
