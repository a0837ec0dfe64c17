"""SD/SDXL transformer blocks, resnets and transformers called without diffusers' per-call overhead while sampling.

diffusers' ``BasicTransformerBlock``, ``ResnetBlock2D`` and ``Transformer2DModel`` forwards serve every configuration
they support (ada norms, GLIGEN, positional embeddings, chunked feed-forward; resampling resnets, scale-shift time
embeddings; patched and vectorised inputs), and each of their sub-layer calls goes through ``Module.__call__``'s hook
checks (a few µs each on a CPU that issues a GPU's kernels; SDXL has 70 transformer blocks with ten sub-layers each,
17 resnets with nine, 11 transformers). For the configuration SD1.5 and SDXL use, :func:`sampling_block_forward`,
:func:`sampling_resnet_forward` and :func:`sampling_transformer_forward` run the same operations in the same
order: linear, convolution, norm and SiLU layers as their ``torch.nn.functional`` call, the feed-forward gates'
projections likewise, the attention layers' own ``forward``, a dropout that drops nothing not at all, a division by
an output scale factor of 1 neither. The result is the same bit for bit (``tests/test_blocks.py``). Any other
module, a sub-layer with a hook, or a call with masks, ``cross_attention_kwargs``, the deprecated ``scale`` or
gradient checkpointing under grad runs diffusers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from omniportrait.attention import drops_nothing, has_hooks, hooked, linear_call
from omniportrait.guidance.recompute import gelu_gate


def forward_call(module: torch.nn.Module) -> Callable:
    """``module(...)`` without ``Module.__call__`` when no hook applies: its ``forward``, read at each call (a
    forward set on the instance, as the guided step sets on the feed-forward gates, is what the call would run)."""
    if has_hooks(module):
        return module
    return lambda *args, **kwargs: module.forward(*args, **kwargs)


def functional_call(module: torch.nn.Module) -> Callable | None:
    """The ``torch.nn.functional`` call that a plain (exactly typed, unhooked) linear, convolution, norm or SiLU
    layer's ``forward`` runs, with its parameters; None for any other module."""
    if hooked(module):
        return None
    kind = type(module)
    if kind is torch.nn.Linear:
        return linear_call(module)
    if kind is torch.nn.LayerNorm:
        return partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                       bias=module.bias, eps=module.eps)
    if kind is torch.nn.GroupNorm:
        return partial(F.group_norm, num_groups=module.num_groups, weight=module.weight, bias=module.bias,
                       eps=module.eps)
    if kind is torch.nn.Conv2d and module.padding_mode == "zeros":
        return partial(F.conv2d, weight=module.weight, bias=module.bias, stride=module.stride,
                       padding=module.padding, dilation=module.dilation, groups=module.groups)
    if kind is torch.nn.SiLU and not module.inplace:
        return F.silu
    return None


def gate_call(gate) -> Callable | None:
    """diffusers' ``GEGLU`` on a CPU or a CUDA device, its projection as ``F.linear``; while a guided step has set
    the gate's own forward (:func:`~omniportrait.guidance.recompute.gelu_gates_recomputed`), that forward; on other
    devices (MPS upcasts the GELU), diffusers' forward. None for another module or when NPU kernels are present."""
    from diffusers.models.activations import GEGLU
    from diffusers.utils import is_torch_npu_available

    if type(gate) is not GEGLU or has_hooks(gate) or "forward" in vars(gate) or is_torch_npu_available():
        return None
    project = linear_call(gate.proj)

    def run(hidden_states: torch.Tensor) -> torch.Tensor:
        forward = gate.__dict__.get("forward")
        if forward is not None:
            return forward(hidden_states)
        if hidden_states.device.type not in ("cpu", "cuda"):
            return gate.forward(hidden_states)
        return gelu_gate(project(hidden_states))
    return run


def direct_call(module: torch.nn.Module) -> Callable:
    """A callable equal to ``module(x)``: :func:`functional_call` or :func:`gate_call` where there is one, else
    :func:`forward_call`."""
    return functional_call(module) or gate_call(module) or forward_call(module)


