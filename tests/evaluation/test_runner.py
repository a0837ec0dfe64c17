"""Jobs, disjoint data-parallel slices, resumability, and the merged report of several processes."""

from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from omniportrait.evaluation.metrics import MetricConfig
from omniportrait.evaluation.prompts import select_prompts
from omniportrait.evaluation.runner import (
    EvalConfig,
    GenerationConfig,
    Job,
    ProcessInfo,
    build_jobs,
    run_evaluation,
    shard,
)
from omniportrait.evaluation.sweep import Setting
from omniportrait.evaluation.tiny import TINY_MODEL_ID


class Ref:
    def __init__(self, name, word="person"):
        self.name, self.class_word = name, word


def test_jobs_cover_every_combination_in_a_fixed_order():
    jobs = build_jobs([Setting()], [Ref("a.png", "woman"), Ref("b.png", "man")], select_prompts(max_prompts=3), [0, 1])
    assert len(jobs) == 2 * 3 * 2
    assert jobs[0].text == "A woman posing like a tourist in front of the Eiffel Tower"
    assert jobs[-1].text == "A man on the beach" and jobs[-1].seed == 1
    assert jobs[0].relative_path == Path("images/default/a_png/pose-0-seed0.png")


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_slices_are_disjoint_and_cover_all_jobs(count):
    jobs = build_jobs([Setting()], [Ref("a.png"), Ref("b.png")], select_prompts(max_prompts=6), [0, 1, 2])
    slices = [shard(jobs, index, count) for index in range(count)]
    flat = [job for piece in slices for job in piece]
    assert sorted(flat, key=jobs.index) == jobs
    assert len(set(flat)) == len(jobs)
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    with pytest.raises(ValueError):
        shard(jobs, count, count)


@pytest.fixture(scope="module")
def one_reference(tmp_path_factory, astronaut_image):
    folder = tmp_path_factory.mktemp("one-reference")
    astronaut_image.save(folder / "astronaut.png")
    return folder


def config_for(references, output, steps=1) -> EvalConfig:
    return EvalConfig(
        references=references, output=output, prompts=tuple(select_prompts(max_prompts=1)),
        generation=GenerationConfig(preset="tiny-sd15", steps=steps, device="cpu"),
        metrics=MetricConfig(clip_model=TINY_MODEL_ID), metric_names=("clip-t", "fid-clip"), progress=False,
    )


def attention_mask_only(monkeypatch) -> None:
    """The attention mask source: the detect source's decode of x̂0 would count among the decodes counted here."""
    from omniportrait.guidance import mask_source

    monkeypatch.setattr(mask_source, "chosen_source", lambda mask, encoder: ("attention", "attention: asked for"))


def test_two_processes_take_disjoint_slices_and_the_main_one_merges(references_dir, tmp_path):
    """As under ``accelerate launch`` with 2 processes: rank 1 does its half, rank 0 its half plus the report."""
    config = config_for(references_dir, tmp_path / "out")
    assert run_evaluation(config, ProcessInfo(index=1, count=2)) is None
    images = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert images == ["images/default/mirror_png/pose-0-seed0.png"]  # job 1 of [astronaut, mirror]
    assert not (tmp_path / "out" / "report.json").exists()
    result = run_evaluation(config, ProcessInfo(index=0, count=2))
    assert result.generated == 1
    assert result.report["images"] == {"expected": 2, "found": 2}
    row = result.report["rows"][0]
    assert row["images"] == 2 and row["values"]["clip_t"] is not None
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2
    assert row["values"]["fid_clip"] is not None  # the set metric saw both processes' images (2 ≥ 2 needed)


