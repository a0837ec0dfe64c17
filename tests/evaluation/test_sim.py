"""SIM (paper §4.2): dlib backend offline, FaceNet module with user weights, and the one-call helper."""

import numpy as np
import pytest
import torch

from omniportrait.evaluation.facenet import FACENET_EMBEDDING_SIZE, InceptionResnetV1, load_facenet
from omniportrait.evaluation.metrics import MetricUnavailable, Sample
from omniportrait.evaluation.metrics.identity import IdentitySimilarity
from omniportrait.evaluation.sim import (
    FaceNetFaceEmbedder,
    MediaPipeLargestFace,
    face_recognition_models_dir,
    identity_similarity,
    load_face_embedder,
)


@pytest.fixture(scope="module")
def dlib_sim():
    metric = IdentitySimilarity("dlib")
    metric.load()
    return metric


def sample(image, reference, key="astronaut"):
    return Sample(image=image, prompt="", reference_key=key, reference_image=reference, reference_face=reference)


def test_mirror_beats_another_person_beats_no_face(dlib_sim, astronaut_image, mirrored_astronaut, cameraman, blank):
    mirror, other, empty = dlib_sim.score([sample(mirrored_astronaut, astronaut_image),
                                           sample(cameraman, astronaut_image),
                                           sample(blank, astronaut_image)])
    assert mirror["sim"] > 95.0  # the same face, flipped
    assert mirror["sim"] > other["sim"]
    assert empty == {"sim": 0.0, "face_rate": 0.0}
    assert mirror["face_rate"] == other["face_rate"] == 100.0


def test_resized_copy_keeps_identity(dlib_sim, astronaut_image, cameraman):
    small, other = dlib_sim.score([sample(astronaut_image.resize((200, 200)), astronaut_image),
                                   sample(cameraman, astronaut_image)])
    assert small["sim"] > other["sim"]


def test_identity_similarity_helper(astronaut_image, mirrored_astronaut, blank, astronaut_reference):
    value = identity_similarity(astronaut_image, mirrored_astronaut)
    assert 0.95 < value <= 1.0
    assert identity_similarity(astronaut_reference, mirrored_astronaut) == pytest.approx(value)
    assert identity_similarity(astronaut_image, blank) is None
    assert identity_similarity(blank, astronaut_image) is None


def test_model_files_are_found_without_importing_the_package():
    folder = face_recognition_models_dir()
    assert (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file()
    assert (folder / "shape_predictor_5_face_landmarks.dat").is_file()


def test_facenet_without_weights_is_unavailable():
    with pytest.raises(MetricUnavailable, match="--facenet-weights"):
        load_face_embedder("facenet")
    assert type(load_face_embedder("auto")).__name__ == "DlibFaceEmbedder"


def test_facenet_layer_shapes_match_the_vggface2_state_dict():
    state = InceptionResnetV1().state_dict()
    expected = {"conv2d_1a.conv.weight": (32, 3, 3, 3), "conv2d_4b.conv.weight": (256, 192, 3, 3),
                "repeat_1.4.branch2.2.conv.weight": (32, 32, 3, 3), "mixed_6a.branch1.2.conv.weight": (256, 192, 3, 3),
                "repeat_2.9.branch1.1.conv.weight": (128, 128, 1, 7), "mixed_7a.branch2.2.bn.running_var": (256,),
                "repeat_3.4.conv2d.weight": (1792, 384, 1, 1), "block8.branch1.2.conv.weight": (192, 192, 3, 1),
                "last_linear.weight": (512, 1792), "last_bn.running_mean": (512,)}
    assert {key: tuple(state[key].shape) for key in expected} == expected
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    parameters = sum(v.numel() for k, v in state.items() if not k.endswith(buffers))
    assert parameters == 23_482_624


@pytest.fixture(scope="module")
def facenet_weights(tmp_path_factory):
    """A state dict saved the way the VGGFace2 file is: every layer plus the 8631-class ``logits`` head."""
    torch.manual_seed(0)
    state = InceptionResnetV1().state_dict()
    state["logits.weight"] = torch.randn(8631, FACENET_EMBEDDING_SIZE)
    state["logits.bias"] = torch.zeros(8631)
    path = tmp_path_factory.mktemp("facenet") / "vggface2.pt"
    torch.save(state, path)
    return path


def test_facenet_loads_user_weights_and_embeds_faces(facenet_weights, astronaut_image, cameraman, blank):
    finder = MediaPipeLargestFace()
    embedder = FaceNetFaceEmbedder(facenet_weights, find_face=finder)
    same = embedder.embed(astronaut_image)
    assert same.shape == (FACENET_EMBEDDING_SIZE,)
    assert np.linalg.norm(same) == pytest.approx(1.0)
    assert embedder.embed(blank) is None
    again = embedder.embed(astronaut_image)
    other = embedder.embed(cameraman)
    assert float(same @ again) == pytest.approx(1.0)
    assert float(same @ again) > float(same @ other)


def test_facenet_weights_are_read_weights_only(tmp_path):
    path = tmp_path / "whole-module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict: must not be unpickled
    with pytest.raises(MetricUnavailable, match="weights-only"):
        load_face_embedder("facenet", str(path))


def test_facenet_rejects_a_state_dict_of_another_network(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(MetricUnavailable, match="not an InceptionResnetV1"):
        load_face_embedder("auto", str(path))


def test_facenet_accepts_files_without_batch_norm_counters(facenet_weights, tmp_path):
    state = {k: v for k, v in torch.load(facenet_weights, weights_only=True).items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    model = load_facenet(path)
    assert torch.equal(model.last_linear.weight, state["last_linear.weight"])
