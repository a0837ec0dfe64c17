"""SD/SDXL transformer blocks called without diffusers' per-call overhead while sampling.

diffusers' ``BasicTransformerBlock.forward`` serves every configuration it supports (ada norms, GLIGEN, positional
embeddings, chunked feed-forward), and each of its ten sub-layer calls goes through ``Module.__call__``'s hook
checks (a few µs each on a CPU that issues a GPU's kernels; SD1.5 has 16 such blocks, SDXL 70). For the
configuration SD1.5 and SDXL use (layer norms, self- and cross-attention, a feed-forward, nothing else),
:func:`sampling_block_forward` runs the same operations in the same order: layer norms as ``F.layer_norm``, the
attention layers' and the feed-forward's own ``forward``, linear layers as ``F.linear``, a dropout that drops
nothing not at all. The result is the same bit for bit (``tests/test_blocks.py``). Any other block, a sub-layer with
a hook, or a call with ``cross_attention_kwargs`` runs diffusers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from omniportrait.attention import drops_nothing, has_hooks, hooked, linear_call


def forward_call(module: torch.nn.Module) -> Callable:
    """``module(...)`` without ``Module.__call__`` when no hook applies: its ``forward``, read at each call (a
    forward set on the instance, as the guided step sets on the feed-forward gates, is what the call would run)."""
    if has_hooks(module):
        return module
    return lambda *args, **kwargs: module.forward(*args, **kwargs)


def layer_norm_call(module: torch.nn.Module) -> Callable:
    """``F.layer_norm`` with ``module``'s parameters for an ``nn.LayerNorm`` without hooks (what its forward runs);
    else the module."""
    if type(module) is not torch.nn.LayerNorm or hooked(module):
        return module
    return partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight, bias=module.bias,
                   eps=module.eps)


def sequence_call(modules) -> Callable:
    """diffusers' ``FeedForward.forward``: its layers in turn, linear layers as ``F.linear``, dropouts that drop
    nothing left out."""
    calls = [linear_call(module) if type(module) is torch.nn.Linear else forward_call(module)
             for module in modules if not drops_nothing(module)]

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
    return BlockCalls(layer_norm_call(block.norm1), forward_call(block.attn1),
                      layer_norm_call(block.norm2) if cross else None, forward_call(block.attn2) if cross else None,
                      layer_norm_call(block.norm3), sequence_call(block.ff.net))


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


def plain_blocks(unet) -> dict:
    """The UNet's blocks :func:`sampling_block_forward` can run, with their :class:`BlockCalls`."""
    blocks = {}
    for module in unet.modules():
        calls = block_calls(module)
        if calls is not None:
            blocks[module] = calls
    return blocks


@contextmanager
def sampling_blocks(unet):
    """For the ``with`` block, the UNet's plain transformer blocks run :func:`sampling_block_forward`; always
    restore."""
    blocks = plain_blocks(unet)
    for block, calls in blocks.items():
        block.forward = partial(sampling_block_forward, block, calls)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
