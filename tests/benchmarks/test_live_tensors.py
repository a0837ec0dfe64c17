"""The activation counter of the benchmarks (``benchmarks/live_tensors.py``)."""

import torch

from benchmarks.live_tensors import LiveTensorPeak


def test_the_peak_is_what_is_alive_at_once_counting_each_storage_once():
    weights = torch.ones(4096)  # made before: not counted
    with LiveTensorPeak() as live:
        a = weights * 2  # 16 KiB
        b = a + 1  # 32 KiB alive
        del a
        c = b * 3  # 32 KiB alive again
        view = c[:10]  # the same storage
        c.add_(1)  # in place: nothing new
        del b, c
    assert live.peak == 2 * 4096 * 4
    assert live.alive == 4096 * 4  # the view keeps c's storage
    del view
    assert live.alive == 0


def test_views_of_excluded_weights_are_not_counted():
    layer = torch.nn.Linear(256, 256, bias=False)
    x = torch.ones(1, 256)
    with LiveTensorPeak() as counted:
        transposed = layer.weight.t()  # a new tensor object on the weight's storage
    with LiveTensorPeak(exclude=[layer]) as excluded:
        transposed = layer.weight.t()
        out = x @ transposed
    assert counted.peak == 256 * 256 * 4
    assert excluded.peak == 256 * 4 and out.shape == (1, 256)
