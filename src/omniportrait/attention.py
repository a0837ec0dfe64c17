"""Attention recording: the e_mix cross-attention maps and the self-attention q/k of chosen layers.

Recording is used by Reference-Based Guidance (regional mask, eq. 6) and by training (face localization loss, eq.
5). For the ``with record_attention(...)`` block the recorded layers run :class:`RecordingAttnProcessor` (or, where a
layer has a processor of its own such as an IP-Adapter's, :class:`RecordingWrapper` around it) through diffusers'
per-module processor interface, writing into an explicit :class:`AttentionStore`; every other layer keeps
its processor, and all are restored afterwards (on exceptions too). An identity's map is one more SDPA call with the
indicator of its tokens as value, so no probability matrix is ever formed.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

CROSS, SELF = "attn2", "attn1"
SDPA_VALUE_ALIGNMENT = 8  # CUDA's fused SDPA kernels want a value width that is a multiple of 8


def aligned_width(columns: int) -> int:
    """``columns`` rounded up to :data:`SDPA_VALUE_ALIGNMENT` (narrower values send SDPA to its fp32 math path)."""
    return columns + (-columns % SDPA_VALUE_ALIGNMENT)


def block_resolution_divisor(layer: str, num_blocks: int) -> int:
    """How much smaller than the latent the maps of ``layer`` are (``down_blocks.2`` -> 4)."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return 2 ** (num_blocks - 1)
    index = int(parts[1])
    level = index if parts[0] == "down_blocks" else num_blocks - 1 - index
    return 2 ** level


def attention_layers(unet, divisor: int, kind: str) -> list[str]:
    """Names of the ``kind`` (``attn1`` self / ``attn2`` cross) attention modules whose maps are latent/divisor."""
    num_blocks = len(unet.config.block_out_channels)
    names = [name[: -len(".processor")] for name in unet.attn_processors]
    return [name for name in names
            if name.endswith(kind) and block_resolution_divisor(name, num_blocks) == divisor]