def sequence_call(modules) -> Callable:
    """diffusers' ``FeedForward.forward``: its layers in turn (:func:`direct_call`), dropouts that drop nothing left
    out."""
    calls = [direct_call(module) for module in modules if not drops_nothing(module)]

    def run(hidden_states: torch.Tensor) -> torch.Tensor:
        for call in calls:
            hidden_states = call(hidden_states)
        return hidden_states
    return run


@dataclass(frozen=True)
class BlockCalls:
    """A block's sub-layers as :func:`sampling_block_forward` calls them."""

    norm1: Callable
    attn1: Callable
    norm2: Callable | None
    attn2: Callable | None
    norm3: Callable
    feed_forward: Callable


def block_calls(block) -> BlockCalls | None:
    """:class:`BlockCalls` of a ``BasicTransformerBlock`` in SD/SDXL's configuration, else None."""
    from diffusers.models.attention import BasicTransformerBlock, FeedForward

    plain = (type(block) is BasicTransformerBlock and not hooked(block) and block.norm_type == "layer_norm"
             and block.pos_embed is None and not block.only_cross_attention and block._chunk_size is None
             and type(block.ff) is FeedForward and not hooked(block.ff))
    if not plain:
        return None
    cross = block.attn2 is not None
    return BlockCalls(direct_call(block.norm1), forward_call(block.attn1),
                      direct_call(block.norm2) if cross else None, forward_call(block.attn2) if cross else None,
                      direct_call(block.norm3), sequence_call(block.ff.net))


def sampling_block_forward(block, calls: BlockCalls, hidden_states, attention_mask=None, encoder_hidden_states=None,
                           encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                           added_cond_kwargs=None):
    """``BasicTransformerBlock.forward`` for a ``layer_norm`` block without positional embedding or chunking."""
    if cross_attention_kwargs:  # the deprecated scale, GLIGEN, adapters' keywords: diffusers' own path
        return type(block).forward(block, hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                   added_cond_kwargs)
    attn_output = calls.attn1(calls.norm1(hidden_states), encoder_hidden_states=None, attention_mask=attention_mask)
    hidden_states = attn_output + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if calls.attn2 is not None:
        attn_output = calls.attn2(calls.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                                  attention_mask=encoder_attention_mask)
        hidden_states = attn_output + hidden_states
    hidden_states = calls.feed_forward(calls.norm3(hidden_states)) + hidden_states
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


@dataclass(frozen=True)
class ResnetCalls:
    """A resnet's sub-layers as :func:`sampling_resnet_forward` calls them."""

    norm1: Callable
    conv1: Callable
    time_emb_proj: Callable
    norm2: Callable
    conv2: Callable
    conv_shortcut: Callable | None
    nonlinearity: Callable
    output_scale_factor: float


def resnet_calls(resnet) -> ResnetCalls | None:
    """:class:`ResnetCalls` of a ``ResnetBlock2D`` in SD/SDXL's configuration (no resampling inside, the time
    embedding added before the second norm, a dropout that drops nothing), else None."""
    from diffusers.models.resnet import ResnetBlock2D

    plain = (type(resnet) is ResnetBlock2D and not hooked(resnet)
             and resnet.upsample is None and resnet.downsample is None and resnet.time_emb_proj is not None
             and not resnet.skip_time_act and resnet.time_embedding_norm == "default"
             and drops_nothing(resnet.dropout))
    if not plain:
        return None
    shortcut = None if resnet.conv_shortcut is None else direct_call(resnet.conv_shortcut)
    return ResnetCalls(direct_call(resnet.norm1), direct_call(resnet.conv1), direct_call(resnet.time_emb_proj),
                       direct_call(resnet.norm2), direct_call(resnet.conv2), shortcut,
                       direct_call(resnet.nonlinearity), resnet.output_scale_factor)


