"""Input planning and reading: folders with sidecars, tar shards, URL tables through img2dataset."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from omniportrait.data.build import build_dataset
from omniportrait.data.loader import iter_records
from omniportrait.data.sources import (
    InputReadError,
    detect_input_kind,
    plan_digest,
    plan_folder,
    plan_tar_shards,
    read_input,
)
from omniportrait.errors import ConfigError, MissingDependencyError

from tests.data.helpers import small_config


def _png_bytes(size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folder_plan_is_sorted_recursive_with_sidecars(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.png").write_bytes(_png_bytes())
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.txt").write_text("a woman")
    (tmp_path / "c.png").write_bytes(_png_bytes())
    (tmp_path / "c.json").write_text('{"caption": "a man", "aesthetic": 7}')
    (tmp_path / "c.mask.png").write_bytes(_png_bytes())  # written by the folder format: not an input
    (tmp_path / "readme.md").write_text("not an image")
    refs = plan_folder(str(tmp_path))
    assert [r.source for r in refs] == ["a.jpg", "b/z.png", "c.png"]
    assert [p.field for p in refs[0].parts] == ["image", "txt"] and refs[1].has_caption_source is False
    raw = read_input(refs[2])
    assert raw.caption is None and raw.metadata == {"caption": "a man", "aesthetic": 7}
    assert read_input(refs[0]).caption == "a woman"
    digest = plan_digest(refs)
    (tmp_path / "a.txt").write_text("a woman, longer")
    assert plan_digest(plan_folder(str(tmp_path))) != digest


def test_unreadable_sidecar_is_an_input_error(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes())
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(InputReadError, match="not an object"):
        read_input(plan_folder(str(tmp_path))[0])


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_plan_groups_members_by_key_and_reads_by_offset(tmp_path):
    image = _png_bytes()
    _write_tar(tmp_path / "00001.tar", [("k2.png", image), ("k2.txt", b"a girl")])
    _write_tar(tmp_path / "00000.tar", [
        ("k1.jpg", image), ("k1.txt", b"a boy"), ("k1.json", b'{"pwatermark": 0.2}'),
        ("meta.json", b"{}"),  # a sample without an image is skipped
        ("sub/k3.webp", image),
    ])
    refs = plan_tar_shards(sorted(str(p) for p in tmp_path.glob("*.tar")))
    assert [r.source for r in refs] == ["00000.tar:k1", "00000.tar:sub/k3", "00001.tar:k2"]
    first = read_input(refs[0])
    assert first.data == image and first.caption == "a boy" and first.metadata == {"pwatermark": 0.2}
    assert read_input(refs[2]).caption == "a girl"
    assert detect_input_kind(str(tmp_path)) == "webdataset"
    assert detect_input_kind(str(tmp_path / "{00000..00001}.tar")) == "webdataset"


def test_input_kind_detection_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="neither a folder"):
        detect_input_kind(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match="holds no images"):
        detect_input_kind(str(tmp_path))


def _url_table(tmp_path: Path, columns=("url", "caption", "aesthetic")) -> Path:
    table = tmp_path / "urls.csv"
    rows = [",".join(columns), ",".join(["https://example.invalid/a.jpg", "a woman", "6.2"][: len(columns)])]
    table.write_text("\n".join(rows) + "\n")
    return table


def test_url_table_without_img2dataset_explains_the_two_step_recipe(tmp_path):
    import importlib.util

    assert importlib.util.find_spec("img2dataset") is None  # it must never share this environment
    with pytest.raises(MissingDependencyError) as error:
        build_dataset(small_config(_url_table(tmp_path), tmp_path / "out"))
    message = str(error.value)
    assert "img2dataset" in message and "separate environment" in message and "opencv" in message
    assert "omniportrait build-dataset --input SHARDS" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_url_table_column_errors_come_first(tmp_path):
    with pytest.raises(ConfigError, match="no column 'url'"):
        build_dataset(small_config(_url_table(tmp_path, ("link", "caption")), tmp_path / "out"))
    with pytest.raises(ConfigError, match="no caption column 'caption' and no captioner"):
        build_dataset(small_config(_url_table(tmp_path, ("url", "aesthetic")), tmp_path / "out"))


def test_url_table_goes_through_img2dataset_when_installed(tmp_path, monkeypatch, astronaut_image):
    """A stand-in img2dataset (same download() signature, no network) writes a webdataset shard."""
    fake = tmp_path / "fake_site" / "img2dataset"
    fake.mkdir(parents=True)
    astronaut_image.save(tmp_path / "photo.jpg", quality=95)
    (fake / "__init__.py").write_text(textwrap.dedent(f'''
        import csv, io, json, os, tarfile
        CALLS = []
        def download(url_list, output_folder, input_format, url_col, caption_col, save_additional_columns, **kw):
            CALLS.append(dict(kw, url_list=url_list, input_format=input_format, caption_col=caption_col,
                              save_additional_columns=save_additional_columns))
            os.makedirs(output_folder, exist_ok=True)
            rows = list(csv.DictReader(open(url_list)))
            with tarfile.open(os.path.join(output_folder, "00000.tar"), "w") as tar:
                for i, row in enumerate(rows):
                    meta = {{"url": row[url_col], "caption": row[caption_col]}}
                    meta.update({{c: float(row[c]) for c in save_additional_columns or []}})
                    for ext, data in (("jpg", open({str(tmp_path / "photo.jpg")!r}, "rb").read()),
                                      ("txt", row[caption_col].encode()), ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{{i:09d}}.{{ext}}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    '''))
    monkeypatch.syspath_prepend(str(fake.parent))
    try:
        result = build_dataset(small_config(_url_table(tmp_path), tmp_path / "out"))
        import img2dataset

        calls = img2dataset.CALLS
    finally:
        sys.modules.pop("img2dataset", None)
    [call] = calls
    assert call["input_format"] == "csv" and call["output_format"] == "webdataset" and call["resize_mode"] == "no"
    assert call["save_additional_columns"] == ["aesthetic"]
    assert result.kept == 1
    [record] = list(iter_records(result.output))
    assert record.caption == "a woman" and record.aesthetic == 6.2
    assert record.metadata["url"] == "https://example.invalid/a.jpg"
    assert json.loads((result.output / "build.json").read_text())["input_kind"] == "urls"
