"""Less kept for the guided step's backward: the feed-forward gate recomputed (the same gradient), the weights
frozen while sampling."""

from dataclasses import replace

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import AttnProcessor2_0

from benchmarks.count import SavedBytes
from omniportrait.guidance import RBGuidanceConfig
from omniportrait.guidance.config import RECOMPUTES
from omniportrait.guidance.recompute import gelu_gates, gelu_gates_recomputed, weights_frozen
from tests.guidance.test_rb import guidance_at_step, run


def native_and_recomputed(module: GEGLU, x: torch.Tensor, recompute: str):
    """(output, input gradient) of ``module`` as diffusers runs it, then recomputing what ``recompute`` names."""
    results = []
    for modules in ([], [module]):
        leaf = x.clone().requires_grad_(True)
        with gelu_gates_recomputed(modules, recompute):
            out = module(leaf)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), leaf)
        results.append((out, grad))
    return results


@pytest.mark.parametrize("recompute", RECOMPUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_gate_gives_diffusers_output_and_gradient_bit_for_bit(dtype, recompute):
    torch.manual_seed(0)
    module = GEGLU(6, 5).to(dtype).requires_grad_(False)
    (out, grad), (lean_out, lean_grad) = native_and_recomputed(module, torch.randn(2, 7, 6, dtype=dtype) * 3,
                                                               recompute)
    assert torch.equal(lean_out, out) and torch.equal(lean_grad, grad)
    assert "forward" not in vars(module)  # diffusers' own forward is back


@pytest.mark.parametrize("recompute, kept_values", [("gelu", 4 * 32), ("projection", 4 * 8)])
def test_the_gate_keeps_only_the_projection_or_its_input_for_the_backward(recompute, kept_values):
    torch.manual_seed(0)
    module = GEGLU(8, 16).requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    kept = {}
    for modules in ([], [module]):
        saved = SavedBytes(module)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), \
                gelu_gates_recomputed(modules, recompute):
            module(x * 1)  # a non-leaf input, as in a UNet
        kept[bool(modules)] = saved.total
    assert kept[True] == kept_values * 4  # gelu: the (4, 32) fp32 projection; projection: the (4, 8) input
    assert kept[False] == 4 * 32 * 4 + 4 * 16 * 4  # autograd: the projection and gelu(b), (4, 16)


def row_gradients(module: GEGLU, x: torch.Tensor, recompute: str, rows: slice, gated: bool):
    """(output, input gradient, bytes kept) of ``module`` for a loss that reads ``rows`` only; ``gated``: through the
    gate given those rows, else as diffusers runs it."""
    leaf, saved = x.clone().requires_grad_(True), SavedBytes(module)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), \
            gelu_gates_recomputed([module] if gated else [], recompute, rows):
        out = module(leaf * 1)  # a non-leaf input, as in a UNet
    (grad,) = torch.autograd.grad((out[rows] * torch.linspace(-1, 1, out.shape[-1])).sum(), leaf)
    return out, grad, saved.total


@pytest.mark.parametrize("recompute, kept_values", [("gelu", 32), ("projection", 8)])
def test_a_gate_given_rows_keeps_only_them_and_gives_diffusers_gradient(recompute, kept_values):
    torch.manual_seed(0)
    module = GEGLU(8, 16).requires_grad_(False)
    x, rows = torch.randn(4, 5, 8) * 3, slice(2, 4)  # a batch of 4 whose rows 2-3 alone reach the loss
    out, grad, _ = row_gradients(module, x, recompute, rows, gated=False)
    lean_out, lean_grad, kept = row_gradients(module, x, recompute, rows, gated=True)
    assert torch.equal(lean_out, out)
    if recompute == "gelu":
        assert torch.equal(lean_grad, grad)
    else:  # its matrix products run on the two rows only, which may round differently
        assert torch.allclose(lean_grad, grad, rtol=1e-6, atol=1e-6)
    assert grad[2:].abs().min() > 0 and lean_grad[:2].abs().max() == 0
    assert kept == 2 * 5 * kept_values * 4  # the two rows of the (fp32) projection or input


def test_the_projection_recomputed_gives_the_weights_their_gradients_too():
    torch.manual_seed(0)
    modules = [GEGLU(6, 5), GEGLU(6, 5)]
    modules[1].load_state_dict(modules[0].state_dict())
    x = torch.randn(2, 7, 6)
    for module, recompute in zip(modules, ([], [modules[1]])):
        with gelu_gates_recomputed(recompute, "projection"):
            (module(x) * torch.linspace(-1, 1, 5)).sum().backward()
    for native, lean in zip(modules[0].parameters(), modules[1].parameters()):
        assert torch.allclose(lean.grad, native.grad, rtol=1e-5, atol=1e-6) and lean.grad.abs().max() > 0


def test_a_projection_run_by_a_hook_is_left_to_it():
    torch.manual_seed(0)
    module = GEGLU(6, 5).requires_grad_(False)
    calls = []

    def hooked(hidden_states):  # as accelerate's sequential offload wraps the Linear
        calls.append(1)
        return torch.nn.Linear.forward(module.proj, hidden_states)

    module.proj.forward = hooked
    (out, grad), (lean_out, lean_grad) = native_and_recomputed(module, torch.randn(2, 7, 6), "projection")
    assert len(calls) == 2 and torch.equal(lean_out, out) and torch.equal(lean_grad, grad)


def test_the_forward_is_restored_when_the_block_raises():
    module = GEGLU(4, 4)
    with pytest.raises(RuntimeError), gelu_gates_recomputed([module]):
        assert "forward" in vars(module)
        raise RuntimeError
    assert "forward" not in vars(module)


