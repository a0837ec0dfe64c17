"""Guidance cost against diffusers' plain pipeline: ``omniportrait bench`` on the shipped sample photo.

    python benchmarks/bench_guidance.py [--steps 50] [--repeats 3] [--models tiny-sd15 random-sdxl ...]

Tiny presets on the CPU always; on a CUDA machine also the real SD1.5 (512²) and SDXL (1024²) architectures
with random weights in fp16. Any ``omniportrait bench`` flag is passed through. Results: README.md here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "astronaut.jpg"

if __name__ == "__main__":
    from omniportrait.cli import main

    arguments = sys.argv[1:]
    if "--reference" not in arguments:
        arguments += ["--reference", str(SAMPLE)]
    raise SystemExit(main(["bench", *arguments]))
