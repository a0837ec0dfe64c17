"""The activation counter behind ``benchmarks/count_decode.py``."""

import torch
import torch.nn.functional as F

from benchmarks.count_decode import attention_as_on_cuda, main
from benchmarks.live_tensors import LiveTensorPeak


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
