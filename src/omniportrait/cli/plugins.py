"""The plug-in flags of ``omniportrait generate``: ControlNets, an IP-Adapter, LoRAs (docs/plug-and-play.md).

Every flag is checked while the command line is parsed (kinds, scales, files); :func:`plugin_request` checks how
they go together before any model is loaded, and the control images are made from the photos before loading too,
so a photo with no person is one line, not a failure after minutes of loading.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from omniportrait.cli.args import checked, existing_file, number, output_folder
from omniportrait.control.spec import ControlSpec, parse_control
from omniportrait.errors import ConfigError
from omniportrait.pipelines.plugins import (
    DEFAULT_CONTROLNETS,
    TINY,
    ControlNetChoice,
    IPAdapterSpec,
    LoraSpec,
    check_choices_used,
    check_ip_adapter_source,
    controlnet_source,
    file_sha256,
    parse_controlnet_choice,
    parse_lora,
)
from omniportrait.values import Range

IP_ADAPTER_SCALE = Range(0, 100, note="1 is the adapter's full strength, 0 turns it off")


def check_control(value: str) -> None:
    """``--control KIND:IMAGE[:SCALE]``: well formed and naming an existing image file."""
    from omniportrait.files import check_input_file

    try:
        check_input_file(parse_control(value).image)
    except ConfigError as err:  # argparse names the flag already
        raise ConfigError(str(err).removeprefix("--control ")) from None


def add_plugin_arguments(p) -> None:
    """The plug-in flags, in their own help group."""
    defaults = ", ".join(f"{arch} {kind} {repo}" for arch, kinds in DEFAULT_CONTROLNETS.items()
                         for kind, repo in kinds.items())
    g = p.add_argument_group("Plug and play (docs/plug-and-play.md)")
    g.add_argument("--control", action="append", default=[], metavar="KIND:IMAGE[:SCALE]",
                   type=checked(check_control, "control"),
                   help="a ControlNet control made from IMAGE: pose (its people's skeleton), canny (its edges) or "
                        "image (a control image as is); SCALE is the conditioning scale (default 1); repeatable")
    g.add_argument("--controlnet", action="append", default=[], metavar="KIND=HUB_ID_OR_PATH",
                   type=checked(parse_controlnet_choice, "controlnet"),
                   help=f"the ControlNet for a kind: hub id, folder or .safetensors (defaults: {defaults}; tiny "
                        "presets: tiny random ones; image has none)")
    g.add_argument("--save-control", default=None, type=output_folder(), metavar="DIR",
                   help="write the control images as control-<i>-<kind>.png")
    g.add_argument("--ip-adapter", default=None, metavar="HUB_ID_OR_FILE", type=checked(check_ip_adapter_source,
                                                                                           "ip-adapter"),
                   help="an IP-Adapter: owner/name (h94/IP-Adapter's layout), owner/name/SUBFOLDER/FILE, a local "
                        ".safetensors/.bin, or tiny (random, tiny presets)")
    g.add_argument("--ip-adapter-scale", type=number(IP_ADAPTER_SCALE), default=None,
                   help="the IP-Adapter's weight (default 1)")
    g.add_argument("--ip-adapter-image", default=None, metavar="IMG", type=existing_file(),
                   help="the IP-Adapter's image prompt (a style, a scene, …)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", type=checked(parse_lora, "lora"),
                   help="a LoRA .safetensors file and its weight (default 1); repeatable")


@dataclass
class PluginRequest:
    """What the plug-in flags ask for, parsed and checked together."""

    controls: list[ControlSpec] = field(default_factory=list)
    choices: list[ControlNetChoice] = field(default_factory=list)
    ip_adapter: IPAdapterSpec | None = None
    loras: list[LoraSpec] = field(default_factory=list)
    save_control: str | None = None
    control_images: list = field(default_factory=list)
    controlnet_sources: list[str] = field(default_factory=list)


def ip_adapter_from_args(args) -> IPAdapterSpec | None:
    """The IP-Adapter asked for; its scale and image without an adapter are refused, as is an adapter with neither
    an image nor identities (without ``--ip-adapter-image`` each identity's aligned face crop is its image)."""
    if args.ip_adapter is None:
        for flag, value in (("--ip-adapter-scale", args.ip_adapter_scale), ("--ip-adapter-image",
                                                                            args.ip_adapter_image)):
            if value is not None:
                raise ConfigError(f"{flag} needs --ip-adapter HUB_ID_OR_FILE")
        return None
    if args.ip_adapter_image is None and not (args.reference or args.identity):
        raise ConfigError("--ip-adapter needs --ip-adapter-image IMG, the image prompt, or identities (--reference, "
                          "--identity) whose face crops become its images")
    scale = 1.0 if args.ip_adapter_scale is None else args.ip_adapter_scale
    return IPAdapterSpec(args.ip_adapter, scale, None if args.ip_adapter_image is None else Path(args.ip_adapter_image))


def plugin_request(args, arch: str, tiny: bool) -> PluginRequest:
    """The plug-ins of ``args``, checked together before loading: every control has a ControlNet, every
    ``--controlnet`` a control, ``--save-control`` something to save."""
    controls = [parse_control(value) for value in args.control]
    choices = [parse_controlnet_choice(value) for value in args.controlnet]
    check_choices_used(controls, choices)
    if args.save_control is not None and not controls:
        raise ConfigError("--save-control writes the control images; add --control KIND:IMAGE")
    sources = [controlnet_source(spec.kind, arch, choices, tiny) for spec in controls]
    return PluginRequest(controls, choices, ip_adapter_from_args(args), [parse_lora(v) for v in args.lora],
                         args.save_control, controlnet_sources=sources)


def make_control_images(request: PluginRequest, width: int, height: int) -> None:
    """Each control's image at the generation size (a photo with no person fails here, before loading)."""
    from omniportrait.control.make import make_control_image

    request.control_images = [make_control_image(spec, size=(width, height)) for spec in request.controls]


def attach_plugins(pipe, request: PluginRequest, arch: str, tiny: bool):
    """``pipe`` with the ControlNets (a ControlNet pipeline sharing its components), LoRAs and IP-Adapter."""
    from omniportrait.pipelines.plugins import load_controlnets, load_ip_adapter, load_loras, with_controlnet

    if request.controls:
        request.controlnet_sources = [controlnet_source(s.kind, arch, request.choices, tiny) for s in request.controls]
        pipe = with_controlnet(pipe, load_controlnets(request.controls, arch, request.choices, pipe.unet, tiny))
    load_loras(pipe, request.loras)
    if request.ip_adapter is not None:
        load_ip_adapter(pipe, request.ip_adapter, arch)
    return pipe


def call_arguments(request: PluginRequest) -> dict:
    """The pipeline call's plug-in arguments: control images and scales (lists for several), the adapter image."""
    from omniportrait.images import load_image

    arguments = {}
    if request.controls:
        several = len(request.controls) > 1
        arguments["image"] = request.control_images if several else request.control_images[0]
        scales = [spec.scale for spec in request.controls]
        arguments["controlnet_conditioning_scale"] = scales if several else scales[0]
    if request.ip_adapter is not None and request.ip_adapter.image is not None:
        arguments["ip_adapter_image"] = load_image(request.ip_adapter.image)
    return arguments


def save_control_images(request: PluginRequest) -> None:
    """``--save-control DIR``: ``control-<i>-<kind>.png``, each written atomically."""
    from omniportrait.images import save_image_atomic

    if request.save_control is None:
        return
    folder = Path(request.save_control)
    for index, (spec, image) in enumerate(zip(request.controls, request.control_images)):
        save_image_atomic(image, folder / f"control-{index}-{spec.kind}.png")
    print(f"wrote {len(request.controls)} control image(s) to {folder}", file=sys.stderr)


IDENTITY_CROPS = "identities' aligned face crops"  # the sidecar's adapter image when none was given


def model_record(source: str) -> dict:
    """A plug-in model as the sidecar names it: its source and, for a local file, its SHA-256."""
    return {"source": source, "sha256": None if source == TINY else file_sha256(source)}


def plugins_record(request: PluginRequest) -> dict:
    """The sidecar's ``plugins`` section: every control, the adapter and every LoRA, local files with SHA-256."""
    adapter = request.ip_adapter
    return {
        "controls": [{"kind": spec.kind, "image": str(spec.image), "image_sha256": file_sha256(spec.image),
                      "scale": spec.scale, "controlnet": model_record(source)}
                     for spec, source in zip(request.controls, request.controlnet_sources)],
        "ip_adapter": None if adapter is None else {
            **model_record(adapter.source), "scale": adapter.scale,
            "image": IDENTITY_CROPS if adapter.image is None else str(adapter.image),
            "image_sha256": None if adapter.image is None else file_sha256(adapter.image)},
        "loras": [{"path": str(spec.path), "sha256": file_sha256(spec.path), "scale": spec.scale}
                  for spec in request.loras],
    }


def plugin_flags(args) -> list[str]:
    """The plug-in flags of this run, for the reproduce line (``--save-control`` aside: it writes, not draws)."""
    flags = [part for value in args.control for part in ("--control", value)]
    flags += [part for value in args.controlnet for part in ("--controlnet", value)]
    for flag in ("ip_adapter", "ip_adapter_scale", "ip_adapter_image"):
        if getattr(args, flag) is not None:
            flags += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return flags + [part for value in args.lora for part in ("--lora", value)]


__all__ = ["PluginRequest", "add_plugin_arguments", "attach_plugins", "call_arguments", "make_control_images",
           "plugin_flags", "plugin_request", "plugins_record", "save_control_images"]
