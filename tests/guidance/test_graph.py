"""Guided steps captured once and replayed (omniportrait.guidance.graph), checked on the CPU.

CUDA graphs need a GPU, so :class:`EmulatedGraphs` reproduces what matters about them on the CPU: a capture
records the aten operations a call dispatches and leaves no trace in tensors that existed before it (a capture
runs nothing on the GPU); a replay runs only those operations again, on the same tensors, with no Python; an
operation that waits for the device fails during a capture. A step that kept state in Python values, or that
synchronised, fails these tests as it would fail on a GPU. On the CPU a tensor's move to the device is no
operation at all, so the steps are also run on the ``meta`` device, where reading a host tensor shows.
"""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from omniportrait.errors import ConfigError
from omniportrait.guidance import RBGuidanceConfig
from omniportrait.guidance.graph import GraphedStep
from omniportrait.guidance.rb import ReferenceGuidance
from omniportrait.guidance.steps import EAGER_AFTER_OUT_OF_MEMORY, SPLIT_AFTER_OUT_OF_MEMORY, StepRunner
from omniportrait.pipelines import Identity
from tests.conftest import build

aten = torch.ops.aten
PROMPT = "a photo of a woman on the beach"
# results the host reads back (.item(), data-dependent shapes), and tensors made from host data (torch.tensor,
# from_numpy: on a GPU a copy from pageable memory, which waits for the device)
HOST_SYNCS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2,
              aten.lift_fresh}


def waits_for_device(func, args) -> bool:
    """Operations whose result on a GPU needs the device's data on the host (not allowed while capturing)."""
    if func.overloadpacket in HOST_SYNCS:
        return True
    return func.overloadpacket is aten.index and any(
        index is not None and index.dtype == torch.bool for index in args[1])


