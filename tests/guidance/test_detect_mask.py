"""RB-Guidance's mask sources (DESIGN §2 "Mask source"): faces detected in the decoded x̂0 with the real face models,
assigned to identities by attention mass; the attention mask where none is found; ``auto``; the CLI sidecar."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from omniportrait.cli import main
from omniportrait.guidance import RBGuidanceConfig
from omniportrait.guidance.mask import resize_mask
from omniportrait.guidance.mask_source import assign_faces, chosen_source, predicted_original
from omniportrait.guidance.rb import ReferenceGuidance
from omniportrait.guidance.steps import StepRunner
from omniportrait.models.pivot_encoder import PivotIDEncoder
from omniportrait.models.tiny import tiny_pivot_encoder
from omniportrait.pipelines import Identity
from omniportrait.pipelines.plugins import load_tiny_ip_adapter
from omniportrait.pipelines.schedulers import make_scheduler
from tests.conftest import build
from tests.guidance.test_graph import EmulatedGraphs

PROMPT = "a photo of a woman on the beach"
NO_FACE = "detect mask source"


@pytest.fixture(scope="module")
def tiny_pipe():
    return build("sd15")


@pytest.fixture
def decoded_as(monkeypatch, tiny_pipe):
    """Make the pipeline's decode return ``image`` for every row (tiny weights draw no face); counts the decodes."""
    decodes = []

    def patch(image):
        def decode(latents, output_type, generator=None):
            decodes.append(latents.shape)
            return [image] * latents.shape[0]

        monkeypatch.setattr(tiny_pipe, "decode", decode)
        return decodes

    return patch


def generate(pipe, reference, prompt=PROMPT, words=("woman",), width=64, **config):
    config = {"strength": 5000.0, "cuda_graph": False, **config}
    return pipe(prompt, identities=[Identity(reference, word) for word in words], num_inference_steps=6, height=64,
                width=width, output_type="np", generator=torch.Generator().manual_seed(0),
                rb_guidance=RBGuidanceConfig(**config))


def box_in_latents(box, image_size, latent_size) -> tuple[slice, slice]:
    """A face box of an image of ``image_size`` (w, h) as latent rows and columns of ``latent_size`` (h, w)."""
    (width, height), (rows, columns) = image_size, latent_size
    x0, y0, x1, y1 = box
    return (slice(int(y0 * rows / height), int(np.ceil(y1 * rows / height))),
            slice(int(x0 * columns / width), int(np.ceil(x1 * columns / width))))


def test_the_astronauts_face_oval_in_the_decoded_x0_is_the_mask(tiny_pipe, astronaut_reference, decoded_as):
    decodes = decoded_as(astronaut_reference.image)
    out = generate(tiny_pipe, astronaut_reference)
    source, masks = out.guidance.mask_source, out.guidance.record.gen_masks
    assert (source.source, source.detections, len(decodes)) == ("detect", 1, 1)
    assert "faces found in the decoded x̂0 at guided step 1" in source.reason
    rows, columns = box_in_latents(astronaut_reference.face.box, astronaut_reference.image.size, masks.shape[-2:])
    inside = masks[0, 0, rows, columns].sum()
    assert masks.sum() > 0.5 * masks[0, 0, rows, columns].numel()  # the oval fills most of the face box
    assert inside >= 0.9 * masks.sum()  # and little lies outside it (forehead above the detector's box)
    gradient = out.guidance.record.gradients[0]
    outside = ~resize_mask(masks, tuple(gradient.shape[-2:]))[:, :1].expand_as(gradient)
    assert gradient[outside].abs().max() == 0 and gradient[~outside].abs().max() > 0


def side_by_side(image: Image.Image) -> Image.Image:
    double = Image.new("RGB", (image.width * 2, image.height))
    double.paste(image, (0, 0))
    double.paste(image, (image.width, 0))
    return double


