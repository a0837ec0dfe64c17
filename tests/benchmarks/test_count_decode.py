"""The activation counter behind ``benchmarks/count_decode.py``."""

import torch
import torch.nn.functional as F

from benchmarks.count_decode import LiveTensorPeak, attention_as_on_cuda, main


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


def test_attention_is_counted_as_cuda_runs_it_without_the_score_matrix():
    q = torch.zeros(1, 1, 1024, 8, device="meta")  # the CUDA kernel has a meta implementation, not a CPU one
    sdpa = F.scaled_dot_product_attention
    with LiveTensorPeak() as math:
        F.scaled_dot_product_attention(q, q, q)
    with attention_as_on_cuda(), LiveTensorPeak() as efficient:
        out = F.scaled_dot_product_attention(q, q, q)
    assert efficient.peak < 1024 * 1024 * 4 <= math.peak  # no 1024×1024 matrix
    assert out.shape == q.shape and F.scaled_dot_product_attention is sdpa  # put back


def test_prints_the_table_of_the_real_decoders(capsys):
    main(["--bands", "32", "--check-size", "0"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| decode | diffusers GiB | bands of 32 MiB |"
    sdxl = rows[2].split("|")
    assert sdxl[1].strip() == "SDXL 1024² fp32" and float(sdxl[2]) == 3.0
    assert float(sdxl[3].split()[0]) < 2.5