def written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments ``func`` writes to (``add_``'s self, ``copy_``'s destination, …)."""
    written = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            if isinstance(value, torch.Tensor):
                written.append(value)
    return written


class OperationRecorder(TorchDispatchMode):
    """Records each dispatched operation with its arguments and outputs, for :meth:`replay`."""

    def __init__(self):
        super().__init__()
        self.operations: list[tuple] = []
        self.created: set[int] = set()  # ids of tensors made during the capture (kept alive by `operations`)
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # earlier tensors written to: their values

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if waits_for_device(func, args):
            raise RuntimeError(f"{func} waits for the device: not allowed while capturing a CUDA graph")
        for tensor in written_tensors(func, args, kwargs):
            tensor = tensor if tensor._base is None else tensor._base  # a write through a view changes its base
            if id(tensor) not in self.created and id(tensor) not in self.before:
                self.before[id(tensor)] = (tensor, tensor.clone())
        out = func(*args, **kwargs)
        self.operations.append((func, args, kwargs, out))
        self.created.update(id(tensor) for tensor in tree_leaves(out) if isinstance(tensor, torch.Tensor))
        return out

    @torch.no_grad()
    def undo_writes(self) -> None:
        for tensor, value in self.before.values():
            tensor.copy_(value)

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, out in self.operations:
            if func.is_view:  # a view shares the memory its base's replay rewrites
                continue
            result = func(*args, **kwargs)
            for target, value in zip(tree_leaves(out), tree_leaves(result)):
                if isinstance(target, torch.Tensor) and target is not value:
                    target.copy_(value)


class EmulatedGraphs:
    """The capture backend of :class:`GraphedStep` with CUDA-graph semantics on the CPU."""

    calls = {"warm_up": 0, "capture": 0, "replay": 0}

    @staticmethod
    def problem(device):
        return None

    @staticmethod
    def warm_up(fn, inputs):
        EmulatedGraphs.calls["warm_up"] += 1
        return fn(*inputs)

    @staticmethod
    def capture(fn, inputs):
        EmulatedGraphs.calls["capture"] += 1
        recorder = OperationRecorder()
        try:
            with recorder:
                outputs = fn(*inputs)
        finally:
            recorder.undo_writes()

        def replay():
            EmulatedGraphs.calls["replay"] += 1
            recorder.replay()

        replay.recorder = recorder
        return replay, outputs


@pytest.fixture(scope="module")
def tiny_pipe():
    """The step runner does not depend on the architecture: SD1.5 only (SDXL's steps are read below on meta)."""
    return build("sd15")


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(StepRunner, "graph_backend", EmulatedGraphs)
    EmulatedGraphs.calls.update(warm_up=0, capture=0, replay=0)
    return EmulatedGraphs


# ----- the emulation itself --------------------------------------------------------------------------------
def test_a_replay_updates_tensor_state_in_place_and_runs_no_python(emulated):
    total, counts, python_calls = torch.zeros(()), torch.zeros(2), []

    def step(x):
        python_calls.append(1)
        total.add_(x.sum())
        counts[1:].add_(1)  # a write through a view
        return (x * 2,)

    graphed = GraphedStep(step, emulated)
    first = graphed(torch.ones(3))
    second = graphed(torch.full((3,), 5.0))
    third = graphed(torch.full((3,), 7.0))
    assert torch.equal(first[0], torch.full((3,), 2.0))
    assert second[0] is third[0] and torch.equal(third[0], torch.full((3,), 14.0))
    assert float(total) == 3 + 15 + 21  # the warm-up and two replays; the capture added nothing
    assert counts.tolist() == [0, 3]
    assert len(python_calls) == 2  # warm-up and capture only


@pytest.mark.parametrize("step", [lambda x: (x[x > 0],), lambda x: (torch.ones(int(x.sum())),),
                                  lambda x: (x * torch.tensor([1.0, 2.0, 3.0]),)],
                         ids=["boolean-index", "item", "host-data"])
def test_a_step_that_waits_for_the_device_is_not_captured_and_runs_eagerly(step, emulated):
    graphed = GraphedStep(step, emulated)
    with pytest.warns(UserWarning, match="could not be captured.*waits for the device"):
        first = graphed(torch.ones(3))  # the warm-up runs; the capture that follows fails
    second = graphed(torch.full((3,), 2.0))
    assert emulated.calls == {"warm_up": 1, "capture": 1, "replay": 0} and graphed.eager
    assert torch.equal(first[0], step(torch.ones(3))[0]) and torch.equal(second[0], step(torch.full((3,), 2.0))[0])


# ----- guided generations ------------------------------------------------------------------------------------
def generate(pipe, reference, **config):
    # eager unless asked: the emulation can capture; the attention mask (the tiny weights draw no face to detect)
    config = {"strength": 5000.0, "cuda_graph": False, "mask": "attention", **config}
    return pipe(PROMPT, identities=[Identity(reference, "woman")], num_inference_steps=6, output_type="np",
                generator=torch.Generator().manual_seed(0), rb_guidance=RBGuidanceConfig(**config))


# 6 DDIM steps: with u = 0.6 the first 2 are unguided (one captured, one replayed), the last 4 guided (one captured,
# three replayed); with --rb-interval 2, guided steps 2 and 4 reuse a gradient on a replay of the unguided step
@pytest.mark.parametrize("config, captures, replays", [(dict(), 2, 4),
                                                       (dict(feature_pass="split", gradient_interval=2), 2, 4),
                                                       (dict(feature_pass="separate", recompute="gelu"), 2, 4)],
                         ids=["cfg", "split-interval-2", "separate-gelu"])
def test_replayed_steps_give_the_eager_generation(config, captures, replays, emulated, tiny_pipe,
                                                  astronaut_reference):
    eager = generate(tiny_pipe, astronaut_reference, **config)
    graphed = generate(tiny_pipe, astronaut_reference, cuda_graph=True, **config)
    assert eager.guidance.record.guided_steps >= 2  # so at least one guided step was replayed
    assert emulated.calls == {"warm_up": captures, "capture": captures, "replay": replays}
    assert np.abs(eager.images - generate(tiny_pipe, astronaut_reference, enabled=False).images).max() > 1e-3
    assert np.abs(graphed.images - eager.images).max() < 1e-5
    for name in ("guided_steps", "reused_steps", "skipped_steps"):
        assert getattr(graphed.guidance.record, name) == getattr(eager.guidance.record, name)
    assert torch.equal(graphed.guidance.record.gen_masks, eager.guidance.record.gen_masks)
    assert not graphed.guidance.steps.graphs  # dropped with their memory before the VAE decode


def test_two_identities_and_two_images_replay_as_they_run_eagerly(emulated, tiny_pipe, astronaut_reference):
    def images(**config):
        identities = [Identity(astronaut_reference, "man"), Identity(astronaut_reference, "woman")]
        return tiny_pipe("a man and a woman on the beach", identities=identities, num_inference_steps=5, output_type="np",
                         num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                         rb_guidance=RBGuidanceConfig(strength=5000.0, start=1.0, **config)).images

    eager = images(cuda_graph=False)
    assert np.abs(eager - images(enabled=False)).max() > 1e-3
    assert np.abs(images(cuda_graph=True) - eager).max() < 1e-5


@pytest.mark.parametrize("interval, kept", [(1, {"guided"}), (2, {"plain", "guided"})])
def test_the_unguided_graph_is_kept_only_for_steps_that_reuse_a_gradient(interval, kept, emulated, tiny_pipe,
                                                                          astronaut_reference):
    from tests.guidance.test_rb import guidance_at_step

    config = RBGuidanceConfig(gradient_interval=interval, cuda_graph=True)
    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference, config=config)
    for step, t in enumerate([900, 800, 400, 300]):  # two unguided steps (captured, replayed), two guided
        guidance.noise(latents, torch.tensor(t), step, cond, 7.5)
    assert set(guidance.steps.graphs) == kept
    assert emulated.calls["capture"] == 2


