import json

import pytest
import torch

from omniportrait.errors import ConfigError
from omniportrait.models.pivot_encoder import PivotIDEncoder
from omniportrait.training.checkpoints import complete_checkpoints
from omniportrait.training.losses import localization_loss
from omniportrait.training.runlog import read_log
from omniportrait.training.trainer import (
    PivotTrainer,
    frozen_modules,
    generator_for,
    mix_pivot,
    pivot_encoder_from_vision_model,
    unique_positions,
)

from .conftest import tiny_config


def first_batch(trainer, size=2):
    return next(iter(trainer.dataloader(0)))


def snapshot(module: torch.nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def trainer(request, records_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp(request.param)
    return PivotTrainer(tiny_config(records_dir, output, preset=request.param, cond_dropout=0.0))


def test_only_the_pivot_encoder_receives_gradients(trainer):
    batch = first_batch(trainer)
    with trainer.recording(batch):
        terms = trainer.loss(batch, generator_for(0, 0, 0))
        terms.total.backward()
    pie = trainer.unwrapped_pie
    for name, module in frozen_modules(trainer.pipe).items():
        assert not any(p.requires_grad or p.grad is not None for p in module.parameters()), name
    grads = {name: p.grad for name, p in pie.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["fuse.weight"].abs().sum() > 0
    assert any(g.abs().sum() > 0 for name, g in grads.items() if name.startswith("vision."))
    pie.zero_grad(set_to_none=True)


def test_the_localization_gradient_reaches_the_pivot_encoder(trainer):
    batch = first_batch(trainer)
    generator = generator_for(0, 0, 0)
    latents = trainer.encode_latents(batch.pixel_values, generator)
    noisy, timesteps, _ = trainer.noisy_latents(latents, generator)
    with trainer.recording(batch):
        _, maps = trainer.forward(batch, noisy, timesteps, torch.ones(len(batch), dtype=torch.bool))
        localization_loss(maps, batch.masks).mean().backward()
    assert trainer.unwrapped_pie.fuse.weight.grad.abs().sum() > 0
    assert all(p.grad is None for m in frozen_modules(trainer.pipe).values() for p in m.parameters())
    trainer.unwrapped_pie.zero_grad(set_to_none=True)


def test_frozen_models_stay_bit_identical_while_the_pie_trains(trainer):
    frozen = {name: snapshot(module) for name, module in frozen_modules(trainer.pipe).items()}
    assert {"unet", "vae", "text_encoder"} <= set(frozen)
    pie_before = snapshot(trainer.unwrapped_pie)
    batches = iter(trainer.dataloader(0))
    for position in range(2):
        trainer.micro_step(next(batches), generator_for(0, position, 0))
    for name, module in frozen_modules(trainer.pipe).items():
        after = module.state_dict()
        assert all(torch.equal(after[key], value) for key, value in frozen[name].items()), name
    pie_after = trainer.unwrapped_pie.state_dict()
    assert not torch.equal(pie_after["fuse.weight"], pie_before["fuse.weight"])


def test_mix_pivot_replaces_only_the_class_word_of_kept_samples(trainer):
    batch = first_batch(trainer)
    embeds, _ = trainer.encode_text(batch.captions)
    faces = trainer.unwrapped_pie.preprocess(batch.faces)
    keep = torch.tensor([True, False])
    mixed = mix_pivot(trainer.model, embeds, faces, batch.positions, keep)
    assert torch.equal(mixed[1], embeds[1])
    positions = batch.positions[0]
    others = [i for i in range(embeds.shape[1]) if i not in positions]
    assert torch.equal(mixed[0, others], embeds[0, others])
    expected = trainer.unwrapped_pie(faces[:1], embeds[:1, positions])
    torch.testing.assert_close(mixed[0, positions], expected[0])


def test_dropped_samples_get_the_empty_prompt_and_no_identity(trainer):
    batch = first_batch(trainer)
    embeds, _ = trainer.conditioning(batch, torch.tensor([False, False]))
    empty, _ = trainer.encode_text(["", ""])
    torch.testing.assert_close(embeds, empty)


def test_text_and_id_are_dropped_together_at_the_configured_rate(trainer):
    keep = trainer.condition_keep(20_000, torch.Generator().manual_seed(0))
    assert keep.float().mean().item() == pytest.approx(1.0 - trainer.config.cond_dropout, abs=0.01)
    trainer.config.cond_dropout = 0.1
    keep = trainer.condition_keep(20_000, torch.Generator().manual_seed(0))
    trainer.config.cond_dropout = 0.0
    assert keep.float().mean().item() == pytest.approx(0.9, abs=0.01)


def test_gradient_checkpointing_gives_the_same_gradients(records_dir, tmp_path):
    grads = []
    for checkpointing in (False, True):
        trainer = PivotTrainer(tiny_config(records_dir, tmp_path / str(checkpointing), cond_dropout=0.0,
                                           gradient_checkpointing=checkpointing))
        batch = first_batch(trainer)
        with trainer.recording(batch):
            trainer.loss(batch, generator_for(0, 0, 0)).total.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.unwrapped_pie.named_parameters()})
    assert trainer.pipe.unet.is_gradient_checkpointing and trainer.unwrapped_pie.vision.is_gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7)