@pytest.mark.parametrize("left", [0, 1])
def test_two_faces_go_to_the_identities_whose_class_word_attends_to_them(left, tiny_pipe, astronaut_reference):
    bound = tiny_pipe.bind_identities("a man and a woman", [Identity(astronaut_reference, w) for w in ("man", "woman")])
    guidance = ReferenceGuidance(tiny_pipe, RBGuidanceConfig(mask="detect"), bound, 64, 128, 1)
    maps = torch.zeros(1, 2, 8, 16)
    maps[0, left, :, :8], maps[0, 1 - left, :, 8:] = 1.0, 1.0  # identity `left` attends to the left half
    guidance.store._total, guidance.store._calls = maps, torch.ones(())
    masks = guidance.mask_source.detect([side_by_side(astronaut_reference.image)])
    assert masks.shape == (1, 2, 32, 64) and masks[0, 0].any() and masks[0, 1].any()
    assert not (masks[0, 0] & masks[0, 1]).any()
    assert not masks[0, left, :, 32:].any() and not masks[0, 1 - left, :, :32].any()


def test_assignment_gives_each_face_once_largest_share_first():
    assert assign_faces(np.array([[0.6, 0.5], [0.7, 0.1]])) == [1, 0]
    assert assign_faces(np.array([[0.2, 0.1, 0.9]])) == [2]


def test_no_face_found_runs_the_attention_mask_with_one_warning(tiny_pipe, astronaut_reference, decoded_as):
    decodes = decoded_as(Image.new("RGB", (64, 64), (128, 128, 128)))
    attention = generate(tiny_pipe, astronaut_reference, mask="attention")
    assert attention.guidance.mask_source.reason == "attention: asked for" and not decodes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = generate(tiny_pipe, astronaut_reference, mask="detect", redetect_every=1)
    assert len([w for w in caught if NO_FACE in str(w.message)]) == 1
    assert len(decodes) == fallback.guidance.record.gradient_steps == 4  # tried on each guided step
    source = fallback.guidance.mask_source
    assert source.source == "attention" and source.detections == 0
    assert source.reason == ("detect: asked for; detect: no face found in the decoded x̂0 of image 0 at guided step 1; "
                             "attention mask used")
    assert np.array_equal(fallback.images, attention.images)
    assert torch.equal(fallback.guidance.record.gen_masks, attention.guidance.record.gen_masks)


def test_auto_detects_unless_the_pivot_encoder_was_trained_with_the_localization_loss(tmp_path, tiny_pipe,
                                                                                      astronaut_reference,
                                                                                      decoded_as, monkeypatch):
    assert chosen_source("auto", tiny_pipe.pivot_encoder) == (
        "detect", "auto: the pivot encoder was not trained with the localization loss")
    assert chosen_source("auto", None)[0] == "detect" and chosen_source("attention", None)[0] == "attention"
    encoder = tiny_pivot_encoder(tiny_pipe.pivot_encoder.config.text_width)
    encoder.register_to_config(trained_with_localization_loss=True)
    encoder.save_pretrained(str(tmp_path / "pie"))
    trained = PivotIDEncoder.from_pretrained(str(tmp_path / "pie"))
    assert chosen_source("auto", trained) == ("attention",
                                              "auto: the pivot encoder was trained with the localization loss")
    decodes = decoded_as(astronaut_reference.image)
    monkeypatch.setattr(tiny_pipe, "pivot_encoder", trained)
    out = generate(tiny_pipe, astronaut_reference)
    assert out.guidance.mask_source.source == "attention" and not decodes


def test_detection_repeats_every_n_guided_steps_and_a_first_guided_step_predicts_x0_first(tiny_pipe, decoded_as,
                                                                                         astronaut_reference):
    decodes = decoded_as(astronaut_reference.image)
    out = generate(tiny_pipe, astronaut_reference, start=1.0, redetect_every=2)
    assert out.guidance.record.gradient_steps == 6 and len(decodes) == 3  # guided steps 1, 3 and 5
    assert out.guidance.mask_source.detections == 3 and out.guidance.mask_source.source == "detect"


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp-2m"])
def test_x0_is_what_the_scheduler_predicts(name, tiny_pipe):
    scheduler = make_scheduler(name, tiny_pipe.scheduler.config)
    scheduler.set_timesteps(7)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = scheduler.timesteps[2]
    scheduler._step_index = 2
    if name == "dpmpp-2m":
        expected = scheduler.convert_model_output(noise, sample=latents)
    else:
        expected = scheduler.step(noise, t, latents).pred_original_sample
    torch.testing.assert_close(predicted_original(scheduler, latents, float(t), noise), expected, rtol=1e-4,
                               atol=1e-4)