def test_after_sampling_the_record_holds_copies_outside_the_graph_memory(emulated, tiny_pipe, astronaut_reference):
    from tests.guidance.test_rb import guidance_at_step

    guidance, latents, cond = guidance_at_step(tiny_pipe, astronaut_reference,
                                               config=RBGuidanceConfig(start=1.0, cuda_graph=True))
    for step in range(2):
        guidance.noise(latents, torch.tensor(400), step, cond, 7.5)
    recorder = guidance.steps.graphs["guided"].replay.recorder  # the emulated graph: every tensor its capture made
    in_graph = {tensor.untyped_storage().data_ptr() for *_, out in recorder.operations for tensor in tree_leaves(out)
                if isinstance(tensor, torch.Tensor)}
    masks = guidance.record.gen_masks
    guidance.finish()
    record = guidance.record
    assert torch.equal(record.gen_masks, masks) and record.guided_steps == 2
    kept = [record.gen_masks, *record.energies, *record.gradients, record.correspondences[0][0].nearest]
    assert not in_graph & {tensor.untyped_storage().data_ptr() for tensor in kept}
    assert not guidance.steps.graphs and guidance.last_gradient is None


def test_non_finite_gradients_are_counted_on_replayed_steps(emulated, tiny_pipe, astronaut_reference):
    with pytest.warns(UserWarning, match="non-finite gradient on 6 step"):
        out = generate(tiny_pipe, astronaut_reference, strength=float("inf"), start=1.0, cuda_graph=True)
    assert np.isfinite(out.images).all()


