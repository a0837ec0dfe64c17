"""The training data loader reads the builder's shards and the plain folder format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniportrait.data.loader import TrainingRecordDataset, collate_records, iter_records, list_units
from omniportrait.data.records import TrainingRecord
from omniportrait.errors import ConfigError


def test_shards_load_in_a_torch_dataloader_with_workers(mixed_build):
    dataset = TrainingRecordDataset(mixed_build.output)
    assert len(dataset.units) == 4
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_records)
    batches = list(loader)
    records = [record for batch in batches for record in batch]
    assert sorted(r.source for r in records) == ["astronaut.png", "astronaut_json.png"]
    for record in records:
        assert isinstance(record, TrainingRecord)
        assert record.caption[slice(*record.class_span)] == record.class_word
        assert record.face_mask.shape == record.image.size[::-1]


def test_transform_gives_tensors_for_training(mixed_build):
    def to_tensors(record: TrainingRecord) -> dict:
        return {
            "pixels": torch.from_numpy(np.array(record.image.resize((64, 64)))).permute(2, 0, 1),
            "face": torch.from_numpy(np.array(record.face_crop)).permute(2, 0, 1),
            "mask": torch.from_numpy(np.array(Image.fromarray(record.face_mask).resize((16, 16)))),
            "caption": record.caption,
        }

    loader = torch.utils.data.DataLoader(TrainingRecordDataset(mixed_build.output, transform=to_tensors), batch_size=2)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (2, 3, 64, 64) and batch["face"].shape == (2, 3, 224, 224)
    assert batch["mask"].dtype == torch.bool and batch["mask"].any()


def test_ranks_split_the_shards_and_shuffling_is_seeded(mixed_build):
    seen = []
    for rank in range(2):
        dataset = TrainingRecordDataset(mixed_build.output, rank=rank, world_size=2)
        seen.append([r.key for r in dataset])
    assert sorted(seen[0] + seen[1]) == sorted(r.key for r in iter_records(mixed_build.output))
    assert not set(seen[0]) & set(seen[1])
    shuffled = TrainingRecordDataset(mixed_build.output, shuffle=True, seed=3)
    first = [r.key for r in shuffled]
    assert [r.key for r in shuffled] == first
    assert sorted(first) == sorted(r.key for r in iter_records(mixed_build.output))


def test_webdataset_library_reads_the_shards(mixed_build):
    import webdataset as wds

    shards = [str(p) for p in sorted((Path(mixed_build.output) / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == 2
    sample = samples[0]
    assert sample["json"]["class_word"] == "woman" and sample["txt"] == "a woman in a spacesuit"
    assert sample["face.png"].size == (224, 224) and sample["png"].size == (512, 512)


def test_hand_made_folder_records_fill_span_and_crop(tmp_path, astronaut_image):
    folder = tmp_path / "records"
    folder.mkdir()
    astronaut_image.save(folder / "alice.jpg")
    mask = np.zeros((512, 512), dtype=bool)
    mask[80:170, 180:270] = True
    Image.fromarray(mask).save(folder / "alice.mask.png")
    (folder / "alice.json").write_text(json.dumps({
        "caption": "A Woman on the moon", "class_word": "woman", "face_box": [174, 68, 278, 172],
    }))
    (folder / "notes.json").write_text("{}")  # no image beside it: not a record
    assert list_units(folder) == [("record", str(folder / "alice.json"))]
    [record] = list(TrainingRecordDataset(folder))
    assert record.key == "alice" and record.class_span == (2, 7) and record.caption[2:7] == "Woman"
    assert record.face_crop.size == (224, 224) and record.face_score == 1.0 and record.person_box is None
    assert np.array_equal(record.face_mask, mask)
    crop_mask = record.face_crop_mask
    assert crop_mask.shape == (224, 224) and 0.3 < crop_mask.mean() < 0.6
    # the face box fills the crop's middle: 1 / (1 + 2 * 0.25) of its side
    assert crop_mask[112, 112] and not crop_mask[5, 5]


def test_hand_made_record_errors_name_the_file(tmp_path, astronaut_image):
    folder = tmp_path / "records"
    folder.mkdir()
    astronaut_image.save(folder / "bob.png")
    (folder / "bob.json").write_text(json.dumps({"caption": "a man", "class_word": "man", "face_box": [0, 0, 9, 9]}))
    with pytest.raises(ConfigError, match=r"bob.json' needs an image .* and a face mask"):
        list(iter_records(folder))
    Image.fromarray(np.ones((512, 512), dtype=bool)).save(folder / "bob.mask.png")
    (folder / "bob.json").write_text(json.dumps({"caption": "a cat", "class_word": "man", "face_box": [0, 0, 9, 9]}))
    with pytest.raises(ConfigError, match="class word 'man' is not in its caption"):
        list(iter_records(folder))


def test_missing_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainingRecordDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no training records"):
        TrainingRecordDataset(tmp_path / "empty")
