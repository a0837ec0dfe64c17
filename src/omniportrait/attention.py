"""Attention processors for sampling and recording: the e_mix cross-attention maps and self-attention q/k.

Recording is used by Reference-Based Guidance (regional mask, eq. 6) and by training (face localization loss, eq.
5). Processors follow diffusers' processor signature, write into an explicit :class:`AttentionStore`, and record
only for the duration of a ``with record_attention(...)`` block (restored on exceptions too).
Layers that record nothing keep their own processor. Recording layers attend with SDPA too; an identity's map is
one more SDPA call with the indicator of its tokens as value, so no probability matrix is ever formed.

While a pipeline samples, ``with sampling_attention(...)`` runs diffusers' default layers with
:class:`SamplingAttnProcessor`: the same arithmetic in fewer operations, the context's keys and values projected
once per generation instead of once per step.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.modules import module as every_module  # its hooks on every module's call

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


@dataclass
class ContextEntry:
    """A context's projected keys and values, with the context itself (so its memory is not reused while the entry
    lives) and its version counter when made."""

    context: torch.Tensor
    version: int
    key: torch.Tensor
    value: torch.Tensor


def version_of(tensor: torch.Tensor) -> int:
    """The in-place version counter; inference tensors, which keep none, count as never changed."""
    return 0 if tensor.is_inference() else tensor._version


class ContextProjections:
    """Cross-attention keys and values of each context, projected once per layer while sampling runs.

    The context (the prompt embeddings, ``e_mix`` included) is the same at every step of a generation, and so are its
    keys and values; diffusers projects them again at every step (SDXL: 140 projections in 70 layers per UNet call).
    An entry is found by the context's address, shape and strides (the halves of a CFG batch are views with their own
    entries) and used while the context's version counter is unchanged. A context that requires grad, or a layer
    whose key or value projection trains, is projected afresh: a cached projection would carry no gradient.

    It also keeps each layer's :class:`LayerCalls` (:meth:`layer_calls`), likewise for one generation.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, ContextEntry] = {}
        self.key_value_parameters: dict[int, tuple[torch.Tensor, ...]] = {}  # per layer, looked up once
        self.layers: dict[int, LayerCalls] = {}

    def cacheable(self, attn, context: torch.Tensor) -> bool:
        if context.requires_grad:
            return False
        if not torch.is_grad_enabled():
            return True
        parameters = self.key_value_parameters.get(id(attn))
        if parameters is None:  # Module.parameters() costs ~5 µs a layer, at every call of a guided step
            parameters = tuple(p for module in (attn.to_k, attn.to_v) for p in module.parameters())
            self.key_value_parameters[id(attn)] = parameters
        return not any(p.requires_grad for p in parameters)

    def key_value(self, attn, context: torch.Tensor, project) -> tuple[torch.Tensor, torch.Tensor]:
        """``project(attn, context)`` -> ``(key, value)``, from the cache where it may be."""
        if not self.cacheable(attn, context):
            return project(attn, context)
        token = (id(attn), context.data_ptr(), context.shape, context.stride(), context.dtype, context.device)
        entry = self.entries.get(token)
        if entry is None or entry.version != version_of(context):
            with torch.no_grad():
                entry = ContextEntry(context, version_of(context), *project(attn, context))
            self.entries[token] = entry
        return entry.key, entry.value

    def layer_calls(self, attn) -> LayerCalls:
        """:func:`layer_calls` of ``attn``, made on its first call."""
        calls = self.layers.get(id(attn))
        if calls is None:
            calls = self.layers[id(attn)] = layer_calls(attn)
        return calls

    def clear(self) -> None:
        self.entries.clear()
        self.key_value_parameters.clear()
        self.layers.clear()