def test_a_capture_out_of_memory_after_its_warm_up_counted_a_non_finite_gradient_counts_it_once(
        monkeypatch, emulated, tiny_pipe, astronaut_reference):
    capture = EmulatedGraphs.capture

    def out_of_memory_once(fn, inputs):  # the first guided capture, after its warm-up counted the step
        captured = capture(fn, inputs)
        if emulated.calls["capture"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return captured

    monkeypatch.setattr(EmulatedGraphs, "capture", staticmethod(out_of_memory_once))
    with pytest.warns(UserWarning) as caught:
        out = generate(tiny_pipe, astronaut_reference, strength=float("inf"), start=1.0, cuda_graph=True)
    assert out.guidance.fell_back == {"feature_pass": "split"}
    assert out.guidance.record.skipped_steps == 6  # 6 steps, each counted once
    assert any("non-finite gradient on 6 step" in str(warning.message) for warning in caught)


def test_a_step_whose_capture_failed_runs_eagerly_with_the_eager_fallbacks(monkeypatch, emulated, tiny_pipe,
                                                                          astronaut_reference):
    """A guided capture that fails for another reason leaves eager steps, whose batched cfg pass may still run out
    of memory and go on with the split pass."""
    from tests.conftest import out_of_memory_on_calls

    def no_capture(fn, inputs):
        raise RuntimeError("capture failed (simulated)")

    eager_split = generate(tiny_pipe, astronaut_reference, feature_pass="split", start=1.0)
    monkeypatch.setattr(EmulatedGraphs, "capture", staticmethod(no_capture))
    monkeypatch.setattr(ReferenceGuidance, "cfg_pass", out_of_memory_on_calls(ReferenceGuidance.cfg_pass, first=2))
    with pytest.warns(UserWarning) as caught:
        out = generate(tiny_pipe, astronaut_reference, cuda_graph=True, start=1.0)
    messages = [str(warning.message) for warning in caught]
    assert any(message.startswith("a sampling step could not be captured") for message in messages)
    assert any("use the split pass" in message for message in messages)
    assert out.guidance.fell_back == {"feature_pass": "split"}
    assert np.abs(out.images - eager_split.images).max() < 1e-5


def test_cuda_graphs_on_the_cpu_are_a_clear_error(tiny_pipe, astronaut_reference):
    with pytest.raises(ConfigError, match="need a CUDA device"):
        generate(tiny_pipe, astronaut_reference, cuda_graph=True)


def test_a_scheduler_that_scales_the_model_input_is_a_clear_error(emulated, tiny_pipe, astronaut_reference):
    from diffusers import EulerDiscreteScheduler

    ddim = tiny_pipe.scheduler
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(ddim.config)
    bound = tiny_pipe.bind_identities(PROMPT, [Identity(astronaut_reference, "woman")])
    try:
        with pytest.raises(ConfigError, match="EulerDiscreteScheduler does"):  # refused before sampling starts
            ReferenceGuidance(tiny_pipe, RBGuidanceConfig(cuda_graph=True), bound, 64, 64, 1)
        assert tiny_pipe.scheduler.step_index is None  # probed on a copy
        assert not ReferenceGuidance(tiny_pipe, RBGuidanceConfig(), bound, 64, 64, 1).config.cuda_graph  # left to us
    finally:
        tiny_pipe.scheduler = ddim


# ----- the default: on where the steps can be captured -------------------------------------------------------
def test_left_to_us_the_steps_are_captured_where_they_can_be(emulated, tiny_pipe, astronaut_reference):
    out = generate(tiny_pipe, astronaut_reference, cuda_graph=None)
    assert out.guidance.config.cuda_graph is True and emulated.calls["capture"] == 2
    assert np.abs(out.images - generate(tiny_pipe, astronaut_reference).images).max() < 1e-5


def test_left_to_us_the_steps_run_eagerly_on_the_cpu(tiny_pipe, astronaut_reference):
    out = generate(tiny_pipe, astronaut_reference, cuda_graph=None)  # the real backend: no CUDA here
    assert out.guidance.config.cuda_graph is False


def test_an_offloaded_unet_runs_eagerly_unless_graphs_are_asked_for(emulated, tiny_pipe, astronaut_reference):
    bound = tiny_pipe.bind_identities(PROMPT, [Identity(astronaut_reference, "woman")])
    block = tiny_pipe.unet.down_blocks[0]
    block._hf_hook = object()  # what accelerate's offloading attaches to the modules it moves
    try:
        assert ReferenceGuidance(tiny_pipe, RBGuidanceConfig(), bound, 64, 64, 1).config.cuda_graph is False
        with pytest.raises(ConfigError, match="CPU offloading"):
            ReferenceGuidance(tiny_pipe, RBGuidanceConfig(cuda_graph=True), bound, 64, 64, 1)
    finally:
        del block._hf_hook
    assert emulated.calls["capture"] == 0


def test_asked_for_graphs_an_offloaded_unet_is_told_about_the_offloading(tiny_pipe, astronaut_reference):
    """Not about the CPU its weights wait on between calls: moving the pipeline to CUDA would not help."""
    bound = tiny_pipe.bind_identities(PROMPT, [Identity(astronaut_reference, "woman")])
    block = tiny_pipe.unet.down_blocks[0]
    block._hf_hook = object()
    try:
        with pytest.raises(ConfigError, match="without hooks that move or recast them"):
            ReferenceGuidance(tiny_pipe, RBGuidanceConfig(cuda_graph=True), bound, 64, 64, 1)
    finally:
        del block._hf_hook


@pytest.mark.parametrize("stage, failing, warned, feature_pass, graphs, captured", [
    ("warm_up", {1}, ["eager"], "cfg", False, 0),  # the unguided step's: every step eager
    ("capture", {2}, ["split"], "split", True, 2),  # the guided cfg step's: captured with the split pass
    ("warm_up", {2, 3}, ["split", "eager"], "split", False, 1),  # and the split step's too: eager from there
], ids=["unguided-warm_up", "guided-capture", "guided-twice-warm_up"])
def test_a_capture_that_runs_out_of_memory_goes_on_with_less(stage, failing, warned, feature_pass, graphs, captured,
                                                             monkeypatch, emulated, tiny_pipe, astronaut_reference):
    """In the warm-up (the step runs eagerly, the running mean updated, then memory runs out) or in the capture."""
    eager = generate(tiny_pipe, astronaut_reference, feature_pass="split")
    calls, stage_call = [], getattr(EmulatedGraphs, stage)

    def failing_stage(fn, inputs):
        calls.append(1)
        outputs = stage_call(fn, inputs)
        if len(calls) in failing:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return outputs

    monkeypatch.setattr(EmulatedGraphs, stage, staticmethod(failing_stage))
    with pytest.warns(UserWarning, match="ran out of GPU memory") as caught:
        out = generate(tiny_pipe, astronaut_reference, cuda_graph=True)
    messages = {"eager": EAGER_AFTER_OUT_OF_MEMORY, "split": SPLIT_AFTER_OUT_OF_MEMORY}
    assert [str(warning.message) for warning in caught] == [messages[name] for name in warned]
    assert (out.guidance.config.feature_pass, out.guidance.config.cuda_graph) == (feature_pass, graphs)
    changed = {"feature_pass": feature_pass} if feature_pass != "cfg" else {}
    assert out.guidance.fell_back == {**changed, **({} if graphs else {"cuda_graph": False})}
    assert emulated.calls["capture"] - (stage == "capture") * len(failing) == captured  # the ones that held
    assert np.abs(out.images - eager.images).max() < 1e-5  # the running mean as before each failed step


class HostTensorReads(TorchDispatchMode):
    """Operations given a host (CPU) tensor while the step runs on another device: on a GPU, a copy from the host,
    which waits for the device and cannot be captured."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(value, torch.Tensor) and value.device.type == "cpu" for value in tree_leaves((args, kwargs))):
            self.reads.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch, feature_pass", [("sd15", "cfg"), ("sdxl", "cfg"), ("sdxl", "split"),
                                                ("sdxl", "separate")])
def test_after_the_warm_up_a_step_reads_no_host_tensor(feature_pass, arch, astronaut_reference):
    from tests.guidance.test_rb import guidance_at_step

    pipe = build(arch).to("meta")  # every weight on a device that is not the host; shapes only, no compute
    guidance, latents, cond = guidance_at_step(pipe, astronaut_reference,
                                               config=RBGuidanceConfig(feature_pass=feature_pass))
    latents, t = latents.to("meta"), torch.tensor(400, device="meta")

    def steps() -> list[str]:
        with HostTensorReads() as mode:
            guidance.plain_noise(latents, t, cond, 7.5)
            guidance.guided_step(latents, t, cond, 7.5)
        return mode.reads

    assert steps()  # the warm-up makes the identities' token indicator on the host, once per call
    assert steps() == []  # what a capture would record


def test_every_capture_on_a_device_runs_on_one_side_stream(monkeypatch):
    """cuBLAS keeps a workspace per stream for the life of the process: a stream per capture would leak it."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from omniportrait.guidance import graph

    class FakeStream:
        made = 0

        def __init__(self, device):
            FakeStream.made += 1

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    waited = []
    current = SimpleNamespace(wait_stream=waited.append)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    graph.side_stream.cache_clear()
    try:
        first, second = graph.CudaGraphs(), graph.CudaGraphs()
        for backend in (first, second, first):
            backend.warm_up(lambda x: x + 1, (torch.zeros(1),))
        assert first.stream is second.stream and isinstance(first.stream, FakeStream)
        assert FakeStream.made == 1 and waited == [first.stream] * 3

        def out_of_memory(x):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        with pytest.raises(torch.OutOfMemoryError):
            first.warm_up(out_of_memory, (torch.zeros(1),))
        assert waited == [first.stream] * 4  # the main stream waits for the failed step's queued kernels too
    finally:
        graph.side_stream.cache_clear()


def test_a_step_on_another_device_than_the_current_one_is_ordered_and_captured_there(monkeypatch):
    """``generate --device cuda:1`` leaves cuda:0 the current device: the warm-up must wait for, and be waited for
    by, cuda:1's stream, and the capture (which synchronises the current device first) must run with cuda:1
    current."""
    from contextlib import contextmanager, nullcontext
    from types import SimpleNamespace

    from omniportrait.guidance import graph

    events, current = [], {"device": torch.device("cuda", 0)}

    class FakeStream:
        def __init__(self, device):
            self.device = torch.device(device)

        def wait_stream(self, other):
            events.append(("wait", self.device, other.device))

    @contextmanager
    def on_device(device):
        before, current["device"] = current["device"], torch.device(device)
        try:
            yield
        finally:
            current["device"] = before

    @contextmanager
    def capturing(cuda_graph, stream):
        events.append(("capture", current["device"], stream.device))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device or current["device"]))
    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=None))
    graph.side_stream.cache_clear()
    try:
        second = torch.device("cuda", 1)
        backend, inputs = graph.CudaGraphs(), (SimpleNamespace(device=second),)
        backend.warm_up(lambda x: None, inputs)
        backend.capture(lambda x: None, inputs)
    finally:
        graph.side_stream.cache_clear()
    assert events == [("wait", second, second), ("wait", second, second), ("capture", second, second)]
