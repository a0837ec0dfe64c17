import json
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from omniportrait.errors import ConfigError
from omniportrait.models.tiny import tiny_tokenizer
from omniportrait.identity import locate_class_word
from omniportrait.training.data import (
    BatchStream,
    RecordSource,
    class_word_positions,
    make_dataloader,
    resumed_position,
)
from omniportrait.training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def keys_of(stream, count):
    return [batch.keys for batch in itertools.islice(iter(stream), count)]


def test_batches_hold_images_masks_faces_and_class_word_positions(records_dir, tokenizer):
    batch = next(iter(BatchStream(RecordSource(str(records_dir)), tokenizer, 64, 3)))
    assert batch.pixel_values.shape == (3, 3, 64, 64)
    assert -1.0 <= batch.pixel_values.min() and batch.pixel_values.max() <= 1.0
    assert batch.masks.shape == (3, 1, 64, 64)
    assert len(batch.faces) == 3 and all(isinstance(face, Image.Image) for face in batch.faces)
    for key, caption, positions, mask in zip(batch.keys, batch.captions, batch.positions, batch.masks):
        assert positions == locate_class_word(tokenizer, caption, "woman")
        truth = np.asarray(Image.open(records_dir / f"{key}.mask.png")) > 127
        assert mask[0].numpy().mean() == pytest.approx(truth.mean(), abs=0.02)  # the ellipse of that record
    assert batch.original_sizes == [(64, 64)] * 3 and batch.crop_top_lefts == [(0, 0)] * 3


def test_the_character_span_picks_its_occurrence(tokenizer):
    caption = "a woman and a woman"
    first = class_word_positions(tokenizer, caption, "woman", (2, 7))
    second = class_word_positions(tokenizer, caption, "woman", (14, 19))
    assert first != second
    assert first + second == locate_class_word(tokenizer, caption, "woman")


def test_processes_read_disjoint_records_that_cover_an_epoch(records_dir, tokenizer):
    source = RecordSource(str(records_dir))
    ranks = [keys_of(BatchStream(source, tokenizer, 64, 2, rank=rank, world_size=2), 3) for rank in (0, 1)]
    seen = [set(key for batch in keys for key in batch) for keys in ranks]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"{i:05d}" for i in range(12)}


def test_a_stream_started_at_micro_batch_k_continues_the_same_order(records_dir, tokenizer):
    source = RecordSource(str(records_dir), seed=3)
    full = keys_of(BatchStream(source, tokenizer, 64, 5), 6)  # crosses into the second epoch
    resumed = keys_of(BatchStream(source, tokenizer, 64, 5, start=4), 2)
    assert resumed == full[4:6]
    assert [b.position for b in itertools.islice(iter(BatchStream(source, tokenizer, 64, 5, start=4)), 2)] == [5, 6]


def test_dataloader_workers_keep_the_order(records_dir, tokenizer):
    stream = BatchStream(RecordSource(str(records_dir)), tokenizer, 64, 2)
    alone = keys_of(make_dataloader(stream, 0), 5)
    assert keys_of(make_dataloader(stream, 2), 5) == alone


def test_records_whose_class_word_cannot_be_bound_are_skipped(tmp_path, tokenizer):
    write_synthetic_dataset(tmp_path, count=4)
    meta = json.loads((tmp_path / "00001.json").read_text())
    caption = "a photo of " + "very " * 80 + "woman"  # the class word lies past the 77-token limit
    meta.update(caption=caption, class_span=[len(caption) - 5, len(caption)])
    (tmp_path / "00001.json").write_text(json.dumps(meta))
    keys = {key for batch in keys_of(BatchStream(RecordSource(str(tmp_path)), tokenizer, 64, 3), 4) for key in batch}
    assert keys == {"00000", "00002", "00003"}


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RecordSource(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="no training records"):
        RecordSource(str(tmp_path))


def test_fewer_units_than_processes_is_a_clear_error(tmp_path):
    write_synthetic_dataset(tmp_path, count=1)
    with pytest.raises(ConfigError, match="at least as many shards as processes"):
        RecordSource(str(tmp_path)).check_processes(2)


def test_resumed_position_keeps_the_share_of_records_when_the_layout_changes():
    assert resumed_position(10, {"batch_size": 4, "world_size": 2}, 4, 2) == 10
    with pytest.warns(UserWarning, match="not exactly"):
        assert resumed_position(10, {"batch_size": 4, "world_size": 2}, 2, 8) == 5


def test_webdataset_shards_are_read_through_the_dataset_loader(tmp_path, records_dir, tokenizer):
    import tarfile

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for shard, names in enumerate((range(0, 6), range(6, 12))):
        with tarfile.open(shard_dir / f"shard-{shard:05d}.tar", "w") as tar:
            for index in names:
                for suffix in (".png", ".json", ".mask.png"):
                    tar.add(records_dir / f"{index:05d}{suffix}", arcname=f"{index:05d}{suffix}")
    source = RecordSource(str(shard_dir))
    assert len(source) == 2
    batch = next(iter(BatchStream(source, tokenizer, 64, 4)))
    folder_batch = next(iter(BatchStream(RecordSource(str(records_dir)), tokenizer, 64, 12)))
    by_key = dict(zip(folder_batch.keys, folder_batch.masks))
    for key, mask in zip(batch.keys, batch.masks):
        assert torch.equal(mask, by_key[key])
