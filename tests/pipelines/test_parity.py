"""With no identity our pipelines reproduce diffusers' own; with one, only class-word states change."""

import torch

from omniportrait.guidance import RBGuidanceConfig
from omniportrait.pipelines import Identity
from tests.conftest import max_abs_diff
from tests.conftest import build

PROMPT = "a photo of a woman on the beach"


def generate(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                output_type="np", **kwargs).images


def test_no_identity_matches_diffusers(arch):
    ours, theirs = build(arch), build(arch, ours=False)
    difference = max_abs_diff(generate(ours), generate(theirs))
    print(f"{arch} parity max abs diff: {difference:.3g}")
    assert difference <= 1e-5


def capture_text_states(pipe, **kwargs):
    states = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: states.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        pipe(PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="latent",
             rb_guidance=RBGuidanceConfig(enabled=False), **kwargs)
    finally:
        handle.remove()
    return states[0]


def test_identity_changes_only_the_class_word_states(tiny_pipe, astronaut_reference):
    plain = capture_text_states(tiny_pipe)
    mixed = capture_text_states(tiny_pipe, identities=[Identity(astronaut_reference, "woman")])
    uncond_plain, cond_plain = plain.chunk(2)
    uncond_mixed, cond_mixed = mixed.chunk(2)
    assert torch.equal(uncond_plain, uncond_mixed)
    changed = (cond_plain != cond_mixed).any(dim=-1)[0].nonzero().flatten().tolist()
    position = tiny_pipe.tokenizer(PROMPT).input_ids.index(tiny_pipe.tokenizer.convert_tokens_to_ids("woman</w>"))
    assert changed == [position]


def test_identity_changes_the_image(tiny_pipe, astronaut_reference):
    plain = generate(tiny_pipe)
    with_identity = generate(tiny_pipe, identities=[Identity(astronaut_reference, "woman")])
    assert max_abs_diff(plain, with_identity) > 1e-3
