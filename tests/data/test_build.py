"""End-to-end builds on real photos and synthetic rejects (paper §4.1, appendix A.1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniportrait.data.build import build_dataset
from omniportrait.data.loader import iter_records
from omniportrait.errors import ConfigError

from tests.data.helpers import EXPECTED_REASONS, small_config, shard_bytes, stats_reasons


def test_every_input_is_counted_under_its_reason(mixed_build):
    assert stats_reasons(mixed_build.output) == EXPECTED_REASONS
    expected_counts = {}
    for reason in EXPECTED_REASONS.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert {k: v for k, v in mixed_build.counts.items() if v} == expected_counts
    assert mixed_build.inputs == len(EXPECTED_REASONS) == sum(mixed_build.counts.values())
    assert mixed_build.shards == 4 and mixed_build.shards_built == 4


def test_astronaut_record_is_correct(mixed_build):
    records = {r.source: r for r in iter_records(mixed_build.output)}
    assert set(records) == {"astronaut.png", "astronaut_json.png"}
    record = records["astronaut.png"]
    assert record.caption == "a woman in a spacesuit"
    assert record.class_word == "woman" and record.class_lemma == "woman"
    assert record.caption[record.class_span[0]:record.class_span[1]] == "woman"
    assert record.image.size == (512, 512) and record.image.mode == "RGB"
    x0, y0, x1, y1 = record.face_box
    # the astronaut's face is in the upper middle, about 100 px wide
    assert 140 < (x0 + x1) / 2 < 300 and 60 < (y0 + y1) / 2 < 200 and 70 < x1 - x0 < 160
    px0, py0, px1, py1 = record.person_box
    assert px0 <= x0 and py0 <= y0 and px1 >= x1 and py1 >= y1
    assert 0.5 < record.face_score <= 1.0
    assert record.face_area_ratio == pytest.approx((x1 - x0) * (y1 - y0) / 512**2)
    mask = record.face_mask
    assert mask.shape == (512, 512) and mask.dtype == bool and 3000 < mask.sum() < 20000
    rows, cols = np.nonzero(mask)
    assert x0 - 10 <= cols.mean() <= x1 + 10 and y0 - 10 <= rows.mean() <= y1 + 10
    assert record.face_crop.size == (224, 224) and record.face_crop.mode == "RGB"
    assert record.face_crop_mask.shape == (224, 224) and 0.2 < record.face_crop_mask.mean() < 0.8
    # the crop matrix maps the face box centre near the crop centre
    centre = record.crop_matrix @ np.array([(x0 + x1) / 2, (y0 + y1) / 2, 1.0])
    assert np.all(np.abs(centre - 112) < 30)


def test_json_sidecar_caption_scores_and_possessive_span(mixed_build):
    record = next(r for r in iter_records(mixed_build.output) if r.source == "astronaut_json.png")
    assert record.caption == "the astronaut's portrait: a woman's smile"
    assert record.class_span == (28, 33) and record.class_word == "woman"
    assert record.aesthetic == 6.5 and record.watermark == 0.1
    assert record.metadata["pwatermark"] == 0.1


def test_stored_image_is_the_input(mixed_build, mixed_inputs):
    record = next(r for r in iter_records(mixed_build.output) if r.source == "astronaut.png")
    assert np.array_equal(np.asarray(record.image), np.asarray(Image.open(mixed_inputs / "astronaut.png")))


def test_index_parquet_has_one_row_per_record(mixed_build):
    import pyarrow.parquet as pq

    table = pq.read_table(mixed_build.index_path).to_pylist()
    assert [row["source"] for row in table] == ["astronaut.png", "astronaut_json.png"]
    row = table[0]
    assert row["class_word"] == "woman" and (row["class_start"], row["class_end"]) == (2, 7)
    assert row["shard"].startswith("shard-") and row["shard"].endswith(".tar")
    assert (row["width"], row["height"]) == (512, 512) and 0.5 < row["face_score"] <= 1
    assert row["aesthetic"] is None and table[1]["aesthetic"] == 6.5


def test_report_has_counts_and_fig8_plots(mixed_build):
    text = mixed_build.report_path.read_text()
    assert "| multiple_faces | 1 |" in text and "| corrupt | 3 |" in text and "| no_face | 3 |" in text
    assert "**2**" in text
    for name in ("face_area_ratio.png", "face_confidence.png"):
        path = mixed_build.output / "report" / name
        assert f"report/{name}" in text
        with Image.open(path) as plot:
            assert plot.format == "PNG" and plot.size[0] >= 300


def test_rerun_skips_finished_shards_and_keeps_results(tmp_path, mixed_inputs):
    config = small_config(mixed_inputs, tmp_path / "out")
    first = build_dataset(config)
    before = shard_bytes(config.output)
    second = build_dataset(config)
    assert second.shards_built == 0 and second.counts == first.counts
    assert shard_bytes(config.output) == before


def test_unfinished_shard_and_stale_temporaries_are_rebuilt(tmp_path, mixed_inputs):
    config = small_config(mixed_inputs, tmp_path / "out")
    build_dataset(config)
    reference = shard_bytes(config.output)
    out = Path(config.output)
    (out / "stats" / "shard-000001.json").unlink()  # killed after the tar, before its stats
    (out / "shards" / "shard-000002.tar").unlink()  # killed before the tar
    (out / "stats" / "shard-000002.json").unlink()
    (out / "shards" / ".shard-000003.tar.abc.tmp").write_bytes(b"half a tar")
    result = build_dataset(config)
    assert result.shards_built == 2
    assert shard_bytes(config.output) == reference
    assert not list((out / "shards").glob(".*.tmp"))


def test_changed_arguments_are_refused(tmp_path, mixed_inputs):
    build_dataset(small_config(mixed_inputs, tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"different arguments \(shard_size: 4 -> 5\)"):
        build_dataset(small_config(mixed_inputs, tmp_path / "out", shard_size=5))


def test_changed_input_is_refused(tmp_path, astronaut_image):
    source = tmp_path / "in"
    source.mkdir()
    astronaut_image.save(source / "a.png")
    (source / "a.txt").write_text("a woman")
    build_dataset(small_config(source, tmp_path / "out"))
    astronaut_image.save(source / "b.png")
    with pytest.raises(ConfigError, match="the input changed"):
        build_dataset(small_config(source, tmp_path / "out"))


def test_bad_arguments_fail_before_writing(tmp_path, mixed_inputs):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="does not exist"):
        build_dataset(small_config(tmp_path / "missing", out))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        build_dataset(small_config(empty, out))
    with pytest.raises(ConfigError, match="shard-size"):
        build_dataset(small_config(mixed_inputs, out, shard_size=0))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no build.json"):
        build_dataset(small_config(mixed_inputs, taken))
    assert not out.exists()


def test_no_caption_anywhere_fails_before_any_work(tmp_path, astronaut_image):
    source = tmp_path / "in"
    source.mkdir()
    astronaut_image.save(source / "a.png")
    with pytest.raises(ConfigError, match="no captioner is configured"):
        build_dataset(small_config(source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_captioner_plugin_captions_images_without_one(tmp_path, astronaut_image):
    source = tmp_path / "in"
    source.mkdir()
    astronaut_image.save(source / "a.png")
    result = build_dataset(small_config(source, tmp_path / "out", captioner="tests.data.stubs:FixedCaptioner"))
    record = next(iter_records(result.output))
    assert record.caption == "a photo of a person" and record.class_word == "person"


@pytest.mark.parametrize(
    ("analyzer", "reason"),
    [("tests.data.stubs:NoPersonAnalyzer", "no_person"), ("tests.data.stubs:PersonElsewhereAnalyzer", "face_outside_person")],
)
def test_person_box_filters(tmp_path, astronaut_image, analyzer, reason):
    source = tmp_path / "in"
    source.mkdir()
    astronaut_image.save(source / "a.png")
    (source / "a.txt").write_text("a woman")
    result = build_dataset(small_config(source, tmp_path / "out", face_analyzer=analyzer))
    assert result.counts[reason] == 1 and result.kept == 0
    assert shard_bytes(result.output)["shard-000000.tar"]  # an empty but valid shard is published


def test_unknown_plugin_is_a_config_error(tmp_path, mixed_inputs):
    with pytest.raises(ConfigError, match="cannot load face analyzer"):
        build_dataset(small_config(mixed_inputs, tmp_path / "out", face_analyzer="tests.data.stubs:Nope"))
    with pytest.raises(ConfigError, match="unknown"):
        build_dataset(small_config(mixed_inputs, tmp_path / "out", captioner="blip3"))


def test_folder_output_format_holds_the_same_records(tmp_path, mixed_inputs, mixed_build):
    result = build_dataset(small_config(mixed_inputs, tmp_path / "out", output_format="folder"))
    assert result.counts == mixed_build.counts
    folder = Path(result.output) / "shards" / "shard-000000"
    names = sorted(p.name for p in folder.iterdir())
    assert "000000000.json" in names and "000000000.mask.png" in names and "000000000.face.png" in names
    tar_records = {r.key: r for r in iter_records(mixed_build.output)}
    for record in iter_records(result.output):
        other = tar_records[record.key]
        assert record.caption == other.caption and record.face_box == other.face_box
        assert np.array_equal(record.face_mask, other.face_mask)
        assert np.array_equal(np.asarray(record.face_crop), np.asarray(other.face_crop))


def test_build_from_webdataset_shards(tmp_path, mixed_build):
    """A build's own shards are valid input: re-filtering them keeps the same records."""
    result = build_dataset(small_config(Path(mixed_build.output) / "shards", tmp_path / "again"))
    assert result.inputs == 2 and result.kept == 2
    first = {r.caption: r for r in iter_records(mixed_build.output)}
    for record in iter_records(result.output):
        assert record.source.startswith("shard-0000") and ":" in record.source
        assert record.face_box == pytest.approx(first[record.caption].face_box)