def test_a_finished_image_is_reused_and_a_changed_setting_regenerates(one_reference, tmp_path):
    config = config_for(one_reference, tmp_path / "out")
    assert run_evaluation(config, ProcessInfo()).generated == 1
    image = tmp_path / "out" / "images/default/astronaut_png/pose-0-seed0.png"
    stamp = image.stat().st_mtime_ns
    again = run_evaluation(config, ProcessInfo())
    assert again.generated == 0 and image.stat().st_mtime_ns == stamp
    assert again.report["images"] == {"expected": 1, "found": 1}
    image.with_suffix(".json").unlink()  # an image without its sidecar was interrupted: redo it
    assert run_evaluation(config, ProcessInfo()).generated == 1
    assert run_evaluation(config_for(one_reference, tmp_path / "out", steps=2), ProcessInfo()).generated == 1


def test_images_are_reused_across_dtypes_only_as_the_dtype_they_were_made_in(one_reference, tmp_path):
    """``auto`` is fp32 on the CPU: an fp32 run reuses those images, an fp16 run makes its own."""
    config = config_for(one_reference, tmp_path / "out")
    assert run_evaluation(config, ProcessInfo()).generated == 1
    in_fp32 = replace(config, generation=replace(config.generation, dtype="fp32"))
    in_fp16 = replace(config, generation=replace(config.generation, dtype="fp16"))
    assert run_evaluation(in_fp32, ProcessInfo()).generated == 0
    assert run_evaluation(in_fp16, ProcessInfo()).generated == 1


def test_cuda_graphs_reach_the_pipeline_and_keep_finished_images(monkeypatch, one_reference, tmp_path):
    import dataclasses

    import numpy as np

    from omniportrait.guidance.steps import StepRunner
    from tests.guidance.test_graph import EmulatedGraphs

    monkeypatch.setattr(StepRunner, "graph_backend", EmulatedGraphs)
    EmulatedGraphs.calls.update(warm_up=0, capture=0, replay=0)
    eager = config_for(one_reference, tmp_path / "eager", steps=4)
    graphed = dataclasses.replace(eager, output=tmp_path / "graphed",
                                  generation=dataclasses.replace(eager.generation, cuda_graph=True))
    assert run_evaluation(eager, ProcessInfo()).generated == 1
    assert run_evaluation(graphed, ProcessInfo()).generated == 1
    assert EmulatedGraphs.calls["capture"] > 0  # the flag reached the pipeline
    image = "images/default/astronaut_png/pose-0-seed0.png"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "eager" / image)),
                          np.asarray(Image.open(tmp_path / "graphed" / image)))
    reuse = dataclasses.replace(graphed, output=tmp_path / "eager")  # same images: the eager run's are reused
    assert run_evaluation(reuse, ProcessInfo()).generated == 0


def test_recompute_reaches_the_pipeline_and_keeps_finished_images(monkeypatch, one_reference, tmp_path):
    import dataclasses

    from omniportrait.guidance import rb

    seen = []
    recomputed = rb.gelu_gates_recomputed
    monkeypatch.setattr(rb, "gelu_gates_recomputed", lambda modules, recompute, rows: seen.append(recompute) or
                        recomputed(modules, recompute, rows))
    projection = config_for(one_reference, tmp_path / "out", steps=4)
    assert run_evaluation(projection, ProcessInfo()).generated == 1 and set(seen) == {"projection"}  # the default
    gelu = dataclasses.replace(projection, generation=dataclasses.replace(projection.generation, recompute="gelu"))
    assert run_evaluation(gelu, ProcessInfo()).generated == 0  # the same images: finished ones are reused
    fresh = dataclasses.replace(gelu, output=tmp_path / "fresh")
    assert run_evaluation(fresh, ProcessInfo()).generated == 1 and set(seen) == {"gelu", "projection"}


