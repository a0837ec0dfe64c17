"""The app driven by ``gradio_client`` as a script would: ``/generate`` returns an image and the CLI's sidecar; bad
input returns the CLI's message and the server answers the next call."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniportrait.pipelines import OmniPortraitSDPipeline
from omniportrait.web.generation import parse_command

from .conftest import ASTRONAUT

STEPS = 3
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    """A client that downloads results into this test's temporary folder."""
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def generate(client, photo, prompt: str, **options):
    """One ``/generate`` call (few steps, one guidance-feature noise) with a bounded wait."""
    from gradio_client import handle_file

    job = client.submit(handle_file(str(photo)), prompt, steps=STEPS, api_name="/generate", **options)
    return job.result(timeout=TIMEOUT_S)


def refusal(client, photo, prompt: str) -> str:
    """The message ``/generate`` answers bad input with."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        generate(client, photo, prompt)
    return str(caught.value)


def assert_serves(client) -> dict:
    """A good request still works: the image (64² on the tiny preset) and its sidecar, as the CLI writes them."""
    gallery, crops, sims, guidance, files, sidecar = generate(client, ASTRONAUT, "a woman on the beach")
    image = Image.open(gallery[0]["image"])
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    assert Image.open(crops[0]["image"]).size == (256, 256)
    assert "SIM to 'woman' reference" in sims
    names = sorted(Path(path).name for path in files)
    assert names == ["portrait.json", "portrait.png"]
    assert {Path(item["image"]).name for item in guidance} == {"mgen-0.png", "mref-0.png", "matches-0.png"}
    written = json.loads(Path(next(p for p in files if p.endswith(".json"))).read_text())
    assert written == sidecar
    return sidecar


def test_generate_returns_the_image_and_the_clis_sidecar(client, monkeypatch):
    sidecar = assert_serves(client)
    assert sidecar["parameters"]["steps"] == STEPS and sidecar["identities"][0]["class_word"] == "woman"
    reproduce = sidecar["reproduce"]
    assert reproduce[:2] == ["omniportrait", "generate"]
    assert reproduce[reproduce.index("--reference") + 1] == "astronaut.jpg"  # the user's file, not a temp copy
    assert reproduce[reproduce.index("--out") + 1] == "portrait.png"
    monkeypatch.chdir(ASTRONAUT.parent)  # where the user's photo is, the CLI parses it back to the same request
    args = parse_command(reproduce[1:])
    assert args.prompt == "a woman on the beach" and args.steps == STEPS and args.preset == "tiny-sd15"


def test_bad_input_is_one_message_and_the_server_keeps_serving(client, tmp_path):
    blank = tmp_path / "wall.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(blank)
    junk = tmp_path / "broken.jpg"
    junk.write_bytes(b"this is not a picture")
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(huge)  # 81 megapixels in a few kilobytes
    assert "no face found in" in refusal(client, blank, "a woman on the beach")
    assert "broken.jpg" in refusal(client, junk, "a woman on the beach")
    assert "9000×9000" in refusal(client, huge, "a woman on the beach")
    assert refusal(client, ASTRONAUT, "a cat on the beach") == (
        "the prompt names 0 person word(s) for 1 --reference photo(s); write one per person (e.g. 'a woman ...') "
        "or use --identity PHOTO:WORD")
    assert "class word 'man' is not in the prompt" in refusal_with(client, "a woman on the beach", class_word="man")
    assert_serves(client)


def refusal_with(client, prompt: str, **options) -> str:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        client.submit(handle_file(str(ASTRONAUT)), prompt, steps=STEPS, api_name="/generate",
                      **options).result(timeout=TIMEOUT_S)
    return str(caught.value)


def test_out_of_gpu_memory_is_the_clis_line(client, monkeypatch):
    def run_out(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(OmniPortraitSDPipeline, "__call__", run_out)  # the server runs in this process
    assert refusal(client, ASTRONAUT, "a woman on the beach") == \
        "the GPU ran out of memory; try a smaller --width/--height"
    monkeypatch.undo()
    assert_serves(client)


def test_every_event_has_an_api_name(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/generate", "/check_prompt", "/faces_0", "/faces_1", "/add_person", "/randomise_seed"} <= set(endpoints)
    first_two = [item["component"] for item in endpoints["/generate"]["parameters"][:2]]
    assert first_two == ["File", "Textbox"]


def test_the_ip_adapter_pivot_and_the_mask_source_reach_the_run(client):
    """The IP-Adapter pivot takes the identity's face crop (no image prompt of its own); the mask source asked for
    is the one that ran."""
    *_, sidecar = generate(client, ASTRONAUT, "a woman on the beach", pivot="ip-adapter", pivot_scale=0.5,
                           rb_mask="attention")
    adapter = sidecar["plugins"]["ip_adapter"]
    assert adapter["source"] == "tiny" and adapter["scale"] == 0.5 and adapter["image_sha256"] is None
    assert sidecar["rb_guidance"]["mask"] == "attention" and sidecar["rb_guidance"]["mask_source"] == "attention"
    assert "--rb-mask" in sidecar["reproduce"]


def two_faces(tmp_path) -> Path:
    """The astronaut photo beside its mirror image: two faces, the left one picked as face 0 or 1."""
    photo = Image.open(ASTRONAUT).convert("RGB")
    pair = Image.new("RGB", (photo.width * 2, photo.height))
    pair.paste(photo, (0, 0))
    pair.paste(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (photo.width, 0))
    path = tmp_path / "pair.png"
    pair.save(path)
    return path


def test_two_identities_a_picked_face_and_a_pose_control_reach_the_run(client, tmp_path):
    from gradio_client import handle_file

    pair = two_faces(tmp_path)
    preview, picker, word = client.predict(handle_file(str(pair)), "a woman and a man", "", api_name="/faces_0")
    assert len(picker["choices"]) == 2 and picker["visible"] and word == "woman"
    *_, sidecar = generate(client, pair, "a woman and a man on the beach", class_word="woman", face=1,
                           photo_2=handle_file(str(pair)), class_word_2="man", face_2=1, control="pose",
                           control_image=handle_file(str(ASTRONAUT)), control_scale=0.7)
    assert [item["class_word"] for item in sidecar["identities"]] == ["woman", "man"]
    assert [item["face_index"] for item in sidecar["identities"]] == [1, 1]
    (control,) = sidecar["plugins"]["controls"]
    assert control["kind"] == "pose" and control["scale"] == 0.7