@dataclass
class AttentionStore:
    """What the recording processors write, for one UNet call at a time.

    Args:
        positions: token positions per identity; a map is the attention mass on that identity's tokens.
        cross_layers / self_layers: module names to record (see :func:`attention_layers`).
        latent_size: ``(h, w)`` of the latent, to turn a layer's token count back into a map shape.
        rows: batch rows to record (e.g. the conditional half under CFG); ``None`` records all.
        keep_grad: keep the autograd graph of the maps (training); guidance records detached maps.
    """

    positions: list[list[int]]
    cross_layers: list[str]
    self_layers: list[str] = field(default_factory=list)
    latent_size: tuple[int, int] = (64, 64)
    rows: slice | None = None
    keep_grad: bool = False
    cross_maps: list[torch.Tensor] = field(default_factory=list)
    self_qk: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _total: torch.Tensor | None = None
    _calls: torch.Tensor | None = None
    _indicators: dict = field(default_factory=dict)
    _unet: object = None
    _layer_modules: dict = field(default_factory=dict)

    def layer_modules(self, unet) -> dict:
        """``{name: attention module}`` of the recorded layers of ``unet``, looked up once (every step records)."""
        if self._unet is not unet:
            names = [*self.cross_layers, *self.self_layers]
            self._unet, self._layer_modules = unet, {name: unet.get_submodule(name) for name in names}
        return self._layer_modules

    def clear(self) -> None:
        self.cross_maps.clear()
        self.self_qk.clear()

    def map_shape(self, tokens: int) -> tuple[int, int]:
        height, width = self.latent_size
        divisor = math.sqrt(height * width / tokens)
        return round(height / divisor), round(width / divisor)

    def token_indicator(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """``(tokens, n_id)`` 0/1 matrix of each identity's token positions, columns zero-padded to a multiple of 8
        (for SDPA's fused kernels); made once per device and dtype."""
        key = (tokens, like.device, like.dtype)
        if key not in self._indicators:
            indicator = torch.zeros(tokens, aligned_width(len(self.positions)))
            for column, positions in enumerate(self.positions):
                indicator[positions, column] = 1.0
            self._indicators[key] = indicator.to(like.device, like.dtype)
        return self._indicators[key]

    def record_cross(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float) -> None:
        """Each identity's attention mass ``Σ_{j ∈ tokens} softmax(q·kᵀ·scale)_j`` per head, ``(B, heads, hw, ·)``.

        One SDPA call with the identities' token indicator as value: the probabilities are never materialised.
        The head and layer means wait for :meth:`identity_maps`, which takes them for all layers at once: a
        recorded layer costs a handful of operations (on every recorded layer of every step).
        """
        if self.rows is not None:
            query, key = query[self.rows], key[self.rows]
            mask = None if mask is None else mask[self.rows]
        if not self.keep_grad and torch.is_grad_enabled():
            query, key = query.detach(), key.detach()
        batch, heads, _, _ = query.shape
        indicator = self.token_indicator(key.shape[-2], query).expand(batch, heads, -1, -1)
        self.cross_maps.append(F.scaled_dot_product_attention(query, key, indicator, attn_mask=mask, scale=scale))

    def record_self(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Keep the self-attention q, k (selected rows) for the mask; its user takes no gradient through them."""
        if self.rows is not None:
            query, key = query[self.rows], key[self.rows]
        self.self_qk.append((query, key))

    def identity_maps(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, n_id, h, w)``: each identity's mass, mean over heads and the recorded layers of this call, at
        ``size`` (default: the first layer's map size). Layers of one shape are reduced together."""
        if not self.cross_maps:
            raise RuntimeError("no cross-attention was recorded; check the selected layers")
        total = None
        for group in group_by_shape(self.cross_maps):
            summed = torch.stack(group)[..., : len(self.positions)].mean(2).sum(0)  # (B, hw, n_id), heads averaged
            maps = summed.transpose(1, 2).unflatten(-1, self.map_shape(summed.shape[1])).float()
            size = size or tuple(maps.shape[-2:])
            total = resize_map(maps, size) + (0 if total is None else total)
        return total / len(self.cross_maps)

    def running_mean_state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A copy of the running mean's sum and count, for :meth:`restore_running_mean` (a step that failed)."""
        return None if self._total is None else (self._total.clone(), self._calls.clone())

    def restore_running_mean(self, state: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if state is None:
            self._total = self._calls = None
        else:
            self._total.copy_(state[0])
            self._calls.copy_(state[1])

    def running_mean(self) -> torch.Tensor | None:
        """The running mean of the maps over the calls so far, without adding to it; None before the first call."""
        return None if self._total is None else self._total / self._calls

    def accumulate(self) -> torch.Tensor:
        """Add this call's maps to the running mean over calls (steps) and return that mean.

        The sum and the count are tensors updated in place, so a step replayed as a CUDA graph adds to them too.
        """
        current = self.identity_maps().detach()
        if self._total is None:
            self._total, self._calls = torch.zeros_like(current), torch.zeros((), device=current.device)
        self._total.add_(current)
        self._calls.add_(1)
        return self._total / self._calls


def group_by_shape(items: list, shape_of=lambda tensor: tensor.shape) -> list[list]:
    """``items`` grouped by ``shape_of(item)``, groups in order of first appearance."""
    groups: dict = {}
    for item in items:
        groups.setdefault(shape_of(item), []).append(item)
    return list(groups.values())


def resize_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down / bilinear up ``(B, C, h, w)`` maps to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def attention_inputs(attn, hidden_states, context, attention_mask, temb):
    """What diffusers' processors compute before the projections: ``hidden_states`` as ``(B, N, C)`` after the
    spatial and group norms, the context (the hidden states for self-attention, else normed as the layer asks) and
    the attention mask shaped ``(B, heads, ·, M)`` for SDPA."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    batch, sequence = (hidden_states if context is None else context).shape[:2]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return hidden_states, context, attention_mask


def query_key(attn, hidden_states: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's query and key ``(B, heads, N, d)``, with its q/k norms."""
    batch = hidden_states.shape[0]
    query, key = (split_heads(x, batch, attn.heads) for x in (attn.to_q(hidden_states), attn.to_k(context)))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key


def record_query_key(store: AttentionStore, kind: str, attn, query, key, mask) -> None:
    """Write a layer's q/k into ``store``: each identity's cross-attention mass, or the self-attention q/k."""
    if kind == CROSS:
        store.record_cross(query, key, mask, attn.scale)
    else:
        store.record_self(query, key)


class RecordingAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` that also records its query and key into ``store``: ``kind`` :data:`CROSS`
    (each identity's cross-attention mass) or :data:`SELF` (the q/k of the self-attention, for eq. 6's refinement).
    The same arithmetic as diffusers' processor, in the same order."""

    def __init__(self, store: AttentionStore, kind: str):
        super().__init__()
        self.store, self.kind = store, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual, shape = hidden_states, hidden_states.shape
        hidden_states, context, attention_mask = attention_inputs(attn, hidden_states, encoder_hidden_states,
                                                                  attention_mask, temb)
        query, key = query_key(attn, hidden_states, context)
        value = split_heads(attn.to_v(context), hidden_states.shape[0], attn.heads)
        record_query_key(self.store, self.kind, attn, query, key, attention_mask)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if len(shape) == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class RecordingWrapper(torch.nn.Module):
    """Records a layer's q/k into ``store`` and then runs the layer's own processor ``inner`` unchanged: how a layer
    whose processor is not diffusers' default (an IP-Adapter's, a user's) is recorded without losing what that
    processor adds (an IP-Adapter's image attention). q/k are projected here once more, from the text context only:
    diffusers hands an IP-Adapter layer ``(text, image states)``. A module, so that an inner processor with weights
    stays in the UNet's parameters while wrapped."""

    def __init__(self, inner, store: AttentionStore, kind: str):
        super().__init__()
        self.inner, self.store, self.kind = inner, store, kind
        self.accepts = set(inspect.signature(inner.__call__).parameters)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale=None, ip_adapter_masks=None, **kwargs):
        """``scale`` and ``ip_adapter_masks`` are named so that diffusers' ``Attention.forward``, which filters the
        attention kwargs by the processor's signature, passes them; they go on to ``inner`` where it takes them."""
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        states, context, mask = attention_inputs(attn, hidden_states, text, attention_mask, temb)
        record_query_key(self.store, self.kind, attn, *query_key(attn, states, context), mask)
        given = {"scale": scale, "ip_adapter_masks": ip_adapter_masks}
        kwargs.update({name: value for name, value in given.items() if value is not None and name in self.accepts})
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def split_heads(projected: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """``(B, N, heads·d)`` -> ``(B, heads, N, d)``."""
    return projected.view(batch, -1, heads, projected.shape[-1] // heads).transpose(1, 2)


def attention_modules(unet) -> list:
    """The UNet's attention layers (the modules that take a processor)."""
    return [module for module in unet.modules() if hasattr(module, "set_processor")]


def recording_processor(processor, store: AttentionStore, kind: str):
    """The processor that records a layer now run by ``processor``: :class:`RecordingAttnProcessor` in place of
    diffusers' default processors (the same output, the q/k computed once), a :class:`RecordingWrapper` around any
    other, which keeps running."""
    if type(processor) in (AttnProcessor2_0, AttnProcessor, RecordingAttnProcessor):
        return RecordingAttnProcessor(store, kind)
    return RecordingWrapper(processor, store, kind)


@contextmanager
def record_attention(unet, store: AttentionStore, self_attention: bool = True):
    """Record the store's layers for the ``with`` block; always restore their processors. A layer keeps what its
    processor computes (:func:`recording_processor`).

    ``self_attention=False`` records the cross-attention maps only. Only the recorded layers are touched: diffusers'
    ``set_attn_processor`` walks every module of the UNet.
    """
    kinds = {name: CROSS for name in store.cross_layers}
    kinds.update({name: SELF for name in store.self_layers} if self_attention else {})
    modules = store.layer_modules(unet)
    original = {name: modules[name].processor for name in kinds}
    for name, kind in kinds.items():
        modules[name].set_processor(recording_processor(original[name], store, kind))
    try:
        yield store
    finally:
        for name, processor in original.items():
            modules[name].set_processor(processor)


def keeps_rows_apart(processor) -> bool:
    """Whether ``processor`` computes each batch row from that row alone, as diffusers' default and ours do (an
    adapter's or a user's processor may attend across rows); a :class:`RecordingWrapper` as its inner processor."""
    if isinstance(processor, RecordingWrapper):
        return keeps_rows_apart(processor.inner)
    return type(processor) in (AttnProcessor2_0, RecordingAttnProcessor)