def test_replayed_guided_steps_read_the_detected_masks_updated_in_place(monkeypatch, tiny_pipe, astronaut_reference,
                                                                         decoded_as):
    monkeypatch.setattr(StepRunner, "graph_backend", EmulatedGraphs)
    EmulatedGraphs.calls.update(warm_up=0, capture=0, replay=0)
    decoded_as(astronaut_reference.image)
    eager = generate(tiny_pipe, astronaut_reference, redetect_every=2)
    graphed = generate(tiny_pipe, astronaut_reference, redetect_every=2, cuda_graph=True)
    assert graphed.guidance.mask_source.detections == 2 and graphed.guidance.mask_source.source == "detect"
    assert EmulatedGraphs.calls["capture"] == 2  # plain and guided once: a new detection recaptures nothing
    assert np.abs(graphed.images - eager.images).max() < 1e-5
    assert torch.equal(graphed.guidance.record.gen_masks, eager.guidance.record.gen_masks)


def test_an_ip_adapter_pivot_takes_each_identitys_face_crop_and_each_gets_its_detected_face(monkeypatch,
                                                                                               astronaut_reference):
    pipe = build("sd15", with_pie=False)
    load_tiny_ip_adapter(pipe)
    given = []
    prepare = pipe.prepare_ip_adapter_image_embeds

    def spy(image, *args):
        given.append(image)
        return prepare(image, *args)

    monkeypatch.setattr(pipe, "prepare_ip_adapter_image_embeds", spy)
    monkeypatch.setattr(pipe, "decode", lambda latents, output_type, generator=None: [
        side_by_side(astronaut_reference.image)])
    out = generate(pipe, astronaut_reference, "a man and a woman", ("man", "woman"), width=128)
    crops = given[0][0]
    assert len(given[0]) == 1 and len(crops) == 2  # one adapter, one image per identity
    assert np.array_equal(np.asarray(crops[1]), np.asarray(astronaut_reference.aligned(224).image))
    source, masks = out.guidance.mask_source, out.guidance.record.gen_masks
    assert source.source == "detect" and source.reason.startswith("auto: no pivot encoder")
    assert masks[0, 0].any() and masks[0, 1].any() and not (masks[0, 0] & masks[0, 1]).any()
    halves = [masks[0, :, :, :32].any(dim=(1, 2)), masks[0, :, :, 32:].any(dim=(1, 2))]
    assert halves[0].sum() == 1 and halves[1].sum() == 1  # each face to one identity


FAST = ["generate", "--preset", "tiny-sd15", "--steps", "4", "--dift-ensemble", "2", "--prompt", "a woman"]


def test_the_cli_sidecar_records_the_mask_source_and_why(tmp_path, astronaut_path, capsys):
    out = tmp_path / "a.png"
    with warnings.catch_warnings():  # the suite ignores this warning (pyproject); here the CLI must print it
        warnings.filterwarnings("default", "RB-Guidance's detect mask source")
        assert main([*FAST, "--reference", astronaut_path, "--out", str(out), "--rb-redetect-every", "2"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())["rb_guidance"]
    assert (meta["mask"], meta["redetect_every"], meta["mask_source"], meta["mask_detections"]) == ("auto", 2,
                                                                                                     "attention", 0)
    assert meta["mask_reason"].startswith("auto: the pivot encoder was not trained with the localization loss; "
                                          "detect: no face found")
    assert capsys.readouterr().err.count("omniportrait: warning: RB-Guidance's detect mask source") == 1
    asked = tmp_path / "b.png"
    assert main([*FAST, "--reference", astronaut_path, "--out", str(asked), "--rb-mask", "attention"]) == 0
    sidecar = json.loads(asked.with_suffix(".json").read_text())
    assert sidecar["rb_guidance"]["mask_source"] == "attention"
    assert sidecar["rb_guidance"]["mask_reason"] == "attention: asked for"
    assert "--rb-mask attention" in " ".join(sidecar["reproduce"])
    assert "warning: RB-Guidance's detect" not in capsys.readouterr().err
