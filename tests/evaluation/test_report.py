"""Report building: means per setting and category, 'unavailable' never printed as a number, Fig. 5 axes."""

from pathlib import Path

import pytest

from omniportrait.evaluation.metrics import MetricConfig, MetricStatus, build_metrics, parse_metric_names
from omniportrait.evaluation.prompts import select_prompts
from omniportrait.evaluation.report import build_report, render_markdown, table1_csv, tradeoff_figure, write_report
from omniportrait.evaluation.runner import EvalConfig, GenerationConfig
from omniportrait.evaluation.sweep import Setting


class Ref:
    def __init__(self, name, word):
        self.name, self.class_word, self.path = name, word, Path(name)


def record(setting, category, **scores):
    return {"job": {"setting": setting, "category": category, "image": "x.png"}, "scores": scores}


def statuses(available):
    metrics = build_metrics(parse_metric_names("clip-t,sim,fid"), MetricConfig())
    return [MetricStatus(m, m.name in available, None if m.name in available else "weights missing")
            for m in metrics]


@pytest.fixture
def config(tmp_path):
    return EvalConfig(references=tmp_path, output=tmp_path, prompts=tuple(select_prompts(max_prompts=2)),
                      generation=GenerationConfig(preset="sd15"), class_words={"a.png": "woman"})


SETTINGS = [Setting("guidance_scale", 3.0, "3", "guidance_scale"),
            Setting("guidance_scale", 7.5, "7.5", "guidance_scale")]
RECORDS = [record("guidance_scale=3", "pose", clip_t=20.0, sim=60.0, face_rate=100.0),
           record("guidance_scale=3", "clothing", clip_t=30.0, sim=0.0, face_rate=0.0),
           record("guidance_scale=7.5", "pose", clip_t=28.0, sim=None, face_rate=100.0)]


def test_means_per_setting_and_category(config):
    report = build_report(config, SETTINGS, [Ref("a.png", "woman")], [], statuses({"CLIP-T", "SIM"}), RECORDS,
                          {"guidance_scale=3": {}, "guidance_scale=7.5": {}}, 3)
    first, second = report["rows"]
    assert first["values"]["clip_t"] == pytest.approx(25.0) and first["values"]["sim"] == pytest.approx(30.0)
    assert second["values"]["sim"] is None  # the only value does not exist: n/a, not 0
    assert first["values"]["fid"] is None
    assert [(c["setting"], c["category"], c["images"]) for c in report["categories"]] == [
        ("guidance_scale=3", "pose", 1), ("guidance_scale=3", "clothing", 1), ("guidance_scale=7.5", "pose", 1)]
    markdown = render_markdown(report)
    assert "| guidance_scale=3 | 2 | 25.00 | 30.00 | 50.00 | unavailable |" in markdown
    assert "| guidance_scale=7.5 | 1 | 28.00 | n/a | 100.00 | unavailable |" in markdown
    assert "**unavailable**: weights missing" in markdown
    assert table1_csv(report).splitlines()[1] == "guidance_scale=3,2,25.0000,30.0000,50.0000,unavailable"
    assert report["plot"]["x"] == "clip_t" and report["plot"]["y"] == "sim"


def test_the_plot_of_close_values_labels_its_ticks_without_an_offset(config):
    close = [record("guidance_scale=3", "pose", clip_t=1.60753, sim=0.0),
             record("guidance_scale=7.5", "pose", clip_t=1.60756, sim=0.0)]
    report = build_report(config, SETTINGS, [Ref("a.png", "woman")], [], statuses({"CLIP-T", "SIM"}), close,
                          {"guidance_scale=3": {}, "guidance_scale=7.5": {}}, 3)
    figure = tradeoff_figure(report)
    figure.canvas.draw()
    axes = figure.axes[0]
    assert axes.xaxis.get_offset_text().get_text() == ""  # an offset would be drawn over the axis label
    assert all(tick.get_text().startswith("1.607") for tick in axes.get_xticklabels() if tick.get_text())


def test_no_plot_without_text_alignment_and_stale_plot_removed(config, tmp_path):
    stale = tmp_path / "tradeoff.png"
    stale.write_bytes(b"old")
    report = build_report(config, SETTINGS, [Ref("a.png", "woman")], [], statuses({"SIM"}), RECORDS, {}, 3)
    assert report["plot"]["file"] is None and "CLIP-T" in report["plot"]["reason"]
    written = write_report(report, tmp_path)
    assert "plot" not in written and not stale.exists()
    assert report["plot"]["reason"] in (tmp_path / "report.md").read_text()


def test_default_class_word_is_noted(config):
    report = build_report(config, [Setting()], [Ref("a.png", "woman"), Ref("b.png", "person")], [],
                          statuses({"CLIP-T"}), [], {}, 0)
    assert any("1 reference(s) use the default class word 'person'" in note for note in report["notes"])
