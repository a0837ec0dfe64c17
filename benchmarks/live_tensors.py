"""Memory counted without a GPU: the bytes of tensor storage alive at once while code runs, with attention run as
CUDA runs it.

On the ``meta`` device real architectures cost no compute and no memory, so a CPU can say how much a step of a GPU
pipeline holds (``count_decode.py``, ``count_guidance.py``, ``count_step_peak.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeak(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among the tensors created inside the mode.

    A storage counts from the first operation that returns it until the last tensor object on it is collected;
    tensors made before the mode (weights, inputs) are not counted, nor, given in ``exclude``, views of those
    modules' weights made inside it (a linear layer's transposed weight shares the weight's storage).
    """

    def __init__(self, exclude: Iterable[torch.nn.Module] = ()):
        super().__init__()
        self.excluded = {tensor.untyped_storage()._cdata for module in exclude
                         for tensor in [*module.parameters(), *module.buffers()]}
        self.storage_bytes: dict[int, int] = {}
        self.storage_refs: dict[int, int] = {}
        self.tracked: set[int] = set()
        self.alive = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.tracked:
                self.track(tensor)
        self.peak = max(self.peak, self.alive)
        return out

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return
        if key not in self.storage_bytes:
            self.storage_bytes[key], self.storage_refs[key] = storage.nbytes(), 0
            self.alive += storage.nbytes()
        self.storage_refs[key] += 1
        self.tracked.add(id(tensor))
        weakref.finalize(tensor, self.release, key, id(tensor))

    def release(self, key: int, tensor_id: int) -> None:
        self.tracked.discard(tensor_id)
        self.storage_refs[key] -= 1
        if not self.storage_refs[key]:
            self.alive -= self.storage_bytes.pop(key)
            del self.storage_refs[key]

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


SDPA = F.scaled_dot_product_attention


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA as CUDA runs it in fp16 (flash kernel): it keeps q, k, v, the output and the log-sum-exp, never the
    (hw)² matrix; a call with a mask goes to SDPA as given."""
    if attn_mask is not None or kwargs:
        return SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kwargs)
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                              scale=scale)[0]


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA as CUDA runs it in fp32 (memory-efficient kernel; the VAE's attention), no (hw)² matrix either."""
    if attn_mask is not None or dropout_p or is_causal or kwargs:
        raise ValueError("the VAE's attention has no mask, dropout or causality")
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, False, scale=scale)[0]


@contextmanager
def attention_as_on_cuda(kernel: Callable = efficient_attention):
    """``F.scaled_dot_product_attention`` is ``kernel`` for the ``with`` block."""
    F.scaled_dot_product_attention = kernel
    try:
        yield
    finally:
        F.scaled_dot_product_attention = SDPA
