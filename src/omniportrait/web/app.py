"""The Gradio app: identity photos and a prompt in; portraits, reference crops, SIM, guidance pictures and the
PNG + JSON sidecar files out. :func:`build_demo` wires the page to :class:`~omniportrait.web.generation.Generator`,
which runs the CLI's own functions on the pipeline loaded once at start-up.

Offline by construction: analytics off, system fonts (no CDN), no server-side rendering. Every request writes only
into its session's temporary folder, removed when the session ends and when the server stops.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def private_upload_folder() -> None:
    """Gradio's uploads and cache in a folder of this process's own, removed at exit: Gradio deletes its cache when a
    server stops (``delete_cache``), so two servers sharing the default ``/tmp/gradio`` would delete each other's
    uploads. A folder the user names with ``GRADIO_TEMP_DIR`` is kept."""
    if "GRADIO_TEMP_DIR" not in os.environ:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="omniportrait-gradio-")
        os.environ["GRADIO_TEMP_DIR"] = folder
        atexit.register(shutil.rmtree, folder, True)


private_upload_folder()

import atexit  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from omniportrait.errors import OmniPortraitError  # noqa: E402
from omniportrait.guidance.config import MASK_SOURCES  # noqa: E402
from omniportrait.pipelines.schedulers import SCHEDULERS  # noqa: E402
from omniportrait.values import SEED_MAX  # noqa: E402
from omniportrait.web.generation import (  # noqa: E402
    CONTROL_KINDS,
    PIVOTS,
    Generator,
    IdentityInput,
    ServerSettings,
    WebRequest,
)

MAX_IDENTITIES = 2
FACE_PREVIEW_SIDE = 512
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
EXAMPLE_PROMPTS = 3  # how many of the paper's Table 3 prompts the examples show


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts: nothing is fetched from a font CDN."""
    return gr.themes.Default(font=[gr.themes.Font("system-ui"), "sans-serif"],
                             font_mono=[gr.themes.Font("ui-monospace"), "monospace"])


class Sessions:
    """One temporary folder per browser session (and one per request inside it), removed when the session ends
    and, all of them, when the server stops."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="omniportrait-web-"))
        self.counter = itertools.count()
        atexit.register(self.close)

    def request_folder(self, request: gr.Request | None) -> Path:
        session = getattr(request, "session_hash", None) or "anonymous"
        folder = self.root / session / f"request-{next(self.counter)}"
        folder.mkdir(parents=True)
        return folder

    def end(self, request: gr.Request | None) -> None:
        session = getattr(request, "session_hash", None)
        if session:
            shutil.rmtree(self.root / session, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def face_preview(path: str | None):
    """(photo scaled for the page, [(box, label)]) of every face found, and the face picker's choices; a photo
    that cannot be used raises :class:`OmniPortraitError` with the CLI's message."""
    from omniportrait.faces import prepare_reference

    reference = prepare_reference(path)
    image = reference.image
    scale = min(1.0, FACE_PREVIEW_SIDE / max(image.size))
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    boxes = [(tuple(int(v * scale) for v in face.box), f"face {index}") for index, face in enumerate(reference.faces)]
    choices = [(f"face {index}" + (" (largest)" if index == 0 else ""), index) for index in range(len(boxes))]
    return (shown, boxes), choices


def on_photo(path: str | None, prompt: str, word: str):
    """Upload of an identity photo: its faces boxed, the picker shown when there are several, the class word
    prefilled from the prompt. A bad photo is one warning; generation would refuse it with the same line."""
    hidden = gr.update(value=None, visible=False)
    if not path:
        return hidden, gr.update(choices=[], value=None, visible=False), word
    try:
        preview, choices = face_preview(path)
    except OmniPortraitError as err:
        gr.Warning(str(err))
        return hidden, gr.update(choices=[], value=None, visible=False), word
    picker = gr.update(choices=choices, value=0, visible=len(choices) > 1)
    return gr.update(value=preview, visible=True), picker, word or prompt_word(prompt, 0)


def prompt_word(prompt: str, index: int) -> str:
    """The ``index``-th person word of ``prompt`` ("woman", "man", …), or empty."""
    from omniportrait.text import find_person_nouns

    nouns = find_person_nouns(prompt or "")
    return nouns[index].word if index < len(nouns) else ""


