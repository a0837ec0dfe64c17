from contextlib import contextmanager

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from omniportrait.attention import (
    AttentionStore,
    ContextProjections,
    RecordingAttnProcessor,
    SamplingAttnProcessor,
    attention_layers,
    record_attention,
    sampling_attention,
)
from omniportrait.guidance.recompute import weights_frozen


def run(unet, context, extra):
    torch.manual_seed(0)
    latents = torch.randn(context.shape[0], 4, 32, 32)
    return unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=extra).sample


def test_latent_quarter_layers_exist(unet_and_context):
    unet, _, _ = unet_and_context
    assert attention_layers(unet, 4, "attn2") and attention_layers(unet, 4, "attn1")


def test_recording_matches_plain_output_and_restores_processors(unet_and_context):
    unet, context, extra = unet_and_context
    before = dict(unet.attn_processors)
    plain = run(unet, context, extra)
    store = AttentionStore([[3], [5, 6]], attention_layers(unet, 4, "attn2"), attention_layers(unet, 4, "attn1"),
                           latent_size=(32, 32), rows=slice(1, 2))
    with record_attention(unet, store):
        recorded = run(unet, context, extra)
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    maps = store.identity_maps()
    assert maps.shape == (1, 2, 8, 8)
    assert len(store.self_qk) == len(store.self_layers)
    assert ((maps >= 0) & (maps <= 2)).all()  # mass on one token <= 1, on two tokens <= 2


def test_processors_restored_after_an_exception(unet_and_context):
    unet, context, extra = unet_and_context
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    store = AttentionStore([[3]], attention_layers(unet, 4, "attn2"), latent_size=(32, 32))
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(unet, store):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_maps_keep_grad_for_training(unet_and_context):
    unet, context, extra = unet_and_context
    context = context.clone().requires_grad_(True)
    store = AttentionStore([[3]], attention_layers(unet, 4, "attn2"), latent_size=(32, 32), keep_grad=True)
    with record_attention(unet, store):
        run(unet, context, extra)
    store.identity_maps().sum().backward()
    assert context.grad[:, 3].abs().sum() > 0


def test_cross_maps_are_the_softmax_mass_on_each_identity_s_tokens():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 16, 8, generator=generator), torch.randn(2, 3, 77, 8, generator=generator)
    mask = torch.zeros(2, 1, 1, 77)
    mask[..., 70:] = float("-inf")  # padded tokens get no attention
    store = AttentionStore([[3], [5, 6]], [], latent_size=(8, 8), rows=slice(1, 2))
    store.record_cross(query, key, mask, scale=0.5)
    probs = ((query[1:] @ key[1:].transpose(-1, -2)) * 0.5 + mask[1:]).softmax(-1)
    expected = torch.stack([probs[..., [3]].sum(-1), probs[..., [5, 6]].sum(-1)], dim=1).mean(2)
    assert torch.allclose(store.identity_maps(), expected.unflatten(-1, (4, 4)), atol=1e-6)


def test_recording_touches_only_the_recorded_layers(unet_and_context):
    unet, _, _ = unet_and_context
    store = AttentionStore([[3]], attention_layers(unet, 4, "attn2"), attention_layers(unet, 4, "attn1"),
                           latent_size=(32, 32))
    recorded = {name + ".processor" for name in store.cross_layers}
    with record_attention(unet, store, self_attention=False):
        inside = unet.attn_processors
    changed = {name for name, processor in inside.items() if type(processor).__name__ == "RecordingAttnProcessor"}
    assert changed == recorded


def test_identity_maps_average_layers_of_several_sizes_at_one_size():
    generator = torch.Generator().manual_seed(1)
    store = AttentionStore([[3]], [], latent_size=(8, 8))
    shapes = [(1, 2, 16, 8), (1, 2, 64, 8), (1, 2, 16, 8)]  # 4x4, 8x8, 4x4 maps
    for shape in shapes:
        store.record_cross(torch.randn(*shape, generator=generator), torch.randn(1, 2, 77, 8, generator=generator),
                           None, scale=0.35)
    single = []
    for mass in store.cross_maps:
        maps = mass[..., :1].mean(1).transpose(1, 2)
        side = int(maps.shape[-1] ** 0.5)
        single.append(torch.nn.functional.adaptive_avg_pool2d(maps.unflatten(-1, (side, side)), (4, 4)))
    assert torch.allclose(store.identity_maps((4, 4)), torch.stack(single).mean(0), atol=1e-6)
    assert store.identity_maps().shape == (1, 1, 4, 4)  # the first layer's size


def processor_types(unet) -> dict:
    return {name: type(processor) for name, processor in unet.attn_processors.items()}


@contextmanager
def key_projections_counted(unet):
    """For the ``with`` block, a counter (``[n]``) of the cross-attention key projections run."""
    calls = [0]
    handles = [module.to_k.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
               for name, module in unet.named_modules() if name.endswith("attn2")]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_sampling_processor_matches_diffusers_bit_for_bit(unet_and_context):
    unet, context, extra = unet_and_context
    before = processor_types(unet)
    plain = run(unet, context, extra)
    with sampling_attention(unet):
        inside = set(processor_types(unet).values())
        first, cached = run(unet, context, extra), run(unet, context, extra)
    assert inside == {SamplingAttnProcessor}
    assert torch.equal(first, plain) and torch.equal(cached, plain)
    assert processor_types(unet) == before


