"""Transformer blocks run without diffusers' per-call overhead while sampling: the same result bit for bit."""

from contextlib import nullcontext

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from omniportrait.attention import sampling_attention
from omniportrait.blocks import lean_forwards, sampling_blocks
from omniportrait.guidance.recompute import gelu_gates, gelu_gates_recomputed
from tests.test_attention import run


def blocks_of(unet, kind=BasicTransformerBlock) -> list:
    return [module for module in unet.modules() if isinstance(module, kind)]


@torch.no_grad()
def test_sampling_blocks_match_diffusers_bit_for_bit_and_are_restored(unet_and_context):
    unet, context, extra = unet_and_context
    plain = run(unet, context, extra)
    lean_modules = blocks_of(unet) + blocks_of(unet, ResnetBlock2D) + blocks_of(unet, Transformer2DModel)
    with sampling_attention(unet), sampling_blocks(unet):
        assert all("forward" in vars(module) for module in lean_modules)
        lean = run(unet, context, extra)
    assert torch.equal(lean, plain)
    assert not any("forward" in vars(module) for module in lean_modules)


def input_gradient(unet, context, extra, lean: bool) -> torch.Tensor:
    """The gradient a loss on the UNet's output gives the latents, with the feed-forward gates recomputed (as a
    guided step runs them, their forward set per step)."""
    torch.manual_seed(0)
    latents = torch.randn(context.shape[0], 4, 32, 32, requires_grad=True)
    with sampling_attention(unet), sampling_blocks(unet) if lean else nullcontext(), \
            gelu_gates_recomputed(gelu_gates(unet), "projection"):
        out = unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=extra).sample
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), latents)[0]


def test_the_gradient_through_sampling_blocks_is_diffusers_bit_for_bit(unet_and_context, monkeypatch):
    from omniportrait.guidance import recompute

    unet, context, extra = unet_and_context
    gated, projected = [], recompute.projected_forward
    monkeypatch.setitem(recompute.RECOMPUTED_FORWARD, "projection",
                        lambda *args, **kwargs: gated.append(1) or projected(*args, **kwargs))
    unet.requires_grad_(False)
    try:
        lean = input_gradient(unet, context, extra, True)
        assert len(gated) == len(gelu_gates(unet))  # the lean blocks call the gates the guided step sets
        plain = input_gradient(unet, context, extra, False)
    finally:
        unet.requires_grad_(True)
    assert plain.abs().max() > 0 and torch.equal(lean, plain)


@torch.no_grad()
def test_hooks_and_cross_attention_keywords_keep_diffusers_calls(unet_and_context):
    unet, context, extra = unet_and_context
    plain = run(unet, context, extra)
    blocks, calls = blocks_of(unet), []
    handles = [blocks[0].norm1.register_forward_hook(lambda *args: calls.append("norm")),
               blocks[-1].ff.net[-1].register_forward_hook(lambda *args: calls.append("linear")),
               blocks_of(unet, ResnetBlock2D)[0].conv2.register_forward_hook(lambda *args: calls.append("conv"))]
    try:
        with sampling_attention(unet), sampling_blocks(unet):
            hooked = run(unet, context, extra)
            torch.manual_seed(0)
            latents = torch.randn(context.shape[0], 4, 32, 32)
            with pytest.warns(UserWarning, match="not expected"):  # diffusers' block forward, our attention's warning
                keyworded = unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=extra,
                                 cross_attention_kwargs={"unknown": 1.0}).sample
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(calls) == sorted(["norm", "linear", "conv"] * 2)
    assert torch.equal(hooked, plain) and torch.equal(keyworded, plain)


def test_blocks_of_other_configurations_keep_diffusers_forward(unet_and_context):
    unet, _, _ = unet_and_context
    blocks, resnets, transformers = blocks_of(unet), blocks_of(unet, ResnetBlock2D), blocks_of(unet, Transformer2DModel)
    assert set(lean_forwards(unet)) == set(blocks) | set(resnets) | set(transformers)  # SD/SDXL's throughout
    blocks[0].set_chunk_feed_forward(2, 1)  # diffusers' chunked feed-forward
    blocks[1].forward = blocks[1].forward  # a forward a hook replaced
    resnets[0].time_embedding_norm = "scale_shift"
    resnets[1].dropout.p = 0.1  # in training mode, it drops
    try:
        assert set(lean_forwards(unet)) == set(blocks[2:]) | set(resnets[2:]) | set(transformers)
    finally:
        blocks[0].set_chunk_feed_forward(None, 0)
        del blocks[1].forward
        resnets[0].time_embedding_norm = "default"
        resnets[1].dropout.p = 0.0


def test_checkpointed_transformers_under_grad_keep_diffusers_forward(unet_and_context):
    unet, context, extra = unet_and_context
    transformers, calls = blocks_of(unet, Transformer2DModel), []
    original = Transformer2DModel.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    Transformer2DModel.forward = counted
    try:
        with sampling_attention(unet), sampling_blocks(unet):
            with torch.no_grad():
                run(unet, context, extra)
            assert calls == []  # the lean forwards
            unet.enable_gradient_checkpointing()
            run(unet, context, extra)  # with grad: diffusers' forwards checkpoint their blocks
    finally:
        Transformer2DModel.forward = original
        unet.disable_gradient_checkpointing()
    assert calls == [True] * len(transformers)
