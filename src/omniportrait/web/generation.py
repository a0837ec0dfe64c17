"""The web app's generation: its inputs become an ``omniportrait generate`` command line, parsed and run by the
CLI's own functions (:func:`~omniportrait.cli.generate.prepare_job`, :func:`~omniportrait.cli.generate.draw`,
:func:`~omniportrait.cli.generate.write_results`) on the pipeline loaded once at start-up.

So a refused input is refused with the CLI's words, and every result's sidecar holds the same record as the CLI's,
its reproduce line included. Nothing here touches Gradio: the app turns :class:`OmniPortraitError` into messages.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from omniportrait.cli.args import OneLineParser
from omniportrait.errors import ClassWordError, ConfigError, OmniPortraitError
from omniportrait.files import write_json_atomic
from omniportrait.guidance.config import MASK_SOURCES

PIVOTS = ("encoder", "ip-adapter")
IP_ADAPTER_PIVOT = {"sd15": "h94/IP-Adapter/models/ip-adapter-plus-face_sd15.safetensors",
                    "sdxl": "h94/IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors"}
CONTROL_KINDS = ("none", "pose", "canny", "image")
OUTPUT_NAME = "portrait.png"


class RaisingParser(OneLineParser):
    """The CLI's parser, whose refusals raise :class:`ConfigError` with the CLI's line instead of exiting."""

    def exit(self, status: int = 0, message: str | None = None):
        line = (message or "").strip()
        line = re.sub(r"^omniportrait \S+: error: ", "", line)
        raise ConfigError(re.sub(r" \(see omniportrait \S+ --help\)$", "", line) or "refused")


@dataclass(frozen=True)
class ServerSettings:
    """What the server was started with (``omniportrait web`` flags): the model every request uses."""

    preset: str = "sd15"
    base: str | None = None
    arch: str | None = None
    pivot_encoder: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def flags(self) -> list[str]:
        """These settings as ``omniportrait generate`` flags."""
        flags = ["--preset", self.preset, "--device", self.device, "--dtype", self.dtype]
        for name in ("base", "arch", "pivot_encoder"):
            if getattr(self, name) is not None:
                flags += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        return flags


@dataclass
class IdentityInput:
    """One identity photo of the form: the uploaded file, its class word and the face picked (None: largest)."""

    photo: str | None
    class_word: str = ""
    face_index: int | None = None


@dataclass
class WebRequest:
    """Everything the form asks for, in the CLI's units."""

    identities: list[IdentityInput]
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    width: int | None = None
    height: int | None = None
    scheduler: str = "ddim"
    num_images: int = 1
    rb_enabled: bool = True
    rb_strength: float = 8.5
    rb_start: float = 0.6
    pivot: str = "encoder"
    pivot_scale: float = 1.0
    control_kind: str = "none"
    control_image: str | None = None
    control_scale: float = 1.0
    rb_mask: str = "auto"


@dataclass
class WebResult:
    """One request's results: images with their PNG and sidecar files, reference crops, SIM and guidance pictures."""

    images: list = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    sidecars: list[dict] = field(default_factory=list)
    crops: list = field(default_factory=list)
    sim_lines: list[str] = field(default_factory=list)
    guidance_pictures: list[Path] = field(default_factory=list)
    elapsed_s: float = 0.0


def class_words(identities: list[IdentityInput]) -> list[tuple[str, int | None]]:
    """Each identity's (word, occurrence): the N-th use of a word shared by several identities binds its N-th
    occurrence in the prompt; a word used once binds all its occurrences, as the CLI's ``--identity`` does."""
    words = [item.class_word.strip() for item in identities]
    totals = {word.lower(): sum(w.lower() == word.lower() for w in words) for word in words}
    seen: dict[str, int] = {}
    result = []
    for word in words:
        seen[word.lower()] = seen.get(word.lower(), 0) + 1
        result.append((word, seen[word.lower()] if totals[word.lower()] > 1 else None))
    return result


