"""The real-architecture replay check (benchmarks/check_graph_replay.py), run on the tiny pipelines."""

from benchmarks.check_graph_replay import STEP_INDICES, replay_differences
from omniportrait.attention import SamplingAttnProcessor
from omniportrait.guidance.rb import ReferenceGuidance
from tests.guidance.test_graph import EmulatedGraphs


def test_replayed_steps_match_the_eager_ones(monkeypatch, tiny_pipe, astronaut_reference):
    monkeypatch.setattr(ReferenceGuidance, "graph_backend", EmulatedGraphs)
    attended, attend = [], SamplingAttnProcessor.attend
    monkeypatch.setattr(SamplingAttnProcessor, "attend", lambda *args: attended.append(1) or attend(*args))
    differences = replay_differences(tiny_pipe, astronaut_reference, "cfg", 64)
    assert attended  # the steps ran with a generation's attention processors
    assert len(differences) == len(STEP_INDICES)
    for index, (noise, gradient, scale) in zip(STEP_INDICES, differences):
        guided = tiny_pipe.scheduler.timesteps[index] <= 600
        assert noise < 1e-6 and gradient <= 1e-6 * scale and (scale > 0) == guided