def build_demo(pipe, preset: str = "sd15", base: str | None = None, arch: str | None = None,
               pivot_encoder: str | None = None, device: str = "auto", dtype: str = "auto") -> gr.Blocks:
    """The app on ``pipe`` (loaded once by the caller); the other arguments are the server's model flags, which
    every result's reproduce line repeats."""
    generator = Generator(pipe, ServerSettings(preset, base, arch, pivot_encoder, device, dtype))
    sessions = Sessions()
    with gr.Blocks(title="OmniPortrait", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown("## OmniPortrait\nA photo of a face and a prompt naming the person (woman, man, …) give a new "
                    "portrait of that person.")
        with gr.Row():
            with gr.Column():
                form = input_panel(generator)
            with gr.Column():
                shown = output_panel()
        wire(demo, generator, sessions, form, shown)
        add_examples(form)
    demo.omniportrait_sessions = sessions
    return demo


def identity_slot(index: int) -> dict:
    """One identity's photo, faces found, face picker and class word."""
    with gr.Group(visible=index == 0) as group:
        photo = gr.File(label=f"Identity photo {index + 1}", file_types=["image"], type="filepath", height=120)
        faces = gr.AnnotatedImage(label="Faces found", visible=False, height=260)
        with gr.Row():
            word = gr.Textbox("", label="Class word", placeholder="woman, man, person, …", scale=2)
            pick = gr.Dropdown(label="Face", choices=[], value=None, visible=False, scale=1,
                               allow_custom_value=True)  # an API caller picks by number; the CLI checks it
    return dict(group=group, photo=photo, faces=faces, word=word, pick=pick)


def input_panel(generator: Generator) -> dict:
    """The form: identities, prompt with its live check, Advanced, Control and the Generate button."""
    slots = [identity_slot(index) for index in range(MAX_IDENTITIES)]
    form = dict(slots=slots, add=gr.Button("Add another person", size="sm"))
    form["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder="a woman riding a bicycle, with sweat on face")
    form["check"] = gr.Markdown()
    form["negative"] = gr.Textbox("", label="Negative prompt")
    side = generator.default_size()
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            form["steps"] = gr.Slider(1, 150, value=50, step=1, label="Steps")
            form["guidance_scale"] = gr.Slider(0, 30, value=7.5, step=0.5, label="Guidance scale")
        with gr.Row():
            form["seed"] = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX, label="Seed")
            form["randomise"] = gr.Button("Randomise seed", size="sm")
            form["num_images"] = gr.Slider(1, 4, value=1, step=1, label="Images")
        with gr.Row():
            form["width"] = gr.Number(value=side, precision=0, label="Width")
            form["height"] = gr.Number(value=side, precision=0, label="Height")
            form["scheduler"] = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler")
        with gr.Row():
            form["rb"] = gr.Checkbox(value=True, label="RB-Guidance")
            form["strength"] = gr.Slider(0, 100, value=8.5, step=0.5, label="RB strength p")
            form["start"] = gr.Slider(0, 1, value=0.6, step=0.05, label="RB start u")
            form["mask"] = gr.Radio(list(MASK_SOURCES), value="auto", label="RB mask",
                                    info="attention: eq. 6; detect: the face found in the image; auto: detect "
                                         "unless the encoder was trained with the localization loss")
        with gr.Row():
            form["pivot"] = gr.Radio(list(PIVOTS), value="encoder", label="Pivot")
            form["pivot_scale"] = gr.Slider(0, 2, value=1.0, step=0.05, label="IP-Adapter scale")
    with gr.Accordion("Control (ControlNet)", open=False):
        form["control_kind"] = gr.Radio(list(CONTROL_KINDS), value="none", label="Control",
                                        info="pose: the skeleton of a photo's person; canny: its edges; "
                                             "image: a control image as is")
        form["control_image"] = gr.File(label="Control photo", file_types=["image"], type="filepath", height=100)
        form["control_scale"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale")
    form["generate"] = gr.Button("Generate", variant="primary")
    return form


def output_panel() -> dict:
    """Results, reference crops beside them, SIM, guidance pictures (collapsed) and the files to download."""
    shown = {}
    with gr.Row():
        shown["crops"] = gr.Gallery(label="Reference crop", columns=1, height=280, scale=1, format="png")
        shown["gallery"] = gr.Gallery(label="Results", columns=2, height=280, scale=2, format="png")
    shown["sim"] = gr.Markdown(label="SIM")
    with gr.Accordion("Guidance pictures (M_gen, M_ref, matches)", open=False):
        shown["guidance"] = gr.Gallery(label="Guidance", columns=3, height=220)
    shown["files"] = gr.File(label="PNG and JSON sidecar", file_count="multiple")
    with gr.Accordion("Sidecar", open=False):
        shown["sidecar"] = gr.JSON(label="Sidecar")
    return shown


def generate_inputs(form: dict) -> list:
    """The inputs of ``/generate``, in its API order: the first identity photo and the prompt come first."""
    first, second = form["slots"]
    return [first["photo"], form["prompt"], first["word"], first["pick"], second["photo"], second["word"],
            second["pick"], form["negative"], form["steps"], form["guidance_scale"], form["seed"],
            form["num_images"], form["width"], form["height"], form["scheduler"], form["rb"], form["strength"],
            form["start"], form["pivot"], form["pivot_scale"], form["control_kind"], form["control_image"],
            form["control_scale"], form["mask"]]


def generation_handler(generator: Generator, sessions: Sessions):
    """The ``/generate`` event: one request, run in its own folder; bad input becomes one message on the page.
    Its parameters (names and defaults) are what ``gradio_client`` shows; see :func:`generate_inputs`."""

    def generate(photo, prompt, class_word="", face=None, photo_2=None, class_word_2="", face_2=None,
                 negative_prompt="", steps=50, guidance_scale=7.5, seed=0, num_images=1, width=None, height=None,
                 scheduler="ddim", rb_guidance=True, rb_strength=8.5, rb_start=0.6, pivot="encoder",
                 pivot_scale=1.0, control="none", control_image=None, control_scale=1.0, rb_mask="auto",
                 request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="checking the inputs")
        identities = [IdentityInput(photo, class_word or "", face), IdentityInput(photo_2, class_word_2 or "", face_2)]
        asked = WebRequest(identities, prompt or "", negative_prompt or "", steps, guidance_scale, seed or 0, width,
                           height, scheduler, num_images, rb_guidance, rb_strength, rb_start, pivot, pivot_scale,
                           control, control_image, control_scale, rb_mask)
        try:
            result = generator.run(asked, sessions.request_folder(request))
        except OmniPortraitError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # a library failure: say it, keep serving
            raise gr.Error(f"generation failed: {type(err).__name__}: {err}") from None
        return shown_result(result)

    return generate


def shown_result(result) -> tuple:
    """A :class:`~omniportrait.web.generation.WebResult` as the output panel's values (see :func:`wire`)."""
    captions = [f"seed {record['parameters']['seed']}" for record in result.sidecars]
    sims = "\n\n".join(f"**image {index}** · {lines}" for index, lines in enumerate(result.sim_lines))
    return (list(zip(result.images, captions)), result.crops, sims, [str(p) for p in result.guidance_pictures],
            [str(p) for p in result.files], result.sidecars[0] if result.sidecars else None)


def wire(demo: gr.Blocks, generator: Generator, sessions: Sessions, form: dict, shown: dict) -> None:
    """Every event, each with an ``api_name``; ``/generate`` queues one at a time."""
    slots = form["slots"]
    outputs = [shown[name] for name in ("gallery", "crops", "sim", "guidance", "files", "sidecar")]
    form["generate"].click(generation_handler(generator, sessions), generate_inputs(form), outputs,
                           api_name="generate", concurrency_limit=1, concurrency_id="model")
    for index, slot in enumerate(slots):
        slot["photo"].change(on_photo, [slot["photo"], form["prompt"], slot["word"]],
                             [slot["faces"], slot["pick"], slot["word"]], api_name=f"faces_{index}")
    form["add"].click(lambda: (gr.update(visible=True), gr.update(visible=False)), None,
                      [slots[1]["group"], form["add"]], api_name="add_person")
    form["randomise"].click(lambda: random.randint(0, 2**32 - 1), None, form["seed"], api_name="randomise_seed")
    check_inputs = [form["prompt"]] + [slot[name] for slot in slots for name in ("photo", "word")]
    check_outputs = [form["check"]] + [slot["word"] for slot in slots]
    gr.on([form["prompt"].change, slots[0]["word"].change, slots[1]["word"].change], prompt_checker(generator),
          check_inputs, check_outputs, api_name="check_prompt", queue=False)
    demo.unload(sessions.end)


def prompt_checker(generator: Generator):
    """The live check: each identity's class word (prefilled from the prompt when empty) must be in the prompt."""

    def check(prompt, *photo_words):
        lines, words = [], []
        for index, (photo, word) in enumerate(zip(photo_words[::2], photo_words[1::2])):
            word = (word or "").strip() or (prompt_word(prompt, index) if photo or index == 0 else "")
            words.append(word)
            if not photo and index > 0:
                continue
            problem = generator.check_class_word(prompt or "", word) if word else \
                "write the person's class word (woman, man, person, …) in the prompt"
            lines.append(f"✗ identity {index + 1}: {problem}" if problem else
                         f"✓ identity {index + 1}: '{word}' is in the prompt")
        return ["\n\n".join(lines), *words]

    return check


def add_examples(form: dict) -> None:
    """The repository's example photos with a few of the paper's Table 3 prompts (not cached)."""
    from omniportrait.evaluation.prompts import table3_prompts

    photos = sorted(p for p in EXAMPLES.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}) \
        if EXAMPLES.is_dir() else []
    if not photos:
        return
    prompts = [item.render("woman") for item in table3_prompts()[:: max(1, len(table3_prompts()) // 4)]]
    rows = [[str(photo), prompt, "woman"] for photo in photos for prompt in prompts[:EXAMPLE_PROMPTS]]
    first = form["slots"][0]
    gr.Examples(rows, [first["photo"], form["prompt"], first["word"]], cache_examples=False,
                label="Examples (Table 3 prompts)")


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Serve ``demo`` offline-safe (system fonts, no SSR, queue of one), removing the session folders at the end;
    ``block=False`` returns at once (tests), leaving ``demo.close()`` to the caller."""
    demo.queue(default_concurrency_limit=1)
    allowed = [str(EXAMPLES)] if EXAMPLES.is_dir() else []
    try:
        demo.launch(server_name=host, server_port=port, share=share, theme=theme(), ssr_mode=False,
                    prevent_thread_lock=not block, allowed_paths=allowed, quiet=not block, show_error=True)
    finally:
        if block:
            demo.omniportrait_sessions.close()
    return demo
