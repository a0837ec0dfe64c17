import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from omniportrait.attention import (
    AttentionStore,
    RecordingAttnProcessor,
    RecordingWrapper,
    attention_layers,
    keeps_rows_apart,
    record_attention,
)


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


def test_recording_processor_gives_diffusers_output_bit_for_bit(unet_and_context):
    unet, context, extra = unet_and_context
    unet.set_attn_processor(AttnProcessor2_0())
    plain = run(unet, context, extra)
    store = AttentionStore([[3]], attention_layers(unet, 4, "attn2"), attention_layers(unet, 4, "attn1"),
                           latent_size=(32, 32))
    unet.set_attn_processor({name: RecordingAttnProcessor(store, name.split(".")[-2])
                             for name in unet.attn_processors})
    try:
        recorded = run(unet, context, extra)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(plain, recorded)
    assert store.cross_maps and store.self_qk


def test_a_user_processor_on_an_unrecorded_layer_is_kept(unet_and_context):
    unet, _, _ = unet_and_context
    store = AttentionStore([[3]], attention_layers(unet, 4, "attn2"), latent_size=(32, 32))
    other = next(name for name in unet.attn_processors if name[: -len(".processor")] not in store.cross_layers)
    mine = AttnProcessor2_0()
    unet.attn_processors  # noqa: B018
    unet.get_submodule(other[: -len(".processor")]).set_processor(mine)
    with record_attention(unet, store):
        assert unet.get_submodule(other[: -len(".processor")]).processor is mine
    assert unet.get_submodule(other[: -len(".processor")]).processor is mine


def test_rows_are_kept_apart_by_diffusers_default_and_the_recording_processor_only():
    store = AttentionStore([[3]], [])
    assert keeps_rows_apart(AttnProcessor2_0()) and keeps_rows_apart(RecordingAttnProcessor(store, "attn2"))
    assert not keeps_rows_apart(object())
    assert keeps_rows_apart(RecordingWrapper(AttnProcessor2_0(), store, "attn2"))
    assert not keeps_rows_apart(RecordingWrapper(CountingProcessor(), store, "attn2"))


class CountingProcessor(AttnProcessor2_0):
    """A user's processor (not diffusers' default type): the default arithmetic on the text context (of an
    IP-Adapter's ``(text, images)`` too), counting its calls and keeping the keywords it was given."""

    def __init__(self):
        super().__init__()
        self.calls, self.keywords = 0, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, scale=1.0,
                 ip_adapter_masks=None):
        self.calls += 1
        self.keywords.append({"scale": scale, "ip_adapter_masks": ip_adapter_masks})
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states = encoder_hidden_states[0]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def recorded_run(unet, context, extra):
    """The UNet's output and the store of a run recording the latent/4 layers."""
    store = AttentionStore([[3], [5, 6]], attention_layers(unet, 4, "attn2"), attention_layers(unet, 4, "attn1"),
                           latent_size=(32, 32))
    with record_attention(unet, store):
        return run(unet, context, extra), store


def test_a_user_processor_on_a_recorded_layer_keeps_running_and_records_the_same_maps(unet_and_context):
    unet, context, extra = unet_and_context
    unet.set_attn_processor(AttnProcessor2_0())
    default_output, default_store = recorded_run(unet, context, extra)
    mine = CountingProcessor()
    layers = [*default_store.cross_layers, *default_store.self_layers]
    for name in layers:
        unet.get_submodule(name).set_processor(mine)
    try:
        output, store = recorded_run(unet, context, extra)
        assert all(unet.get_submodule(name).processor is mine for name in layers)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    assert mine.calls == len(layers)
    assert torch.allclose(output, default_output, atol=1e-6)
    assert torch.allclose(store.identity_maps(), default_store.identity_maps(), atol=1e-6)
    for (query, key), (default_query, default_key) in zip(store.self_qk, default_store.self_qk, strict=True):
        assert torch.equal(query, default_query) and torch.equal(key, default_key)


def test_the_wrapper_records_from_the_text_of_an_ip_adapter_context_and_passes_its_keywords_on(unet_and_context):
    unet, context, _ = unet_and_context
    name = attention_layers(unet, 4, "attn2")[0]
    attn = unet.get_submodule(name)
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    store = AttentionStore([[3]], [name], latent_size=(8, 8))
    inner = CountingProcessor()
    images = torch.randn(2, 4, context.shape[-1])
    masks = [torch.ones(1, 1, 8, 8)]
    RecordingWrapper(inner, store, "attn2")(attn, hidden, (context, [images]), scale=0.5, ip_adapter_masks=masks)
    reference = AttentionStore([[3]], [name], latent_size=(8, 8))
    RecordingAttnProcessor(reference, "attn2")(attn, hidden, context)
    assert torch.equal(store.identity_maps(), reference.identity_maps())
    assert inner.keywords == [{"scale": 0.5, "ip_adapter_masks": masks}]
