"""Where accelerate's or diffusers' hooks (CPU offloading, layerwise casting) move or recast a module's weights, and
how code that reads them other than through ``forward`` lets them."""

from __future__ import annotations

import torch
from torch import nn

HOOK_ATTRIBUTES = ("_hf_hook", "_diffusers_hook")  # accelerate's, diffusers' hook registry


def carries_hook(module: nn.Module) -> bool:
    return any(hasattr(module, attribute) for attribute in HOOK_ATTRIBUTES)


def has_offload_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or any layer in it carries such a hook: its weights may be elsewhere between calls."""
    return any(carries_hook(layer) for layer in module.modules())


def has_offload_hooks_below(module: nn.Module) -> bool:
    """Whether a layer inside ``module`` carries such a hook: sequential CPU offload keeps each layer's weights on
    ``meta`` until that layer is called, layerwise casting stores them in another dtype."""
    return any(carries_hook(layer) for layer in module.modules() if layer is not module)


def input_device(module: nn.Module, execution_device: torch.device) -> torch.device:
    """Where ``module``'s inputs go: the pipeline's execution device where hooks move its weights there when it runs,
    else where its weights are (a component the offloading left alone stays where its owner put it)."""
    return execution_device if has_offload_hooks(module) else next(module.parameters()).device


def run_offload_hook(module: nn.Module) -> None:
    """Let accelerate's hook on ``module`` itself (``enable_model_cpu_offload``'s) move it to the execution device, as
    calling it would: a method other than ``forward`` (the pivot encoder's ``encode_image``, the banded decode)
    skips the hook."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(module)
