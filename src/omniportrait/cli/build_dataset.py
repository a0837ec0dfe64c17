"""``omniportrait build-dataset``: images, shards or a URL table -> OmniPortrait-1M style training shards."""

from __future__ import annotations

import argparse
import sys

from omniportrait.cli.args import finite_float, int_in, output_folder, text
from omniportrait.data.build import DEFAULT_FACE_SIZE, DEFAULT_SHARD_SIZE, INPUT_FORMATS, OUTPUT_FORMATS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "build-dataset", help="build training shards (image, caption, class word, face crop, face mask)",
        description="Filter and annotate images into OmniPortrait-1M style training shards (paper §4.1, A.1). "
                    "Rerun the same command to resume an interrupted build.",
    )
    p.add_argument("--input", required=True, metavar="SRC", type=text("input"),
                   help="folder of images (NAME.txt / NAME.json sidecars), .tar shards (folder, file, "
                        "{000..009} pattern) or a .parquet/.csv/.tsv URL table (needs img2dataset)")
    p.add_argument("--output", required=True, metavar="DIR", type=output_folder(),
                   help="build folder: shards, index.parquet, report.md")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                   help="what --input is (default: from the path)")
    p.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="webdataset",
                   help="webdataset tar shards (default) or plain folders of files")
    p.add_argument("--min-side", metavar="N", type=int_in(0, 65536), default=512,
                   help="keep images with both sides > N pixels (paper: 512)")
    p.add_argument("--min-aesthetic", metavar="X", type=finite_float(-1e6, 1e6), default=5.0,
                   help="keep images whose aesthetic score, when given, is > X (paper: 5); negative: off")
    p.add_argument("--max-watermark", metavar="X", type=finite_float(-1e6, 1e6), default=0.5,
                   help="keep images whose watermark probability, when given, is < X (paper: 0.5); > 1: off")
    p.add_argument("--person-tolerance", metavar="F", type=finite_float(0, 100), default=0.1,
                   help="how far the face box may stick out of the person box, fraction of the face size")
    p.add_argument("--shard-size", metavar="N", type=int_in(1, 10**7), default=DEFAULT_SHARD_SIZE,
                   help="inputs per shard (default: %(default)s)")
    p.add_argument("--face-size", metavar="PX", type=int_in(16, 4096), default=DEFAULT_FACE_SIZE,
                   help="side of the aligned face crop (default: %(default)s)")
    p.add_argument("--face-analyzer", metavar="NAME", default="mediapipe", type=text("face analyzer"),
                   help="mediapipe or package.module:factory")
    p.add_argument("--captioner", metavar="NAME", default="metadata", type=text("captioner"),
                   help="metadata (captions of the inputs), blip2, or package.module:factory")
    p.add_argument("--captioner-model", type=text("captioner model"), metavar="MODEL", default=None, help="BLIP-2 checkpoint (default Salesforce/blip2-opt-2.7b)")
    p.add_argument("--recaption", action="store_true", help="caption every image with the captioner")
    p.add_argument("--noun-extractor", metavar="NAME", default="rules", type=text("noun extractor"),
                   help="rules or package.module:factory")
    p.add_argument("--url-col", metavar="COLUMN", default="url", type=text("URL column"),
                   help="URL column of a URL table")
    p.add_argument("--caption-col", metavar="COLUMN", default="caption", type=text("caption column"),
                   help="caption column of a URL table")
    p.add_argument("--workers", metavar="N", type=int_in(0, 1024), default=None,
                   help="worker processes (default: one per CPU; 0: build in this process)")
    p.add_argument("--ray", dest="ray_address", type=text("Ray address"), default=None, metavar="ADDRESS",
                   help="run shards on Ray: auto, ray://HOST:10001, HOST:6379, or local")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`~omniportrait.data.build.BuildConfig` the flags describe."""
    from omniportrait.data.build import BuildConfig, default_workers
    from omniportrait.data.filters import FilterConfig

    filters = FilterConfig(
        min_side=args.min_side,
        min_aesthetic=args.min_aesthetic if args.min_aesthetic >= 0 else None,
        max_watermark=args.max_watermark if args.max_watermark <= 1 else None,
        person_tolerance=args.person_tolerance,
    )
    return BuildConfig(
        input=args.input, output=args.output, input_format=args.input_format, output_format=args.output_format,
        shard_size=args.shard_size, filters=filters, face_size=args.face_size, face_analyzer=args.face_analyzer,
        captioner=args.captioner, captioner_model=args.captioner_model, recaption=args.recaption,
        noun_extractor=args.noun_extractor, url_col=args.url_col, caption_col=args.caption_col,
        workers=default_workers() if args.workers is None else args.workers, ray_address=args.ray_address,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from omniportrait.data.build import build_dataset

    result = build_dataset(config_from_args(args))
    rejected = ", ".join(f"{reason} {count}" for reason, count in result.counts.items() if count and reason != "kept")
    print(f"kept {result.kept} of {result.inputs} inputs ({rejected or 'none rejected'})")
    print(f"shards: {result.shards} ({result.shards_built} built now) in {result.output / 'shards'}")
    print(f"index: {result.index_path}")
    print(f"report: {result.report_path}")
    if result.failures:
        print(f"warning: {result.counts['failed']} input(s) failed unexpectedly, e.g. {result.failures[0]}",
              file=sys.stderr)
    return 0