def split_heads(projected: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """``(B·N, heads·d)`` -> ``(B, heads, N, d)``."""
    return projected.view(batch, -1, heads, projected.shape[-1] // heads).transpose(1, 2)


def key_value_heads(to_k, to_v, heads: int, flat: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``(B·S, C)`` tokens projected by ``to_k`` and ``to_v``, heads split: ``(B, heads, S, d)``
    each."""
    return split_heads(to_k(flat), batch, heads), split_heads(to_v(flat), batch, heads)


def project_key_value(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`key_value_heads` of a ``(B, S, C)`` cross-attention context (normalised first where the layer says)."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return key_value_heads(attn.to_k, attn.to_v, attn.heads, context.flatten(0, 1), context.shape[0])


def drops_nothing(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a dropout that returns its input as it is (evaluation mode or ``p = 0``) and has no hook,
    so that calling it can be skipped."""
    return type(module) is torch.nn.Dropout and not (module.training and module.p) and not hooked(module)


def output_projection(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """``attn.to_out``: the output projection, then its dropout unless that drops nothing (a module call saved)."""
    projection, dropout = attn.to_out
    hidden_states = projection(hidden_states)
    return hidden_states if drops_nothing(dropout) else dropout(hidden_states)


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether ``Module.__call__`` does more than call ``module.forward``: a hook of its own or of every module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or every_module._global_forward_hooks
                or every_module._global_forward_pre_hooks or every_module._global_backward_hooks
                or every_module._global_backward_pre_hooks)


def hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward``: :func:`has_hooks`, or a ``forward`` a hook
    replaced (accelerate's offloading)."""
    return has_hooks(module) or "forward" in vars(module)


def linear_call(module: torch.nn.Module):
    """A callable equal to ``module(x)``: for an ``nn.Linear`` (exactly; LoRA and quantised layers are subclasses or
    wrappers) without hooks, ``F.linear`` with its parameters, which is what its ``forward`` runs, without
    ``Module.__call__``'s checks (~4 µs a call on the development CPU); otherwise the module."""
    if type(module) is not torch.nn.Linear or hooked(module):
        return module
    return partial(F.linear, weight=module.weight, bias=module.bias)


@dataclass(frozen=True)
class LayerCalls:
    """An attention layer's projections as :func:`linear_call` gives them, looked up once per generation."""

    to_q: Callable
    to_k: Callable
    to_v: Callable
    to_out: Callable


def layer_calls(attn) -> LayerCalls:
    """:class:`LayerCalls` of ``attn``; the output projection's dropout is left out where it drops nothing."""
    projection, dropout = attn.to_out
    to_out = linear_call(projection) if drops_nothing(dropout) else partial(output_projection, attn)
    return LayerCalls(linear_call(attn.to_q), linear_call(attn.to_k), linear_call(attn.to_v), to_out)


class SamplingAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` arithmetic in fewer operations, for the denoising loop; records into
    ``store`` while one is set (``kind``: :data:`CROSS` maps or :data:`SELF` q/k).

    On a GPU whose host CPU issues kernels more slowly than the GPU runs them, a step costs what the host spends
    issuing it (benchmarks/README.md), and diffusers' attention layer dispatches 25 operations besides the attention
    itself (ours: 18 for self-attention, 10 for cross-attention). Here the projections run on the tokens flattened
    to two dimensions (the matrix product diffusers' call folds to anyway), as ``F.linear`` calls where a projection is
    a plain ``nn.Linear`` without hooks (:func:`linear_call`; ~8 µs saved per projection on the development CPU), the
    context's keys and values come from a :class:`ContextProjections` when one is given, and a rescale factor of 1
    divides nothing. The result is the same bit for bit.
    """

    def __init__(self, projections: ContextProjections | None = None, store: AttentionStore | None = None,
                 kind: str | None = None):
        self.projections = projections
        self.store, self.kind = store, kind

    def calls(self, attn) -> LayerCalls:
        """The layer's projections: looked up once per generation when a :class:`ContextProjections` is given (whose
        life is one generation), else the modules themselves."""
        if self.projections is None:
            return LayerCalls(attn.to_q, attn.to_k, attn.to_v, partial(output_projection, attn))
        return self.projections.layer_calls(attn)

    def attend(self, attn, query, key, value, mask):
        if self.store is not None:
            if self.kind == CROSS:
                self.store.record_cross(query, key, mask, attn.scale)
            else:
                self.store.record_self(query, key)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    def context_key_value(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.projections is not None:
            return self.projections.key_value(attn, context, project_key_value)
        return project_key_value(attn, context)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        batch, sequence, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        calls = self.calls(attn)
        tokens, flat = hidden_states.shape[1], hidden_states.flatten(0, 1)
        query = split_heads(calls.to_q(flat), batch, attn.heads)
        if cross:
            key, value = self.context_key_value(attn, context)
        else:
            key, value = key_value_heads(calls.to_k, calls.to_v, attn.heads, flat, batch)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self.attend(attn, query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch * tokens, -1)
        hidden_states = calls.to_out(hidden_states).view(batch, tokens, -1)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


# diffusers' Attention.forward reads its processor's signature on every call (to filter keyword arguments): ~19 µs
# on the 2-core development CPU, 140 calls per SDXL UNet pass. With the signature computed once, ~6 µs; inside
# sampling_attention the layers skip the reading altogether (sampling_forward).
SamplingAttnProcessor.__call__.__signature__ = inspect.signature(SamplingAttnProcessor.__call__)


QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states"})  # diffusers drops these without a warning


def sampling_forward(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
    """``Attention.forward`` of a layer inside :func:`sampling_attention`, without reading the processor's signature.

    diffusers' forward reads it at every call to filter the keyword arguments, and ``inspect`` builds a new
    signature for the bound method each time, even from a cached one (~20 µs per call on the 2-core development
    CPU, 140 calls per SDXL UNet pass). A :class:`SamplingAttnProcessor` takes ``temb`` and nothing more, so any other
    keyword is dropped with diffusers' warning. A layer whose processor was changed inside the block runs
    diffusers' forward.
    """
    processor = attn.processor
    if not isinstance(processor, SamplingAttnProcessor):
        return type(attn).forward(attn, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    temb = cross_attention_kwargs.pop("temb", None)
    ignored = sorted(set(cross_attention_kwargs) - QUIET_KWARGS)
    if ignored:
        warnings.warn(f"cross_attention_kwargs {ignored} are not expected by {type(processor).__name__} and will be "
                      f"ignored", stacklevel=2)
    return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class RecordingAttnProcessor(SamplingAttnProcessor):
    """:class:`SamplingAttnProcessor` recording into ``store``, for a layer whose processor is not one already."""

    def __init__(self, store: AttentionStore, kind: str, projections: ContextProjections | None = None):
        super().__init__(projections, store, kind)


def is_diffusers_default(processor) -> bool:
    """Whether ``processor`` is diffusers' default SDPA processor, which :class:`SamplingAttnProcessor` replaces."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return type(processor) is AttnProcessor2_0


def keeps_rows_apart(processor) -> bool:
    """Whether ``processor`` computes each batch row from that row alone, as ours and diffusers' default do (an
    adapter's or a user's processor may attend across rows)."""
    return isinstance(processor, SamplingAttnProcessor) or is_diffusers_default(processor)


def attention_modules(unet) -> list:
    """The UNet's attention layers (the modules that take a processor)."""
    return [module for module in unet.modules() if hasattr(module, "set_processor")]


@contextmanager
def sampling_attention(unet, projections: ContextProjections | None = None):
    """:class:`SamplingAttnProcessor` on every attention layer that runs diffusers' default processor, for the
    ``with`` block (a user's or an adapter's processor stays); always restore.

    ``projections`` (default: a new one, cleared on exit) keeps the context's keys and values across the UNet calls
    of the block. The layers call their processor through :func:`sampling_forward` (unless a hook has replaced their
    ``forward``, as accelerate's offloading does)."""
    own = projections is None
    projections = ContextProjections() if own else projections
    modules = {name: module for name, module in unet.named_modules()
               if hasattr(module, "set_processor") and is_diffusers_default(module.get_processor())}
    original = {name: module.get_processor() for name, module in modules.items()}
    direct = [module for module in modules.values() if "forward" not in vars(module)]  # a hook's forward stays
    for module in modules.values():
        module.set_processor(SamplingAttnProcessor(projections))
    for module in direct:
        module.forward = sampling_forward.__get__(module)
    try:
        yield projections
    finally:
        for module in direct:
            del module.forward
        for name, module in modules.items():
            module.set_processor(original[name])
        if own:
            projections.clear()


@contextmanager
def record_attention(unet, store: AttentionStore, self_attention: bool = True):
    """Record the store's layers for the ``with`` block; always restore.

    ``self_attention=False`` records the cross-attention maps only. A layer running :class:`SamplingAttnProcessor`
    (inside :func:`sampling_attention`) is told to record, which costs nothing; any other gets a
    :class:`RecordingAttnProcessor` for the block (sharing the projections of the processor it replaces, if any).
    Only the recorded layers are touched: diffusers' ``set_attn_processor`` walks every module of the UNet, about 20
    ms per call on SDXL.
    """
    kinds = {name: CROSS for name in store.cross_layers}
    kinds.update({name: SELF for name in store.self_layers} if self_attention else {})
    modules = store.layer_modules(unet)
    told, replaced = [], {}
    for name, kind in kinds.items():
        module = modules[name]
        processor = module.processor
        if isinstance(processor, SamplingAttnProcessor) and processor.store is None:
            processor.store, processor.kind = store, kind
            told.append(processor)
        else:
            replaced[name] = processor
            module.set_processor(RecordingAttnProcessor(store, kind, getattr(processor, "projections", None)))
    try:
        yield store
    finally:
        for processor in told:
            processor.store = processor.kind = None
        for name, processor in replaced.items():
            modules[name].set_processor(processor)