def test_banded_decode_reaches_the_pipeline_and_keeps_finished_images(monkeypatch, one_reference, tmp_path):
    import dataclasses

    from omniportrait.pipelines import base

    attention_mask_only(monkeypatch)
    banded_calls = []
    decode = base.decode_in_bands
    monkeypatch.setattr(base, "decode_in_bands", lambda *args: banded_calls.append(args[2]) or decode(*args))
    whole = config_for(one_reference, tmp_path / "out", steps=2)
    assert run_evaluation(whole, ProcessInfo()).generated == 1 and banded_calls == []
    banded = dataclasses.replace(whole, generation=dataclasses.replace(whole.generation, banded_decode=True))
    assert run_evaluation(banded, ProcessInfo()).generated == 0  # the same image: the finished one is kept
    fresh = dataclasses.replace(banded, output=tmp_path / "banded")
    assert run_evaluation(fresh, ProcessInfo()).generated == 1 and len(banded_calls) == 1


def test_job_is_hashable_and_labels_its_setting():
    job = Job(Setting("guidance_scale", 3.0, "3", "guidance_scale"), "a.png", "man", select_prompts()[0], 4)
    assert {job: 1}[job] == 1
    assert job.relative_path == Path("images/guidance_scale=3/a_png/pose-0-seed4.png")


def test_a_plain_run_is_one_process_and_leaves_accelerate_alone(monkeypatch):
    from omniportrait.evaluation.runner import current_process

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    process = current_process(cpu=True)
    assert (process.index, process.count, process.state) == (0, 1, None)
    assert process.is_main


def test_a_launched_run_waits_a_day_at_its_barrier(monkeypatch):
    """A process whose slice is done waits for the others; torch's default timeout (10 minutes with NCCL) would end
    a resumed run whose leftover images fell unevenly."""
    import accelerate

    from omniportrait.evaluation.runner import BARRIER_TIMEOUT, current_process

    made = {}

    class FakeState:
        def __init__(self, cpu=False, **kwargs):
            made.update(kwargs)
            self.num_processes, self.process_index, self.device = 2, 1, "cuda:1"

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    process = current_process()
    assert (process.index, process.count, process.device) == (1, 2, "cuda:1")
    assert made == {"timeout": BARRIER_TIMEOUT} and BARRIER_TIMEOUT.total_seconds() >= 12 * 3600


def test_what_ran_after_running_out_of_memory_carries_to_the_later_images(monkeypatch, one_reference, tmp_path):
    """An image whose batched cfg pass or whole decode ran out of GPU memory went on with the split pass or a banded
    decode; the later images start that way instead of running out of memory again first."""
    import dataclasses

    import torch
    from diffusers import AutoencoderKL

    from omniportrait.guidance.rb import ReferenceGuidance

    attention_mask_only(monkeypatch)
    failed = {"cfg": 0, "decode": 0}

    def out_of_memory(kind):
        def fail(*args, **kwargs):
            failed[kind] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return fail

    monkeypatch.setattr(ReferenceGuidance, "cfg_pass", out_of_memory("cfg"))
    monkeypatch.setattr(AutoencoderKL, "decode", out_of_memory("decode"))
    config = dataclasses.replace(config_for(one_reference, tmp_path / "out", steps=4),
                                 prompts=tuple(select_prompts(max_prompts=3)))
    with pytest.warns(UserWarning) as caught:
        assert run_evaluation(config, ProcessInfo()).generated == 3
    assert failed == {"cfg": 1, "decode": 1}
    messages = [str(warning.message) for warning in caught]
    for said_once in ["cfg feature pass ran out of GPU memory", "VAE decode at 64x64 ran out", "later images"]:
        assert sum(said_once in message for message in messages) == 1, messages


def test_a_carried_split_pass_replaces_cfg_only():
    from omniportrait.evaluation.runner import MemoryFallbacks
    from omniportrait.guidance.config import RBGuidanceConfig

    fallbacks = MemoryFallbacks({"feature_pass": "split", "cuda_graph": False})
    assert fallbacks.applied({})["rb_guidance"] == RBGuidanceConfig(feature_pass="split", cuda_graph=False)
    swept = fallbacks.applied({"rb_guidance": RBGuidanceConfig(feature_pass="separate")})["rb_guidance"]
    assert (swept.feature_pass, swept.cuda_graph) == ("separate", False)
    assert MemoryFallbacks().applied({"steps": 2}) == {"steps": 2}
