"""Less autograd memory for the guided step: the feed-forward's gate, or its whole projection, is recomputed in the
backward pass, and the weights are frozen while sampling.

Every transformer block of the SD/SDXL UNets ends in a GEGLU feed-forward, ``a · gelu(b)`` with ``[a, b] = x Wᵀ + c``
(Shazeer 2020, "GLU Variants Improve Transformer"). With grad on, autograd keeps the projection ``[a, b]`` (for
``gelu``'s derivative and the product's) and ``gelu(b)`` besides. Two ways to keep less, each giving the gradient
autograd gives (``tests/guidance/test_recompute.py``):

- ``gelu`` (:class:`GeluGate`): keep the projection only and compute ``gelu(b)`` again, with the operations autograd
  would run (one elementwise op per block).
- ``projection`` (:class:`ProjectedGeluGate`): keep only ``x``, an eighth of the projection's size, and compute the
  projection again in the backward.

In a batched CFG pass the energy reads only the conditional rows, and no layer of the UNet mixes rows, so the
unconditional rows get a zero gradient. Given those ``rows``, a gate keeps and differentiates only them and gives
the others zeros. With ``projection``, the recomputed projection and the input's gradient then cover those rows
only: the two half-batch matrix products cost what ``gelu``'s one over the whole batch does.

What each keeps on the real UNets is counted by ``python -m benchmarks.count guidance`` (``benchmarks/results/``).
The gradient is bit for bit autograd's, except that the matrix products over fewer rows may round differently.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F


def gelu_gate(projected: torch.Tensor) -> torch.Tensor:
    """``a · gelu(b)`` for ``[a, b] = projected.chunk(2, -1)``, as diffusers' ``GEGLU`` computes it."""
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def gelu_gate_backward(projected: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`gelu_gate` at ``projected``, with the operations autograd runs for it."""
    hidden, gate = projected.chunk(2, dim=-1)
    grad_hidden = grad * F.gelu(gate)
    grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate)
    return torch.cat([grad_hidden, grad_gate], dim=-1)


def kept_rows(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """What a gate keeps of ``tensor`` for the backward: all of it, or a copy of its ``rows`` (a view would keep the
    whole batch's storage alive)."""
    return tensor if rows is None else tensor[rows].clone()


def rows_of(grad: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return grad if rows is None else grad[rows]


def gradient_at_rows(grad: torch.Tensor, rows: slice | None, batch: int) -> torch.Tensor:
    """The gradient of a batch of ``batch`` rows: ``grad`` at ``rows``, zeros at the others (one padding
    operation)."""
    if rows is None:
        return grad
    start, stop, step = rows.indices(batch)
    if step != 1:
        raise ValueError(f"gate rows must be contiguous, got {rows}")
    return F.pad(grad, [0, 0] * (grad.dim() - 1) + [start, batch - stop])


class GeluGate(torch.autograd.Function):
    """:func:`gelu_gate`, saving only ``projected`` (its ``rows``, if given) for the backward."""

    @staticmethod
    def forward(ctx, projected: torch.Tensor, rows: slice | None) -> torch.Tensor:
        ctx.rows, ctx.batch = rows, projected.shape[0]
        ctx.save_for_backward(kept_rows(projected, rows))
        return gelu_gate(projected)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_projected = gelu_gate_backward(*ctx.saved_tensors, rows_of(grad, ctx.rows))
        return gradient_at_rows(grad_projected, ctx.rows, ctx.batch), None


class ProjectedGeluGate(torch.autograd.Function):
    """:func:`gelu_gate` of ``F.linear(x, weight, bias)``, saving only ``x`` (its ``rows``, if given) and the
    parameters for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: slice | None
                ) -> torch.Tensor:
        ctx.rows, ctx.batch = rows, x.shape[0]
        ctx.save_for_backward(kept_rows(x, rows), weight, bias)
        return gelu_gate(F.linear(x, weight, bias))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        grad_projected = gelu_gate_backward(F.linear(x, weight, bias), rows_of(grad, ctx.rows))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gradient_at_rows(grad_projected.matmul(weight), ctx.rows, ctx.batch)
        grad_weight = grad_bias = None  # while sampling the weights are frozen (ReferenceGuidance.sampling)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat = grad_projected.flatten(0, -2)
            grad_weight = flat.t().mm(x.flatten(0, -2)) if ctx.needs_input_grad[1] else None
            grad_bias = flat.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def gated_forward(module, hidden_states: torch.Tensor, *args, rows: slice | None = None, **kwargs) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` (CPU/CUDA path) through :class:`GeluGate`."""
    return GeluGate.apply(module.proj(hidden_states), rows)


def projected_forward(module, hidden_states: torch.Tensor, *args, rows: slice | None = None, **kwargs
                      ) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` through :class:`ProjectedGeluGate`; through :class:`GeluGate` when a hook runs
    the projection (accelerate's sequential offload places its weights)."""
    if "forward" in vars(module.proj):
        return gated_forward(module, hidden_states, rows=rows)
    return ProjectedGeluGate.apply(hidden_states, module.proj.weight, module.proj.bias, rows)


RECOMPUTED_FORWARD = {"gelu": gated_forward, "projection": projected_forward}


def gelu_gates(unet) -> list:
    """The UNet's diffusers ``GEGLU`` modules: exactly that class (a subclass may compute something else), and not
    already wrapped by a hook that replaced their ``forward`` (accelerate's offloading)."""
    from diffusers.models.activations import GEGLU

    return [module for module in unet.modules() if type(module) is GEGLU and "forward" not in vars(module)]


@contextmanager
def gelu_gates_recomputed(modules: list, recompute: str = "gelu", rows: slice | None = None):
    """For the ``with`` block, ``modules`` (from :func:`gelu_gates`) recompute in a backward what ``recompute`` names
    (``gelu`` or ``projection``, see the module's docstring) instead of keeping it.

    ``rows``: the batch rows that alone get a gradient (see the module's docstring); the gates keep only those. The
    caller vouches that every other row's gradient is zero: a wrong ``rows`` gives a wrong gradient."""
    forward = RECOMPUTED_FORWARD[recompute]
    for module in modules:
        module.forward = partial(forward, module, rows=rows)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


@contextmanager
def weights_frozen(module: torch.nn.Module):
    """For the ``with`` block, no parameter of ``module`` requires grad (the flags are restored after)."""
    thawed = [parameter for parameter in module.parameters() if parameter.requires_grad]
    for parameter in thawed:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in thawed:
            parameter.requires_grad_(True)