@torch.no_grad()
def test_context_is_projected_once_per_layer_while_sampling(unet_and_context):
    unet, context, extra = unet_and_context
    layers = len([name for name in unet.attn_processors if "attn2" in name])
    with key_projections_counted(unet) as calls:
        with sampling_attention(unet) as projections:
            for _ in range(3):
                run(unet, context, extra)
            assert calls[0] == layers
            run(unet, context.chunk(2)[1], {k: v[1:] for k, v in (extra or {}).items()} or None)  # a CFG half
            assert calls[0] == 2 * layers
            assert len(projections.entries) == 2 * layers
        assert not projections.entries  # dropped with the block
        run(unet, context, extra)
        assert calls[0] == 3 * layers


@torch.no_grad()
def test_a_context_changed_in_place_is_projected_again(unet_and_context):
    unet, context, extra = unet_and_context
    changed = context.clone()
    with sampling_attention(unet):
        run(unet, changed, extra)
        changed.mul_(0.5)
        cached = run(unet, changed, extra)
    assert torch.equal(cached, run(unet, changed, extra))


def test_gradients_reach_a_context_or_projection_that_requires_them(unet_and_context):
    unet, context, extra = unet_and_context
    context = context.clone().requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    run(unet, context, extra).square().mean().backward()
    expected_context, expected_weight = context.grad.clone(), unet.down_blocks[1].attentions[0].transformer_blocks[0]
    expected_weight = expected_weight.attn2.to_k.weight
    expected, expected_weight.grad = expected_weight.grad.clone(), None
    context.grad = None
    with sampling_attention(unet):
        for _ in range(2):  # a second call would find a cached projection, if one were kept
            run(unet, context, extra).square().mean().backward()
            assert torch.allclose(context.grad, expected_context, atol=1e-6)
            assert torch.allclose(expected_weight.grad, expected, atol=1e-6)
            context.grad, expected_weight.grad = None, None
    unet.zero_grad(set_to_none=True)


@torch.no_grad()
def test_a_user_processor_is_kept(unet_and_context):
    unet, _, _ = unet_and_context
    name = next(name for name in unet.attn_processors if "attn2" in name)
    module = unet.get_submodule(name[: -len(".processor")])
    original = module.get_processor()
    module.set_processor(AttnProcessor())
    try:
        with sampling_attention(unet):
            assert type(module.get_processor()) is AttnProcessor
            assert sum(type(p) is SamplingAttnProcessor for p in unet.attn_processors.values()) > 0
    finally:
        module.set_processor(original)


@torch.no_grad()
def test_recording_while_sampling_shares_the_projections(unet_and_context):
    unet, context, extra = unet_and_context
    layers = len([name for name in unet.attn_processors if "attn2" in name])
    store = AttentionStore([[3]], attention_layers(unet, 4, "attn2"), attention_layers(unet, 4, "attn1"),
                           latent_size=(32, 32), rows=slice(1, 2))
    projections = ContextProjections()
    with key_projections_counted(unet) as calls:
        with sampling_attention(unet, projections):
            run(unet, context, extra)
            with record_attention(unet, store):
                recorded = run(unet, context, extra)
        assert calls[0] == layers
        assert projections.entries  # given by the caller: kept after the block
    assert torch.equal(recorded, run(unet, context, extra))
    assert store.cross_maps


def test_inference_tensors_are_projected_once(unet_and_context):
    unet, context, extra = unet_and_context
    with torch.inference_mode(), sampling_attention(unet):
        first, cached = run(unet, context, extra), run(unet, context, extra)
    assert torch.equal(first, cached)


def test_the_signature_diffusers_reads_is_the_processor_s_own():
    import inspect

    processor = RecordingAttnProcessor(AttentionStore([[3]], []), "attn2")
    names = list(inspect.signature(processor.__call__).parameters)
    spec = inspect.getfullargspec(SamplingAttnProcessor.__call__)  # not the cached signature
    assert names == spec.args[1:] + [spec.varargs, spec.varkw]


@torch.no_grad()
def test_recording_while_sampling_tells_the_layers_and_stops_after(unet_and_context):
    unet, context, extra = unet_and_context
    store = AttentionStore([[3]], attention_layers(unet, 4, "attn2"), attention_layers(unet, 4, "attn1"),
                           latent_size=(32, 32))
    with sampling_attention(unet):
        inside = dict(unet.attn_processors)
        with record_attention(unet, store):
            assert unet.attn_processors == inside  # the same processor objects, recording
            run(unet, context, extra)
        recorded = (len(store.cross_maps), len(store.self_qk))
        run(unet, context, extra)
    assert recorded == (len(store.cross_layers), len(store.self_layers))
    assert (len(store.cross_maps), len(store.self_qk)) == recorded  # nothing after the block


