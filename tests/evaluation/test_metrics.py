"""Each Table 1 metric on inputs whose ordering is known in advance (paper §4.2)."""

import pytest
import torch

from omniportrait.evaluation.metrics import (
    MetricConfig,
    MetricUnavailable,
    Sample,
    build_metrics,
    load_metrics,
    parse_metric_names,
)
from omniportrait.evaluation.metrics.blip import BlipScore
from omniportrait.evaluation.metrics.clip import ClipImageScore, ClipIQA, ClipTextScore, load_clip
from omniportrait.evaluation.metrics.fid import ClipFID, InceptionFID
from omniportrait.evaluation.tiny import TINY_MODEL_ID


def sample(image, prompt="", reference=None, key="ref"):
    reference = reference if reference is not None else image
    return Sample(image=image, prompt=prompt, reference_key=key, reference_image=reference, reference_face=reference)


def test_clip_t_prefers_the_matching_prompt(trained_clip_dir, red, blue):
    metric = ClipTextScore(trained_clip_dir)
    metric.load()
    scores = [s["clip_t"] for s in metric.score([sample(red, "red"), sample(red, "blue"),
                                                 sample(blue, "blue"), sample(blue, "red")])]
    assert scores[0] > scores[1] + 10
    assert scores[2] > scores[3] + 10
    assert all(0.0 <= s <= 100.0 for s in scores)


def test_clip_t_equals_clip_forward_cosine(trained_clip_dir, red, blue):
    """Our CLIP-T is 100·max(cos, 0) with the cosine CLIPModel.forward computes (logits / logit scale).

    (torchmetrics' clip_score would be the natural reference, but its 1.9 release reads
    ``get_image_features`` as a tensor, which transformers 5 no longer returns.)
    """
    clip = load_clip(trained_clip_dir)
    ours = ClipTextScore(trained_clip_dir).score([sample(red, "red"), sample(blue, "red")])
    pixels = clip.processor.image_processor(images=[red, blue], return_tensors="pt")["pixel_values"]
    tokens = clip.processor.tokenizer(["red"], return_tensors="pt")
    with torch.no_grad():
        output = clip.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        cosines = output.logits_per_image[:, 0] / clip.model.logit_scale.exp()
    expected = [100.0 * max(float(c), 0.0) for c in cosines]
    assert [s["clip_t"] for s in ours] == pytest.approx(expected, abs=1e-3)
    assert expected[0] > expected[1]


def test_clip_i_image_against_itself_beats_another(astronaut_image, blue, noise):
    metric = ClipImageScore(TINY_MODEL_ID)
    metric.load()
    same, other, third = metric.score([sample(astronaut_image, reference=astronaut_image, key="a"),
                                       sample(blue, reference=astronaut_image, key="a"),
                                       sample(noise, reference=astronaut_image, key="a")])
    assert same["clip_i"] == pytest.approx(100.0, abs=1e-3)
    assert same["clip_i"] > other["clip_i"]
    assert same["clip_i"] > third["clip_i"]


def test_clip_i_caches_the_reference_embedding(astronaut_image, blue):
    metric = ClipImageScore(TINY_MODEL_ID)
    metric.score([sample(blue, reference=astronaut_image, key="a")])
    first = metric.reference_cache["a"].clone()
    metric.score([sample(astronaut_image, reference=blue, key="a")])  # same key: the cached astronaut is used
    assert torch.equal(metric.reference_cache["a"], first)


def test_clip_iqa_prefers_the_photo_to_noise(trained_clip_dir, astronaut_image, noise):
    metric = ClipIQA(trained_clip_dir)
    good, bad = metric.score([sample(astronaut_image.resize((64, 64))), sample(noise)])
    assert good["clip_iqa"] > 50.0 > bad["clip_iqa"]


def test_blip_prefers_the_matching_prompt(trained_blip_dir, red, blue):
    metric = BlipScore(trained_blip_dir)
    metric.load()
    scores = [s["blip"] for s in metric.score([sample(red, "red"), sample(red, "blue"),
                                               sample(blue, "blue"), sample(blue, "red")])]
    assert scores[0] > 90.0 > 10.0 > scores[1]
    assert scores[2] > 90.0 > 10.0 > scores[3]


def test_fid_clip_of_a_set_against_itself_beats_another_set(astronaut_image, mirrored_astronaut, red, blue, noise):
    metric = ClipFID(TINY_MODEL_ID)
    metric.load()
    faces = [astronaut_image, mirrored_astronaut, astronaut_image.rotate(10)]
    others = [red, blue, noise]
    same = metric.score_set(faces, faces)["fid_clip"]
    different = metric.score_set(others, faces)["fid_clip"]
    assert same == pytest.approx(0.0, abs=1e-3)
    assert different > 1.0


def test_fid_needs_two_images_per_set(astronaut_image, red, blue):
    metric = ClipFID(TINY_MODEL_ID)
    assert metric.score_set([red], [astronaut_image, blue]) == {"fid_clip": None}


def test_standard_fid_without_inception_weights_is_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="torch-fidelity|not found"):
        InceptionFID(weights=str(tmp_path / "missing.pth")).load()


def test_a_model_that_cannot_be_loaded_is_unavailable_not_a_number():
    config = MetricConfig(clip_model="no-such-org/no-such-clip", blip_model="no-such-org/no-such-blip",
                          fid_inception_weights="/nonexistent/inception.pth")
    statuses = load_metrics(build_metrics(parse_metric_names("clip-t,blip,fid"), config))
    assert [s.available for s in statuses] == [False, False, False]
    assert "no-such-org/no-such-blip" in statuses[0].reason
    assert "no-such-org/no-such-clip" in statuses[1].reason
    assert all(s.describe()["model"] for s in statuses)


def test_every_metric_names_its_model():
    statuses = build_metrics(parse_metric_names(None), MetricConfig(clip_model=TINY_MODEL_ID))
    names = {metric.name: metric.model_name for metric in statuses}
    assert list(names) == ["BLIP", "CLIP-T", "CLIP-I", "SIM", "CLIP-IQA", "FID", "FID-CLIP"]
    assert "random weights" in names["CLIP-T"]
    assert "Salesforce/blip-itm-large-coco" in names["BLIP"]
    assert "dlib" in names["SIM"]
    assert "Inception" in names["FID"]


def test_unknown_metric_name_is_a_config_error():
    from omniportrait.errors import ConfigError

    with pytest.raises(ConfigError, match="clip-x"):
        parse_metric_names("clip-t,clip-x")
