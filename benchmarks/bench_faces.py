"""Faces analysed per second on CPU by the default MediaPipe analyzer, at 512² and 1024².

Run: ``python benchmarks/bench_faces.py [--repeats N]``. The image is ``skimage.data.astronaut()`` resized
(one face). Each size is warmed up, then timed ``--repeats`` times; the median and best are printed. A
second line per size adds the aligned 224² crop that the ID encoder consumes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from PIL import Image


def time_calls(call, repeats: int, warm_up: int = 2) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``call`` after ``warm_up`` untimed calls."""
    for _ in range(warm_up):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def report(label: str, faces: int, times: list[float]) -> None:
    """Print one result line."""
    median = statistics.median(times)
    print(
        f"{label:<28} faces={faces}  median {median * 1000:7.1f} ms  best {min(times) * 1000:7.1f} ms  "
        f"{faces / median:6.1f} faces/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per size (default 20)")
    args = parser.parse_args()

    from skimage import data

    from omniportrait.faces import MediaPipeFaceAnalyzer, align_face

    astronaut = Image.fromarray(data.astronaut())
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; repeats={args.repeats}")
    start = time.perf_counter()
    analyzer = MediaPipeFaceAnalyzer()
    print(f"analyzer created in {time.perf_counter() - start:.2f} s")
    with analyzer:
        for side in (512, 1024):
            image = astronaut.resize((side, side), Image.BICUBIC)
            faces = analyzer.analyze(image)
            report(f"analyze {side}x{side}", len(faces), time_calls(lambda: analyzer.analyze(image), args.repeats))
            report(
                f"analyze+align224 {side}x{side}",
                len(faces),
                time_calls(lambda: [align_face(image, f, 224) for f in analyzer.analyze(image)], args.repeats),
            )


if __name__ == "__main__":
    main()
