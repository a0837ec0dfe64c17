"""``--sweep``: generic pipeline keywords, checked against the pipeline's signature before generation."""

import pytest

from omniportrait.errors import ConfigError
from omniportrait.evaluation.sweep import check_sweep, parse_sweep
from omniportrait.guidance.config import RBGuidanceConfig
from omniportrait.pipelines.sd15 import OmniPortraitSDPipeline
from omniportrait.pipelines.sdxl import OmniPortraitSDXLPipeline

CALLS = [OmniPortraitSDPipeline.__call__, OmniPortraitSDXLPipeline.__call__]


@pytest.mark.parametrize("call", CALLS)
def test_guidance_scale_sweep_becomes_float_keywords(call):
    sweep = check_sweep(parse_sweep("guidance-scale=3,7.5"), call)
    settings = sweep.settings()
    assert [s.label for s in settings] == ["guidance_scale=3", "guidance_scale=7.5"]
    assert [s.kwargs for s in settings] == [{"guidance_scale": 3.0}, {"guidance_scale": 7.5}]
    assert isinstance(settings[0].kwargs["guidance_scale"], float)


def test_integer_keyword_stays_integer_and_rejects_fractions():
    sweep = check_sweep(parse_sweep("num-inference-steps=2,4"), CALLS[0])
    assert [s.kwargs["num_inference_steps"] for s in sweep.settings()] == [2, 4]
    with pytest.raises(ConfigError, match="whole number"):
        check_sweep(parse_sweep("num-inference-steps=2.5"), CALLS[0])


def test_rb_strength_short_form_sets_the_guidance_config_field():
    settings = check_sweep(parse_sweep("rb-strength=0,4,8.5,16"), CALLS[0]).settings()
    configs = [s.kwargs["rb_guidance"] for s in settings]
    assert all(isinstance(c, RBGuidanceConfig) for c in configs)
    assert [c.strength for c in configs] == [0.0, 4.0, 8.5, 16.0]
    assert configs[0].start == RBGuidanceConfig().start
    assert settings[2].describe() == {"rb_strength": 8.5}


def test_dotted_form_and_the_configs_own_checks():
    sweep = check_sweep(parse_sweep("rb-guidance.start=0.4,0.6"), CALLS[0])
    assert [s.kwargs["rb_guidance"].start for s in sweep.settings()] == [0.4, 0.6]
    with pytest.raises(ConfigError, match="rb_start=2"):
        check_sweep(parse_sweep("rb-start=0.5,2"), CALLS[0])


def test_unknown_or_reserved_keyword_is_a_clear_error():
    with pytest.raises(ConfigError, match="no parameter 'no-such'.*guidance-scale"):
        check_sweep(parse_sweep("no-such=1,2"), CALLS[0])
    with pytest.raises(ConfigError, match="cannot vary"):
        check_sweep(parse_sweep("generator=1"), CALLS[0])


@pytest.mark.parametrize("spec", ["guidance-scale", "guidance-scale=", "=3,4", "guidance-scale=3,3"])
def test_malformed_sweep(spec):
    with pytest.raises(ConfigError, match="--sweep"):
        parse_sweep(spec)
