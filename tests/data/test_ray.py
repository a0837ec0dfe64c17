"""Shards as Ray tasks on a local Ray instance give the same shards as a build in one process."""

from __future__ import annotations

import pytest

from omniportrait.data.build import build_dataset
from omniportrait.errors import ConfigError

from tests.data.helpers import shard_bytes, small_config


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_ray_cluster_is_a_config_error(tmp_path, mixed_inputs, address):
    with pytest.raises(ConfigError, match="cannot connect to Ray"):
        build_dataset(small_config(mixed_inputs, tmp_path / "out", ray_address=address))


def test_ray_build_matches_the_local_build(tmp_path, mixed_inputs, mixed_build):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = build_dataset(small_config(mixed_inputs, tmp_path / "ray", ray_address="auto"))
        assert ray.is_initialized()  # an existing session is used as it is, not shut down
    finally:
        ray.shutdown()
    assert result.counts == mixed_build.counts
    assert shard_bytes(result.output) == shard_bytes(mixed_build.output)


def test_ray_local_starts_and_stops_its_own_instance(tmp_path, astronaut_image):
    import ray

    source = tmp_path / "in"
    source.mkdir()
    astronaut_image.save(source / "a.png")
    (source / "a.txt").write_text("a man")
    result = build_dataset(small_config(source, tmp_path / "out", ray_address="local", workers=1))
    assert result.kept == 1 and not ray.is_initialized()