def count_signature_reads(monkeypatch) -> list[int]:
    import inspect

    reads, signature = [0], inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: reads.__setitem__(0, reads[0] + 1) or signature(*a, **k))
    return reads


@torch.no_grad()
def test_sampling_layers_call_their_processor_without_reading_its_signature(unet_and_context, monkeypatch):
    unet, context, extra = unet_and_context
    reads = count_signature_reads(monkeypatch)
    run(unet, context, extra)
    outside = reads[0]
    with sampling_attention(unet):
        forwards = {name for name, module in unet.named_modules() if "forward" in vars(module)}
        run(unet, context, extra)
    assert outside >= len(unet.attn_processors) and reads[0] == outside  # diffusers reads it per layer and call
    assert forwards == {name[: -len(".processor")] for name in unet.attn_processors}
    assert not [name for name, module in unet.named_modules() if "forward" in vars(module)]  # all restored


@torch.no_grad()
def test_a_forward_a_hook_replaced_is_kept_while_sampling(unet_and_context):
    unet, context, extra = unet_and_context
    name = next(name for name in unet.attn_processors if "attn1" in name)[: -len(".processor")]
    module, calls = unet.get_submodule(name), []

    def hooked(*args, **kwargs):
        calls.append(1)
        return type(module).forward(module, *args, **kwargs)

    module.forward = hooked
    try:
        with sampling_attention(unet):
            assert module.forward is hooked
            run(unet, context, extra)
        assert module.forward is hooked and calls == [1]
    finally:
        del module.forward


@torch.no_grad()
def test_sampling_layers_warn_about_and_ignore_keywords_their_processor_takes_not(unet_and_context):
    unet, context, extra = unet_and_context
    plain = run(unet, context, extra)
    torch.manual_seed(0)
    latents = torch.randn(context.shape[0], 4, 32, 32)
    with sampling_attention(unet), pytest.warns(UserWarning, match=r"\['unknown'\] are not expected"):
        sample = unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=extra,
                      cross_attention_kwargs={"unknown": 1.0, "ip_adapter_masks": None}).sample
    assert torch.equal(sample, plain)


@torch.no_grad()
def test_a_processor_set_inside_the_block_runs_through_diffusers_forward(unet_and_context):
    unet, context, extra = unet_and_context
    name = next(name for name in unet.attn_processors if "attn2" in name)[: -len(".processor")]
    module, calls = unet.get_submodule(name), []

    class Counting(AttnProcessor):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    plain = run(unet, context, extra)
    with sampling_attention(unet):
        module.set_processor(Counting())
        changed = run(unet, context, extra)
    assert calls == [1] and torch.allclose(changed, plain, atol=1e-5)
    assert type(module.get_processor()) is not Counting  # the one before the block comes back


def test_a_dropout_that_drops_nothing_is_not_called():
    from omniportrait.attention import drops_nothing

    dropout = torch.nn.Dropout(0.1)
    assert not drops_nothing(dropout)  # training mode
    assert drops_nothing(dropout.eval()) and drops_nothing(torch.nn.Dropout(0.0))
    dropout.register_forward_hook(lambda *args: None)
    assert not drops_nothing(dropout)


def test_a_projection_frozen_inside_the_block_is_cached_from_then_on(unet_and_context):
    unet, context, extra = unet_and_context
    layers = len([name for name in unet.attn_processors if "attn2" in name])
    with key_projections_counted(unet) as calls:
        with torch.enable_grad(), sampling_attention(unet):
            run(unet, context, extra)  # the weights require grad: projected afresh
            with weights_frozen(unet):
                run(unet, context, extra)
                run(unet, context, extra)
        assert calls[0] == 2 * layers


@torch.no_grad()
def test_projections_are_called_as_functions_unless_hooked_or_not_a_plain_linear(unet_and_context):
    from functools import partial

    from omniportrait.attention import layer_calls

    unet, context, extra = unet_and_context
    plain = run(unet, context, extra)
    layers = [module for name, module in unet.named_modules() if name.endswith("attn1")]
    calls = []

    class Counted(torch.nn.Linear):  # as a LoRA or quantised layer: its own forward
        def forward(self, x):
            calls.append("subclass")
            return super().forward(x)

    original = layers[1].to_v
    counted = Counted(original.in_features, original.out_features, bias=original.bias is not None)
    counted.load_state_dict(original.state_dict())
    layers[1].to_v = counted
    handle = layers[0].to_q.register_forward_hook(lambda *args: calls.append("hook"))
    try:
        with sampling_attention(unet) as projections:
            out = run(unet, context, extra)
            assert isinstance(projections.layers[id(layers[-1])].to_q, partial)  # F.linear, no module call
            assert projections.layers[id(layers[0])].to_q is layers[0].to_q
        assert sorted(calls) == ["hook", "subclass"] and torch.equal(out, plain)
    finally:
        handle.remove()
        layers[1].to_v = original
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert layer_calls(layers[-1]).to_q is layers[-1].to_q  # a hook on every module: every call through it
    finally:
        handle.remove()