def test_gates_already_wrapped_by_a_hook_are_left_alone(tiny_pipe):
    gates = gelu_gates(tiny_pipe.unet)
    assert gates and all(type(gate) is GEGLU for gate in gates)
    hooked = gates[0]
    hooked.forward = hooked.forward  # as accelerate's offloading does: an instance attribute
    try:
        assert hooked not in gelu_gates(tiny_pipe.unet)
    finally:
        del hooked.forward


@pytest.mark.parametrize("recompute", RECOMPUTES)
@pytest.mark.parametrize("feature_pass", ["cfg", "split"])
def test_a_guided_step_is_the_same_bit_for_bit_with_the_gates_recomputed(feature_pass, recompute, tiny_pipe,
                                                                          astronaut_reference):
    config = RBGuidanceConfig(feature_pass=feature_pass, recompute=recompute, strength=5000.0)
    steps = []
    for gates in (False, True):
        guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference, config=config)
        assert guidance.gelu_gates  # the tiny UNets' transformer blocks end in GEGLU, as the real ones
        if not gates:
            guidance.gelu_gates = []
        steps.append(guidance.noise_and_gradient(latents, torch.tensor(400), cond, 7.5))
    (noise, gradient), (lean_noise, lean_gradient) = steps
    assert gradient.abs().max() > 0
    assert torch.equal(lean_noise, noise) and torch.equal(lean_gradient, gradient)


class RowMixingProcessor(AttnProcessor2_0):
    """diffusers' processor plus the batch's mean, as adapters that attend across the batch do: a conditional row's
    output then depends on the unconditional rows."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = super().__call__(attn, hidden_states, *args, **kwargs)
        return out + out.mean(0, keepdim=True)


def guided_gradient(pipe, reference, gates: bool = True, rows_forced: bool = False) -> torch.Tensor:
    guidance, latents, cond = guidance_at_step(pipe, reference, config=RBGuidanceConfig(strength=5000.0))
    if not gates:
        guidance.gelu_gates = []
    if rows_forced:
        guidance.gate_rows = lambda cond: guidance.cfg_rows
    return guidance.noise_and_gradient(latents, torch.tensor(400), cond, 7.5)[1]


@pytest.mark.parametrize("arch", ["sd15"], indirect=True)  # its mid block is not recorded: the processor stays
def test_a_batched_cfg_pass_keeps_the_conditional_rows_only_while_no_processor_mixes_rows(tiny_pipe,
                                                                                          astronaut_reference):
    guidance, _, cond = guidance_at_step(tiny_pipe, astronaut_reference)
    assert guidance.gate_rows(cond) == slice(1, 2)  # [unconditional, conditional]
    assert guidance.gate_rows(replace(cond, do_cfg=False)) is None
    split, _, _ = guidance_at_step(tiny_pipe, astronaut_reference, config=RBGuidanceConfig(feature_pass="split"))
    assert split.gate_rows(cond) is None  # its pass with grad is conditional only
    layer = tiny_pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1")  # gates run before
    original = layer.processor
    layer.set_processor(RowMixingProcessor())
    try:
        assert guidance.gate_rows(cond) is None
        native = guided_gradient(tiny_pipe, astronaut_reference, gates=False)
        assert torch.equal(guided_gradient(tiny_pipe, astronaut_reference), native)
        forced = guided_gradient(tiny_pipe, astronaut_reference, rows_forced=True)  # what the check prevents
        assert (forced - native).abs().max() > 1e-4 * native.abs().max() > 0  # measured: 1.5e-3
    finally:
        layer.set_processor(original)


def test_a_generation_keeps_the_conditional_rows_only(tiny_pipe, astronaut_reference, monkeypatch):
    from omniportrait.guidance import rb

    seen, recomputed = [], rb.gelu_gates_recomputed
    monkeypatch.setattr(rb, "gelu_gates_recomputed", lambda modules, recompute, rows: seen.append(rows) or
                        recomputed(modules, recompute, rows))
    run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(start=1.0))
    assert seen == [slice(1, 2)] * 6  # every step guided; the sampling processors keep rows apart


def test_weights_are_frozen_for_the_block_and_their_flags_restored():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module[1].bias.requires_grad_(False)
    with pytest.raises(RuntimeError), weights_frozen(module):
        assert not any(parameter.requires_grad for parameter in module.parameters())
        raise RuntimeError
    assert [parameter.requires_grad for parameter in module.parameters()] == [True, True, True, False]


def test_a_generation_keeps_no_more_for_the_backward_when_the_weights_require_grad(tiny_pipe, astronaut_reference):
    """diffusers' ``from_pretrained`` leaves every weight requiring grad; autograd would then keep each layer's input
    for a weight gradient the guidance never takes (SDXL 1024², ``cfg``: 8.81 GiB kept instead of 6.38)."""
    def kept(weights_require_grad: bool) -> int:
        tiny_pipe.unet.requires_grad_(weights_require_grad)
        saved = SavedBytes(tiny_pipe.unet)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            run(tiny_pipe, astronaut_reference, rb_guidance=RBGuidanceConfig(start=1.0))
        assert all(p.requires_grad is weights_require_grad for p in tiny_pipe.unet.parameters())  # as they were
        return saved.total

    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())  # the tiny models are built like loaded ones
    try:
        frozen = kept(False)
        assert frozen > 0 and kept(True) == frozen
    finally:
        tiny_pipe.unet.requires_grad_(True)
