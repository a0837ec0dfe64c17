"""A build killed mid-way and rerun with the same arguments ends with the records of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from omniportrait.data.build import build_dataset
from omniportrait.data.loader import iter_records

from tests.data.helpers import small_config, shard_bytes

REPO = Path(__file__).resolve().parents[2]
SHARDS = 8


def _inputs(folder: Path, astronaut: Image.Image) -> Path:
    """Eight astronaut variants (shifted crops), one shard each."""
    folder.mkdir()
    pixels = np.asarray(astronaut)
    for index in range(SHARDS):
        crop = pixels[index * 8 : index * 8 + 440, index * 6 : index * 6 + 440]
        Image.fromarray(crop).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a woman number {index}")
    return folder


def _config(source: Path, output: Path):
    return small_config(source, output, shard_size=1, face_analyzer="tests.data.stubs:SlowAnalyzer")


def _start_build(source: Path, output: Path) -> subprocess.Popen:
    """The build in a child process, as a user would run it, killable at any moment."""
    code = (
        "import sys; from tests.data.test_resume import _config; from omniportrait.data.build import build_dataset; "
        "from pathlib import Path; build_dataset(_config(Path(sys.argv[1]), Path(sys.argv[2])))"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(source), str(output)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_stats(output: Path, count: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list((output / "stats").glob("shard-*.json"))) >= count:
            return
        assert process.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("the build made no progress")


def test_killed_build_resumes_to_the_uninterrupted_result(tmp_path, astronaut_image):
    source = _inputs(tmp_path / "in", astronaut_image)
    killed = tmp_path / "killed"
    process = _start_build(source, killed)
    try:
        _wait_for_stats(killed, 2, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = len(list((killed / "stats").glob("shard-*.json")))
    assert 2 <= finished < SHARDS
    assert not (killed / "index.parquet").exists()

    resumed = build_dataset(_config(source, killed))
    assert resumed.shards_built == SHARDS - finished
    uninterrupted = build_dataset(_config(source, tmp_path / "clean"))
    assert resumed.counts == uninterrupted.counts and resumed.kept == SHARDS
    assert shard_bytes(killed) == shard_bytes(uninterrupted.output)
    assert not [p for p in (killed / "shards").iterdir() if p.name.startswith(".")]
    assert [r.caption for r in iter_records(killed)] == [f"a woman number {i}" for i in range(SHARDS)]
    import pyarrow.parquet as pq

    assert pq.read_table(resumed.index_path).equals(pq.read_table(uninterrupted.index_path))
