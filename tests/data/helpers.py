"""Helpers of the dataset tests: real photos (scikit-image's astronaut, cat), synthetic rejects, small builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from omniportrait.data.build import BuildConfig
from omniportrait.data.filters import FilterConfig

MIN_SIDE = 256
"""Tests use 256 instead of the paper's 512 so that the 512² astronaut passes and stays fast."""

EXPECTED_REASONS = {
    "astronaut.png": "kept",
    "astronaut_json.png": "kept",
    "blank.png": "no_face",
    "cat.jpg": "no_face",
    "checkerboard.png": "no_face",
    "two_faces.png": "multiple_faces",
    "tiny.png": "too_small",
    "broken.jpg": "corrupt",
    "truncated.jpg": "corrupt",
    "bad_sidecar.png": "corrupt",
    "low_aesthetic.png": "low_aesthetic",
    "watermarked.png": "watermark",
    "no_caption.png": "no_caption",
    "no_noun.png": "no_person_noun",
}
"""Every input of :func:`write_mixed_inputs` and the reason it must be counted under."""


def write_mixed_inputs(folder: Path, astronaut: Image.Image) -> Path:
    """A folder with two keepers and one input per rejection reason a real photo can reach."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str, image: Image.Image, caption: str | None = None, meta: dict | None = None) -> None:
        image.save(folder / name)
        stem = name.rsplit(".", 1)[0]
        if caption is not None:
            (folder / f"{stem}.txt").write_text(caption)
        if meta is not None:
            (folder / f"{stem}.json").write_text(json.dumps(meta))

    save("astronaut.png", astronaut, "a woman in a spacesuit")
    save("astronaut_json.png", astronaut.transpose(Image.FLIP_LEFT_RIGHT),
         meta={"caption": "the astronaut's portrait: a woman's smile", "aesthetic": 6.5, "pwatermark": 0.1})
    save("blank.png", Image.new("RGB", (512, 512), (128, 128, 128)), "a gray wall")
    save("cat.jpg", Image.fromarray(data.chelsea()).resize((600, 400)), "a cat on a rug")
    checker = np.kron((np.indices((8, 8)).sum(0) % 2).astype(np.uint8) * 255, np.ones((64, 64), np.uint8))
    save("checkerboard.png", Image.fromarray(checker).convert("RGB"), "a checkerboard")
    pixels = np.asarray(astronaut)
    save("two_faces.png", Image.fromarray(np.concatenate([pixels, pixels[:, ::-1]], axis=1)), "two women")
    save("tiny.png", astronaut.resize((200, 200)), "a woman")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "broken.txt").write_text("a woman")
    astronaut.save(folder / "full.jpg", quality=90)
    (folder / "truncated.jpg").write_bytes((folder / "full.jpg").read_bytes()[:5000])
    (folder / "full.jpg").unlink()
    (folder / "truncated.txt").write_text("a woman")
    save("bad_sidecar.png", astronaut)
    (folder / "bad_sidecar.json").write_text("{not json")
    save("low_aesthetic.png", astronaut, meta={"caption": "a woman", "aesthetic": 4.2})
    save("watermarked.png", astronaut, meta={"caption": "a woman", "aesthetic": 6.0, "pwatermark": 0.8})
    save("no_caption.png", astronaut)
    save("no_noun.png", astronaut, "an astronaut in a spacesuit")
    return folder


def small_config(source, output, **overrides) -> BuildConfig:
    """A fast in-process build: min side 256, 4 inputs per shard, no progress bar."""
    values = dict(input=str(source), output=str(output), shard_size=4, filters=FilterConfig(min_side=MIN_SIDE),
                  workers=0, progress=False)
    values.update(overrides)
    return BuildConfig(**values)


def shard_bytes(output: Path) -> dict[str, bytes]:
    """Every published shard of a build, by name."""
    return {p.name: p.read_bytes() for p in sorted((Path(output) / "shards").glob("shard-*.tar"))}


def stats_reasons(output: Path) -> dict[str, str]:
    """``{source: reason}`` for every input of a finished build, from its stats files."""
    reasons = {}
    for path in sorted((Path(output) / "stats").glob("shard-*.json")):
        stats = json.loads(path.read_text())
        reasons.update({row["source"]: "kept" for row in stats["records"]})
        reasons.update({row["source"]: row["reason"] for row in stats["rejected"]})
    return reasons
