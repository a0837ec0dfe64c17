import pytest

from omniportrait.errors import ConfigError
from omniportrait.guidance import RBGuidanceConfig


def test_schedule_switches_on_exactly_at_u_times_T():
    config = RBGuidanceConfig(start=0.6)
    assert config.active_at(600) and config.active_at(1)
    assert not config.active_at(601)
    assert not RBGuidanceConfig(enabled=False).active_at(1)


def test_paper_defaults():
    c = RBGuidanceConfig()
    assert (c.strength, c.start, c.ref_timestep, c.mask_iterations, c.mask_power, c.mask_threshold) == \
        (8.5, 0.6, 671, 3, 2.0, 0.5)
    assert c.reduction == "sum" and c.feature_pass == "cfg" and c.gradient_interval == 1 and c.recompute == "projection"


@pytest.mark.parametrize("kwargs", [dict(reduction="max"), dict(feature_pass="x"), dict(start=1.5),
                                    dict(dift_ensemble=0), dict(ref_timestep=1000),
                                    dict(gradient_interval=0), dict(recompute="everything")])
def test_bad_values_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        RBGuidanceConfig(**kwargs)
