"""Parents for the kill -9 tests of tests/test_processes.py: each starts workers the way the package does,
prints their pids on one line and waits to be killed."""

import os
import sys
import time


def sleep_forever(_task) -> dict:
    print(os.getpid(), flush=True)
    time.sleep(600)
    return {}


def pool_parent(workers: int) -> None:
    from omniportrait.data.build import _run_in_pool
    from tests._orphans import sleep_forever  # by module name, so spawned workers can import it

    _run_in_pool(list(range(workers)), workers, lambda stats: None, build=sleep_forever)


def dataloader_parent(workers: int) -> None:
    import torch
    from torch.utils.data import IterableDataset

    from omniportrait.training.data import make_dataloader

    class Pids(IterableDataset):
        def __iter__(self):
            yield torch.tensor(os.getpid())
            time.sleep(600)  # a batch that takes long to load: torch's own watchdog only looks between batches
            yield torch.tensor(os.getpid())

    batches = iter(make_dataloader(Pids(), workers))
    seen = set()
    while len(seen) < workers:
        seen.add(int(next(batches)))
    print(" ".join(map(str, sorted(seen))), flush=True)
    time.sleep(600)


def sleep_and_tell(path: str) -> None:
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)


def ray_parent(workers: int) -> None:
    """A local Ray instance started as ``build-dataset --ray local`` starts it, with ``workers`` sleeping tasks;
    prints every process below this one (Ray's GCS, raylet, agents and the task workers)."""
    import tempfile
    from types import SimpleNamespace

    import ray

    from omniportrait.data.build import _init_ray
    from omniportrait.processes import descendants

    _init_ray(ray, SimpleNamespace(ray_address="local", workers=workers))
    folder = tempfile.mkdtemp()
    remote = ray.remote(num_cpus=1)(sleep_and_tell)
    refs = [remote.remote(os.path.join(folder, str(index))) for index in range(workers)]  # noqa: F841
    while len(os.listdir(folder)) < workers or not all(os.path.getsize(os.path.join(folder, name))
                                                       for name in os.listdir(folder)):
        time.sleep(0.1)
    reaper_and_ray = [pid for pid in descendants(os.getpid())]
    print(" ".join(map(str, reaper_and_ray)), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    {"pool": pool_parent, "dataloader": dataloader_parent, "ray": ray_parent}[sys.argv[1]](int(sys.argv[2]))