def test_local_pool_gives_the_same_shards(tmp_path, mixed_inputs, mixed_build):
    result = build_dataset(small_config(mixed_inputs, tmp_path / "pool", workers=2))
    assert result.counts == mixed_build.counts
    assert shard_bytes(result.output) == shard_bytes(mixed_build.output)
    workers = {json.loads(p.read_text())["worker"] for p in (Path(result.output) / "stats").glob("*.json")}
    pids = {int(worker.rsplit(":", 1)[1]) for worker in workers}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_face_pasted_on_a_pattern_has_no_person(tmp_path, astronaut_image):
    """A portrait-like pattern with the real analyzer: a face detector fires, person segmentation does not."""
    checker = np.kron((np.indices((8, 8)).sum(0) % 2).astype(np.uint8) * 255, np.ones((64, 64), np.uint8))
    pattern = np.stack([checker] * 3, axis=-1)
    face = np.asarray(astronaut_image.crop((150, 40, 300, 200)).resize((100, 106)))
    pattern[203:309, 206:306] = face
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(pattern).save(source / "poster.png")
    (source / "poster.txt").write_text("a poster of a woman")
    result = build_dataset(small_config(source, tmp_path / "out"))
    assert stats_reasons(result.output) == {"poster.png": "no_person"}


def test_output_inside_the_input_folder_is_not_read_back(tmp_path, astronaut_image):
    source = tmp_path / "in"
    source.mkdir()
    astronaut_image.save(source / "a.png")
    (source / "a.txt").write_text("a woman")
    config = small_config(source, source / "build", output_format="folder")
    first = build_dataset(config)
    second = build_dataset(config)
    assert first.inputs == second.inputs == 1 and second.shards_built == 0