def face_index_flags(identities: list[IdentityInput]) -> list[str]:
    """``--face-index`` for the picked faces; the command line has one for all photos, so several photos with
    different picks are refused with what to do."""
    picks = {item.face_index for item in identities if item.face_index is not None}
    if not picks:
        return []
    if len(picks) > 1 or len(identities) > 1 and any(item.face_index is None for item in identities):
        raise ConfigError("the photos' face picks differ, but one --face-index applies to every photo; pick the "
                          "same face number in each photo or crop a photo to the face you want")
    return ["--face-index", str(picks.pop())]


def identity_flags(identities: list[IdentityInput]) -> list[str]:
    """``--identity PHOTO:WORD[:N]`` per identity photo; with no class word given at all, ``--reference PHOTO``
    per photo, so the CLI finds the prompt's person words; a photo without a word among others is refused."""
    if not identities:
        raise ConfigError("add an identity photo: a photo where one face is clearly visible")
    if not any(item.class_word.strip() for item in identities):
        return [part for item in identities for part in ("--reference", str(item.photo))] + \
            face_index_flags(identities)
    flags = []
    for number, (item, (word, occurrence)) in enumerate(zip(identities, class_words(identities)), start=1):
        if not word:
            raise ClassWordError(f"identity {number} has no class word; write the prompt's word for this person "
                                 "(woman, man, person, …)")
        flags += ["--identity", f"{item.photo}:{word}" + (f":{occurrence}" if occurrence else "")]
    return flags + face_index_flags(identities)


def plugin_flags(request: WebRequest, tiny: bool, arch: str) -> list[str]:
    """The pivot and the control as the CLI's plug-in flags: the IP-Adapter pivot (``tiny`` on the tiny presets, else
    ``h94/IP-Adapter``'s plus-face model) takes each identity's aligned face crop as its image."""
    flags = []
    if request.pivot not in PIVOTS:
        raise ConfigError(f"unknown pivot {request.pivot!r}; choose one of: {', '.join(PIVOTS)}")
    if request.pivot == "ip-adapter":
        flags += ["--ip-adapter", "tiny" if tiny else IP_ADAPTER_PIVOT[arch], "--ip-adapter-scale",
                  str(request.pivot_scale)]
    if request.control_kind not in CONTROL_KINDS:
        raise ConfigError(f"unknown control {request.control_kind!r}; choose one of: {', '.join(CONTROL_KINDS)}")
    if request.control_kind != "none":
        if not request.control_image:
            raise ConfigError(f"the {request.control_kind} control needs an image: upload one or choose none")
        flags += ["--control", f"{request.control_kind}:{request.control_image}:{request.control_scale}"]
    return flags


def command_line(request: WebRequest, settings: ServerSettings, out: Path, tiny: bool, arch: str = "sd15"
                 ) -> list[str]:
    """The ``omniportrait generate`` command line (without the program name) that does what ``request`` asks."""
    present = [item for item in request.identities if item.photo]
    request.identities = present
    argv = ["generate", "--prompt", request.prompt, "--seed", str(int(request.seed)), "--steps",
            str(int(request.steps)), "--guidance-scale", str(request.guidance_scale), "--scheduler",
            request.scheduler, "--num-images", str(int(request.num_images)), "--rb-strength",
            str(request.rb_strength), "--rb-start", str(request.rb_start), *settings.flags()]
    argv += identity_flags(present)
    if request.negative_prompt.strip():
        argv += ["--negative-prompt", request.negative_prompt]
    for flag, value in (("--width", request.width), ("--height", request.height)):
        if value:
            argv += [flag, str(int(value))]
    if not request.rb_enabled:
        argv.append("--no-rb")
    if request.rb_mask not in MASK_SOURCES:
        raise ConfigError(f"unknown mask source {request.rb_mask!r}; choose one of: {', '.join(MASK_SOURCES)}")
    argv += ["--rb-mask", request.rb_mask]
    return argv + plugin_flags(request, tiny, arch) + ["--out", str(out)]


def parse_command(argv: list[str]):
    """``argv`` parsed by the CLI's own parser: the same checks, refusals raised as :class:`ConfigError`."""
    from omniportrait.cli import build_parser

    return build_parser(RaisingParser).parse_args(argv)


