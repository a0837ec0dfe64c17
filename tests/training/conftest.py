"""Shared fixtures of the training tests: a synthetic record folder with known masks, tiny trainers."""

import pytest
import torch

from omniportrait.training.config import TrainConfig
from omniportrait.training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and other test processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def records_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    write_synthetic_dataset(folder, count=12, seed=0)
    return folder


def tiny_config(data, output, **overrides) -> TrainConfig:
    """A fast tiny-sd15 configuration: one process, no workers, no samples, checkpoint only at the end."""
    settings = dict(data=str(data), output=str(output), preset="tiny-sd15", max_steps=2, batch_size=2,
                    num_workers=0, sample_every=0, progress=False, log_every=1, checkpoint_every=1000)
    settings.update(overrides)
    return TrainConfig(**settings)