def test_bf16_mixed_precision_trains_an_fp32_pie(records_dir, tmp_path):
    trainer = PivotTrainer(tiny_config(records_dir, tmp_path, mixed_precision="bf16"))
    assert trainer.pipe.unet.dtype == torch.bfloat16 and trainer.unwrapped_pie.dtype == torch.float32
    terms = trainer.micro_step(first_batch(trainer), generator_for(0, 0, 0))
    assert torch.isfinite(terms.total)


# ---------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def finished_run(records_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    config = tiny_config(records_dir, output, max_steps=4, checkpoint_every=2, sample_every=2, sample_steps=2,
                         checkpoints_total_limit=1)
    return PivotTrainer(config).train(), output


def test_a_run_writes_checkpoints_logs_samples_and_the_pie(finished_run):
    result, output = finished_run
    assert result.step == 4
    assert [step for step, _ in complete_checkpoints(output)] == [4]  # total limit 1 pruned step-2
    checkpoint = output / "checkpoints" / "step-4"
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "pivot_encoder/config.json", "pivot_encoder/diffusion_pytorch_model.safetensors"):
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["position"] == 4 and state["config"]["learning_rate"] == 2e-5
    assert not list((output / "checkpoints").glob(".tmp-*"))
    final = PivotIDEncoder.from_pretrained(str(result.pivot_encoder))
    saved = PivotIDEncoder.from_pretrained(str(checkpoint / "pivot_encoder"))
    assert final.config.trained_with_localization_loss is True  # eta > 0: read by the auto mask source
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), saved.state_dict().values()))
    sorted_samples = sorted(p.relative_to(output / "samples").as_posix() for p in (output / "samples").rglob("*.png"))
    assert sorted_samples == [f"step-{s}/{i}.png" for s in (2, 4) for i in range(3)]
    lines = [line for line in read_log(output / "logs") if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        assert {"loss", "diffusion_loss", "localization_loss", "lr", "step_time_s", "samples_per_s"} <= set(line)
        assert line["lr"] == pytest.approx(2e-5)


def test_a_second_run_into_the_same_output_needs_resume(finished_run, records_dir):
    _, output = finished_run
    with pytest.raises(ConfigError, match="--resume"):
        PivotTrainer(tiny_config(records_dir, output, max_steps=6)).train()


def test_resuming_repeats_exactly_what_an_uninterrupted_run_does(records_dir, tmp_path):
    straight = PivotTrainer(tiny_config(records_dir, tmp_path / "straight", max_steps=4, cond_dropout=0.5)).train()
    PivotTrainer(tiny_config(records_dir, tmp_path / "split", max_steps=2, cond_dropout=0.5)).train()
    resumed = PivotTrainer(tiny_config(records_dir, tmp_path / "split", max_steps=4, cond_dropout=0.5,
                                       resume=True)).train()
    assert resumed.resumed_from == 2 and resumed.step == 4
    one = PivotIDEncoder.from_pretrained(str(straight.pivot_encoder)).state_dict()
    two = PivotIDEncoder.from_pretrained(str(resumed.pivot_encoder)).state_dict()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-7)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history[2:]])


def test_multi_token_class_words_are_mixed_on_each_of_their_tokens():
    embeds = torch.zeros(2, 8, 4)
    pie = lambda faces, e_txt: e_txt + faces[:, None, :1]  # noqa: E731 - a stand-in PIE: e_mix = e_txt + face
    faces = torch.tensor([[1.0], [2.0]])
    mixed = mix_pivot(pie, embeds, faces, [[5], [2, 3, 4]], torch.tensor([True, True]))
    assert mixed[0, :, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert mixed[1, :, 0].tolist() == [0, 0, 2, 2, 2, 0, 0, 0]


def test_each_sample_reads_the_map_of_its_own_class_word_positions():
    distinct, own = unique_positions([[5], [2, 3], [5]])
    assert distinct == [[2, 3], [5]] and own.tolist() == [1, 0, 1]


def test_a_fresh_pie_from_a_clip_vision_model_starts_as_the_text_embedding(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from omniportrait.models.tiny import tiny_vision_config

    torch.manual_seed(1)
    vision = CLIPVisionModelWithProjection(tiny_vision_config())
    vision.save_pretrained(tmp_path / "clip")
    pie = pivot_encoder_from_vision_model(str(tmp_path / "clip"), text_width=32)
    loaded = pie.vision.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in vision.state_dict().items())
    e_ref, e_txt = torch.randn(2, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(pie.fuse_embeddings(e_ref, e_txt), e_txt)
    with pytest.raises(ConfigError, match="CLIP vision model"):
        pivot_encoder_from_vision_model(str(tmp_path / "missing"), text_width=32)