def sampling_resnet_forward(resnet, calls: ResnetCalls, input_tensor, temb, *args, **kwargs):
    """``ResnetBlock2D.forward`` for a resnet :func:`resnet_calls` accepts; a division by an output scale factor of 1,
    which changes no value, is left out."""
    if args or kwargs or temb is None:  # the deprecated scale, or no time embedding: diffusers' own path
        return type(resnet).forward(resnet, input_tensor, temb, *args, **kwargs)
    hidden_states = calls.conv1(calls.nonlinearity(calls.norm1(input_tensor)))
    hidden_states = hidden_states + calls.time_emb_proj(calls.nonlinearity(temb))[:, :, None, None]
    hidden_states = calls.conv2(calls.nonlinearity(calls.norm2(hidden_states)))
    if calls.conv_shortcut is not None:
        if resnet.training:  # as diffusers does, for DDP's gradient strides
            input_tensor = input_tensor.contiguous()
        input_tensor = calls.conv_shortcut(input_tensor)
    output = input_tensor + hidden_states
    return output if calls.output_scale_factor == 1.0 else output / calls.output_scale_factor


@dataclass(frozen=True)
class TransformerCalls:
    """A ``Transformer2DModel``'s sub-layers as :func:`sampling_transformer_forward` calls them."""

    norm: Callable
    proj_in: Callable
    blocks: tuple[Callable, ...]
    proj_out: Callable
    linear_projection: bool


def transformer_calls(model) -> TransformerCalls | None:
    """:class:`TransformerCalls` of a ``Transformer2DModel`` on continuous inputs (SD/SDXL's), else None."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if type(model) is not Transformer2DModel or hooked(model) or not model.is_input_continuous:
        return None
    return TransformerCalls(direct_call(model.norm), direct_call(model.proj_in),
                            tuple(forward_call(block) for block in model.transformer_blocks),
                            direct_call(model.proj_out), model.use_linear_projection)


def sampling_transformer_forward(model, calls: TransformerCalls, hidden_states, encoder_hidden_states=None,
                                 timestep=None, added_cond_kwargs=None, class_labels=None,
                                 cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None,
                                 return_dict=True):
    """``Transformer2DModel.forward`` on continuous inputs without masks: normalise, project in, the blocks,
    project out, add the input."""
    if (cross_attention_kwargs or attention_mask is not None or encoder_attention_mask is not None
            or (torch.is_grad_enabled() and model.gradient_checkpointing)):
        return type(model).forward(model, hidden_states, encoder_hidden_states, timestep, added_cond_kwargs,
                                   class_labels, cross_attention_kwargs, attention_mask, encoder_attention_mask,
                                   return_dict)
    batch, _, height, width = hidden_states.shape
    residual = hidden_states
    hidden_states = calls.norm(hidden_states)
    if calls.linear_projection:
        inner_dim = hidden_states.shape[1]
        hidden_states = calls.proj_in(hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim))
    else:
        hidden_states = calls.proj_in(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim)
    for block in calls.blocks:
        hidden_states = block(hidden_states, attention_mask=None, encoder_hidden_states=encoder_hidden_states,
                              encoder_attention_mask=None, timestep=timestep, cross_attention_kwargs=None,
                              class_labels=class_labels)
    if calls.linear_projection:
        hidden_states = calls.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
    else:
        hidden_states = hidden_states.reshape(batch, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
        hidden_states = calls.proj_out(hidden_states)
    output = hidden_states + residual
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=output)


LEAN_FORWARDS = ((block_calls, sampling_block_forward), (resnet_calls, sampling_resnet_forward),
                 (transformer_calls, sampling_transformer_forward))


def lean_forward(module) -> Callable | None:
    """The forward :func:`sampling_blocks` gives ``module`` (:data:`LEAN_FORWARDS`: a transformer block, a resnet or
    a ``Transformer2DModel``), with its calls; None where diffusers' stays."""
    for calls_of, forward in LEAN_FORWARDS:
        calls = calls_of(module)
        if calls is not None:
            return partial(forward, module, calls)
    return None


def lean_forwards(unet) -> dict:
    """The UNet's transformer blocks and resnets :func:`sampling_blocks` runs, with their forwards."""
    forwards = {}
    for module in unet.modules():
        forward = lean_forward(module)
        if forward is not None:
            forwards[module] = forward
    return forwards


@contextmanager
def sampling_blocks(unet):
    """For the ``with`` block, the UNet's transformer blocks and resnets in SD/SDXL's configuration run their lean
    forward (:func:`lean_forward`); always restore."""
    forwards = lean_forwards(unet)
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in forwards:
            del module.forward
