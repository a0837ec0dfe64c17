"""Less autograd memory for the guided step: the feed-forward's gate, or its whole projection, is recomputed in the
backward pass, and the weights are frozen while sampling.

Every transformer block of the SD/SDXL UNets ends in a GEGLU feed-forward, ``a · gelu(b)`` with ``[a, b] = x Wᵀ + c``
(Shazeer 2020, "GLU Variants Improve Transformer"). With grad on, autograd keeps the projection ``[a, b]`` (for
``gelu``'s derivative and the product's) and ``gelu(b)`` besides. Two ways to keep less, each giving the gradient
autograd gives, bit for bit (``tests/guidance/test_recompute.py``):

- ``gelu`` (:class:`GeluGate`): keep the projection only and compute ``gelu(b)`` again, with the operations autograd
  would run. SDXL 1024², ``cfg`` guided step: 7.71 → 6.38 GiB kept; free (one elementwise op per block).
- ``projection`` (:class:`ProjectedGeluGate`): keep only ``x``, an eighth of the projection's size, and compute the
  projection again, one more matmul per block: 6.38 → 4.06 GiB kept, 13% more FLOPs per guided step
  (``benchmarks/count_guidance.py``).
"""

from __future__ import annotations

from contextlib import contextmanager

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


class GeluGate(torch.autograd.Function):
    """:func:`gelu_gate`, saving only ``projected`` for the backward."""

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projected)
        return gelu_gate(projected)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return gelu_gate_backward(*ctx.saved_tensors, grad)


class ProjectedGeluGate(torch.autograd.Function):
    """:func:`gelu_gate` of ``F.linear(x, weight, bias)``, saving only ``x`` (and the parameters) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        return gelu_gate(F.linear(x, weight, bias))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        grad_projected = gelu_gate_backward(F.linear(x, weight, bias), grad)
        grad_x = grad_projected.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None  # while sampling the weights are frozen (ReferenceGuidance.sampling)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            rows = grad_projected.flatten(0, -2)
            grad_weight = rows.t().mm(x.flatten(0, -2)) if ctx.needs_input_grad[1] else None
            grad_bias = rows.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def gated_forward(module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` (CPU/CUDA path) through :class:`GeluGate`."""
    return GeluGate.apply(module.proj(hidden_states))


def projected_forward(module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``GEGLU.forward`` through :class:`ProjectedGeluGate`; through :class:`GeluGate` when a hook runs
    the projection (accelerate's sequential offload places its weights)."""
    if "forward" in vars(module.proj):
        return gated_forward(module, hidden_states)
    return ProjectedGeluGate.apply(hidden_states, module.proj.weight, module.proj.bias)


RECOMPUTED_FORWARD = {"gelu": gated_forward, "projection": projected_forward}


def gelu_gates(unet) -> list:
    """The UNet's diffusers ``GEGLU`` modules: exactly that class (a subclass may compute something else), and not
    already wrapped by a hook that replaced their ``forward`` (accelerate's offloading)."""
    from diffusers.models.activations import GEGLU

    return [module for module in unet.modules() if type(module) is GEGLU and "forward" not in vars(module)]


@contextmanager
def gelu_gates_recomputed(modules: list, recompute: str = "gelu"):
    """For the ``with`` block, ``modules`` (from :func:`gelu_gates`) recompute in a backward what ``recompute`` names
    (``gelu`` or ``projection``, see the module's docstring) instead of keeping it."""
    forward = RECOMPUTED_FORWARD[recompute]
    for module in modules:
        module.forward = forward.__get__(module)
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
