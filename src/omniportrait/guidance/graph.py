"""Sampling steps captured once as CUDA graphs and replayed on the later steps of their kind.

On a fast GPU a guided step waits on the host CPU, which issues its thousands of kernels one by one. A CUDA graph
(``torch.cuda.CUDAGraph``) records the step's kernels once and launches them all with one call.

A replay runs only the recorded GPU work, on the same memory: it reads its inputs from fixed buffers, writes the
same output tensors every time, and runs no Python. So the captured step keeps its state across steps in tensors
updated in place (the running-mean attention, the non-finite count), never in Python values, and never waits for
the GPU (no ``.item()``, no ``nonzero``). Host-side bookkeeping stays outside the captured function.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

CAPTURE_FAILED = "a sampling step could not be captured as a CUDA graph and runs eagerly"


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream every capture on ``device`` runs on, for the whole process. cuBLAS keeps a workspace for each
    stream it has run on until the process ends: a new stream per captured step would leave a workspace allocated after
    every graphed generation, which no garbage collection frees."""
    return torch.cuda.Stream(device)


class CudaGraphs:
    """Warm-up and capture with ``torch.cuda.CUDAGraph`` (CUDA only), both on the device's :func:`side_stream`, so
    that the library handles and workspaces the step needs on that stream exist before the capture."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None

    @staticmethod
    def problem(device: torch.device) -> str | None:
        """Why steps on ``device`` cannot be captured, or None."""
        if device.type != "cuda":
            return f"CUDA graphs (--rb-cuda-graph) need a CUDA device; this pipeline is on {device.type}"
        return None

    def warm_up(self, fn: Callable, inputs: tuple):
        """One eager call on the side stream, as CUDA requires before a capture (its result is the step's). The
        main stream then waits for it, also when it fails (out of memory, say): what runs next there, such as
        restoring the running-mean attention the step updates in place, must not overtake its queued kernels."""
        device = inputs[0].device  # not necessarily the current device (`generate --device cuda:1`)
        self.stream, main = side_stream(device), torch.cuda.current_stream(device)
        self.stream.wait_stream(main)
        try:
            with torch.cuda.stream(self.stream):
                return fn(*inputs)
        finally:
            main.wait_stream(self.stream)

    def capture(self, fn: Callable, inputs: tuple) -> tuple[Callable[[], None], object]:
        """Record ``fn(*inputs)``; returns the replay call and the outputs every replay writes. ``torch.cuda.graph``
        synchronises the current device before it captures: that is made the step's."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.stream.device), torch.cuda.graph(graph, stream=self.stream):
            outputs = fn(*inputs)
        return graph.replay, outputs


class GraphedStep:
    """``fn(*inputs) -> outputs``: eager on the first call (the warm-up), captured then, replayed after.

    Replayed outputs are the same tensors every call, overwritten by the next one. If the capture fails, a warning
    says why and every later call runs ``fn`` eagerly; if it runs out of GPU memory, the error is raised, as one from
    the warm-up is, for the caller to go on with less, and nothing is captured. ``backend`` is a class whose
    instances provide ``warm_up`` and ``capture`` (:class:`CudaGraphs`).
    """

    def __init__(self, fn: Callable, backend=CudaGraphs):
        self.fn, self.backend = fn, backend()
        self.inputs: tuple = ()
        self.outputs = None  # what fn returned at the capture (tensors every replay writes)
        self.replay: Callable[[], None] | None = None
        self.eager = False  # the capture failed

    def __call__(self, *inputs: torch.Tensor):
        if self.eager:
            return self.fn(*inputs)
        if self.replay is None:
            outputs = self.backend.warm_up(self.fn, inputs)
            self.capture(inputs)
            return outputs
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.replay()
        return self.outputs

    def capture(self, inputs: tuple) -> None:
        self.inputs = tuple(value.detach().clone() for value in inputs)
        try:
            self.replay, self.outputs = self.backend.capture(self.fn, self.inputs)
        except torch.OutOfMemoryError:
            self.inputs = ()
            raise
        except Exception as error:  # any other failure to capture leaves a correct, slower generation, not a crash
            self.eager, self.inputs = True, ()
            warnings.warn(f"{CAPTURE_FAILED}: {type(error).__name__}: {error}", stacklevel=4)


def replays_without_input_scaling(scheduler, sample: torch.Tensor, t) -> bool:
    """Whether the scheduler's ``scale_model_input`` is the identity (DDIM, DPM-Solver): a captured step may then
    contain it. Schedulers that scale by a per-step host value (Euler) would replay the captured step's value."""
    return scheduler.scale_model_input(sample, t) is sample