def stage_inputs(request: WebRequest, folder: Path) -> None:
    """Copy the uploaded files into ``folder`` under their own names, so the sidecar can name them as the user
    knows them; the request then points at the copies."""
    folder.mkdir(parents=True, exist_ok=True)

    def staged(path: str | None, index: int) -> str | None:
        if not path:
            return path
        source = Path(path)
        target = folder / str(index) / re.sub(r"[^A-Za-z0-9._-]", "_", source.name)
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    for index, item in enumerate(request.identities):
        item.photo = staged(item.photo, index)
    request.control_image = staged(request.control_image, len(request.identities))


def local_names(value, folder: Path):
    """``value`` (a sidecar, in parts) with the session folder's paths cut to file names: the reproduce line
    then names the photos and the output as the user's own files, not the server's temporary copies."""
    if isinstance(value, dict):
        return {key: local_names(item, folder) for key, item in value.items()}
    if isinstance(value, list):
        return [local_names(item, folder) for item in value]
    if isinstance(value, str):
        return re.sub(re.escape(str(folder)) + r"/(?:[^/:]+/)*([^/:]+)", r"\1", value)
    return value


class Generator:
    """The server's pipeline, loaded once, and how one request runs on it."""

    def __init__(self, pipe, settings: ServerSettings):
        from omniportrait.pipelines.loading import get_preset

        self.pipe = pipe
        self.settings = settings
        self.scheduler_config = pipe.scheduler.config
        self.tiny = get_preset(settings.preset).base is None and settings.base is None

    def default_size(self) -> int:
        """The pipeline's native image side (what the CLI uses when no size is given)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def check_class_word(self, prompt: str, word: str) -> str:
        """Empty when ``word`` is bound in ``prompt`` as generation will bind it, else the CLI's message."""
        from omniportrait.identity import locate_class_word

        try:
            locate_class_word(self.pipe.tokenizer, prompt, word.strip())
        except OmniPortraitError as err:
            return str(err)
        return ""

    def run(self, request: WebRequest, folder: Path) -> WebResult:
        """Run ``request`` with its outputs in ``folder`` (a fresh one per request); raises
        :class:`OmniPortraitError` with the CLI's message for bad input and out of GPU memory."""
        from omniportrait.cli.generate import draw, prepare_job, write_results
        from omniportrait.pipelines.schedulers import make_scheduler

        stage_inputs(request, folder / "inputs")
        arch = "sdxl" if hasattr(self.pipe, "text_encoder_2") else "sd15"
        args = parse_command(command_line(request, self.settings, folder / OUTPUT_NAME, self.tiny, arch))
        job = prepare_job(args)
        self.pipe.scheduler = make_scheduler(args.scheduler, self.scheduler_config)
        try:
            output, used, elapsed = draw(args, self.pipe, job)
        finally:
            if args.plugins.ip_adapter is not None and hasattr(self.pipe, "unload_ip_adapter"):
                self.pipe.unload_ip_adapter()  # the next request starts from the bare pipeline
        written = write_results(args, used, job, output, elapsed)
        return self.collect(job, output, written, folder, elapsed)

    def collect(self, job, output, written, folder: Path, elapsed: float) -> WebResult:
        """The results as the page shows them; the sidecars rewritten with the user's file names."""
        from omniportrait.cli.generate import sim_line

        result = WebResult(images=written.images, elapsed_s=elapsed)
        for path, record, sims in zip(written.paths, written.sidecars, written.sims):
            record = local_names(record, folder)
            write_json_atomic(path.with_suffix(".json"), record)
            result.files += [path, path.with_suffix(".json")]
            result.sidecars.append(record)
            result.sim_lines.append("\n".join(sim_line(item, sim, why).strip() for item, (sim, why) in
                                              zip(job.identities, sims)))
        result.crops = [item.reference.aligned(256).image for item in job.identities]
        if output.guidance is not None:
            from omniportrait.guidance.visualize import save_guidance_pictures

            result.guidance_pictures = save_guidance_pictures(output.guidance, output.images, folder / "guidance")
        return result
