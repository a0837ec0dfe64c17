"""Training configuration: every hyperparameter of the Pivot ID Encoder training, with the paper's defaults.

Paper §3.2 / §4.2: AdamW, learning rate 2e-5, face localization weight η = 2e-3 (eq. 5), text and ID
condition dropped together with p = 0.1; SD1.5 trained 80k steps (SDXL 60k). Values the paper does not
state (batch size, betas, weight decay, warmup, clipping) take the usual diffusers fine-tuning values and
are marked "(ours)" in their help text. The CLI builds one flag per field from this dataclass, so a new
field is a new flag.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from omniportrait.errors import ConfigError
from omniportrait.files import check_input_file, check_input_folder, check_output_folder
from omniportrait.values import SEED, STEPS, Range

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_SAMPLE_PROMPTS = (
    "a photo of a {word}",
    "a {word} on the beach at sunset",
    "a {word} in the snow wearing a red hat",
)
PRESET_NAMES = ("tiny-sd15", "tiny-sdxl", "sd15", "sdxl")  # omniportrait.pipelines.loading.PRESETS, without torch
MANY = 10**9
"""Upper bound of step counts: far beyond any run, low enough to refuse a typo of many digits."""
# The paper's image tower: OpenCLIP ViT-L/14 trained on LAION-2B, in transformers format.
PAPER_VISION_MODEL = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"


def _flag(default, help: str, **extra):
    """A dataclass field carrying the CLI help text and, as ``range`` (a :class:`~omniportrait.values.Range`),
    ``choices`` or ``check`` (a function raising ``ConfigError``), the values it accepts: the CLI refuses
    others while parsing, :meth:`TrainConfig.validate` refuses them from the Python API."""
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """What ``omniportrait train`` and :func:`omniportrait.training.train` do.

    ``data`` and ``output`` are required; every other field has a default (the paper's where it gives one).
    """

    data: str = field(metadata={"help": "folder of records (NAME.jpg + NAME.json + NAME.mask.png) or "
                                        "webdataset shards (a .tar, a brace pattern or a folder of .tar)",
                                "check": lambda value: _check_data_path(value)})
    output: str = field(metadata={"help": "run folder: checkpoints/, pivot_encoder/, logs/, samples/",
                                  "check": check_output_folder})
    # model
    preset: str = _flag("sd15", "tiny-sd15, tiny-sdxl, sd15 or sdxl: architecture and default base weights",
                        choices=tuple(PRESET_NAMES))
    base: str | None = _flag(None, "hub id, diffusers folder or .safetensors file (overrides the preset's weights)")
    arch: str | None = _flag(None, "sd15 or sdxl, when it cannot be read from --base", choices=("sd15", "sdxl"))
    pivot_encoder: str | None = _flag(None, "start from this trained PivotIDEncoder folder (save_pretrained)",
                                      check=check_input_folder)
    init: str | None = _flag(None, "start the PIE from a public pivot: photomaker:PATH (PhotoMaker v1 .bin or "
                                   ".safetensors, SDXL presets; its UNet LoRA is loaded, kept frozen, and exported "
                                   "beside the trained encoder)", check=lambda value: parse_init(value))
    vision_model: str | None = _flag(
        None, "CLIP vision weights (hub id or folder) for a fresh PIE; default: the paper's OpenCLIP "
              f"ViT-L/14 ({PAPER_VISION_MODEL}) for real presets, the tiny PIE for tiny presets")
    # objective (eq. 5)
    eta: float = _flag(2e-3, "weight of the face localization loss, eq. 5 (paper: 2e-3)", range=Range(0, 1000))
    loc_size: int = _flag(16, "side of the map the localization loss compares, capped at the layers' map size "
                              "(paper: 16)", range=Range(1, 1024, integer=True))
    cond_dropout: float = _flag(0.1, "probability of dropping text and ID condition together (paper: 0.1)",
                                range=Range(0, 1, high_open=True))
    # optimisation
    learning_rate: float = _flag(2e-5, "AdamW learning rate (paper: 2e-5)", range=Range(0, 1, low_open=True))
    adam_beta1: float = _flag(0.9, "AdamW beta1 (ours)", range=Range(0, 1, high_open=True))
    adam_beta2: float = _flag(0.999, "AdamW beta2 (ours)", range=Range(0, 1, high_open=True))
    adam_epsilon: float = _flag(1e-8, "AdamW epsilon (ours)", range=Range(0, 1, low_open=True))
    weight_decay: float = _flag(1e-2, "AdamW weight decay (ours)", range=Range(0, 10))
    max_grad_norm: float = _flag(1.0, "clip the gradient norm to this value; 0 turns clipping off (ours)",
                                 range=Range(0, 1e6))
    lr_scheduler: str = _flag("constant", f"learning-rate schedule: {', '.join(LR_SCHEDULERS)}",
                              choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _flag(0, "warmup steps of the learning-rate schedule", range=Range(0, MANY, integer=True))
    max_steps: int = _flag(80_000, "optimizer steps to train (paper: 80k for SD1.5, 60k for SDXL)",
                           range=Range(1, MANY, integer=True))
    batch_size: int = _flag(4, "records per device and micro-batch (ours)", range=Range(1, 4096, integer=True))
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step",
                                             range=Range(1, 4096, integer=True))
    resolution: int | None = _flag(None, "training image side; default: the preset's size (512 SD1.5, 1024 SDXL)",
                                   range=Range(8, 4096, integer=True, multiple_of=8))
    mixed_precision: str = _flag("no", "no, fp16 or bf16: frozen models run in this dtype, the PIE in fp32",
                                 choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _flag(False, "recompute UNet and PIE activations in the backward pass")
    seed: int = _flag(0, "seed of the data order, noise, timesteps and condition dropout", range=SEED)
    num_workers: int = _flag(2, "data-loading worker processes per device", range=Range(0, 256, integer=True))
    # bookkeeping
    checkpoint_every: int = _flag(1000, "write a resumable checkpoint every N steps (and at the end)",
                                  range=Range(1, MANY, integer=True))
    checkpoints_total_limit: int | None = _flag(None, "keep only the newest N checkpoints",
                                                range=Range(1, MANY, integer=True))
    resume: bool = _flag(False, "continue from the newest complete checkpoint in OUTPUT/checkpoints")
    log_every: int = _flag(10, "log the mean loss terms, learning rate and step time every N steps",
                           range=Range(1, MANY, integer=True))
    tensorboard: bool = _flag(True, "also log to TensorBoard when the tensorboard package is installed")
    progress: bool = _flag(True, "show a progress bar")
    sample_every: int = _flag(1000, "draw the sample prompts every N steps (0 = never)",
                              range=Range(0, MANY, integer=True))
    sample_prompts: tuple[str, ...] = _flag(DEFAULT_SAMPLE_PROMPTS, "fixed prompts of the samples; {word} is "
                                                                    "replaced by the class word", nargs="+")
    sample_reference: str | None = _flag(None, "reference photo of the samples; default: the first record's face",
                                         check=check_input_file)
    sample_class_word: str | None = _flag(None, "class word of the samples; default: the first record's")
    sample_steps: int = _flag(25, "sampling steps of the samples", range=STEPS)
    sample_seed: int = _flag(0, "seed of the samples (the same every time, so they are comparable)", range=SEED)

    def __post_init__(self) -> None:
        self.sample_prompts = tuple(self.sample_prompts)

    @property
    def run_dir(self) -> Path:
        return Path(self.output).expanduser()

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` with a one-line message for any value training cannot use."""
        from omniportrait.pipelines.loading import get_preset

        get_preset(self.preset)
        for item in fields(self):
            problem = field_problem(item, getattr(self, item.name))
            if problem:
                raise ConfigError(f"--{item.name.replace('_', '-')} {problem}")
        if self.pivot_encoder is not None and self.init is not None:
            raise ConfigError("--pivot-encoder and --init both name a starting encoder; give one")
        if self.pivot_encoder is not None:
            from omniportrait.pipelines.loading import check_pivot_encoder

            check_pivot_encoder(self.pivot_encoder)
        return self

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sample_prompts"] = list(self.sample_prompts)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def field_problem(item, value) -> str | None:
    """Why ``value`` is refused for the :class:`TrainConfig` field ``item`` (per its metadata), or ``None``."""
    if value is None:
        return None
    meta = item.metadata
    if "range" in meta:
        return meta["range"].problem(value)
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}, got {value!r}"
    if "check" in meta:
        try:
            meta["check"](value)
        except ConfigError as err:
            return f"refused: {err}"
    return None


INIT_SOURCES = ("photomaker",)
"""Public pivots ``--init`` starts from (SOURCE:PATH)."""


def parse_init(value: str) -> str:
    """``photomaker:PATH`` -> the checkpoint path, checked to be an existing PhotoMaker checkpoint file."""
    from omniportrait.models.photomaker import CHECKPOINT_SUFFIXES, check_pivot_path

    source, separator, path = str(value).partition(":")
    if not separator or source not in INIT_SOURCES or not path.strip():
        raise ConfigError(f"{value!r} must look like photomaker:PATH (a PhotoMaker v1 checkpoint)")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise ConfigError(f"{path} is not a PhotoMaker checkpoint file "
                          f"({', '.join(CHECKPOINT_SUFFIXES)})")
    check_pivot_path(path)
    return path


def _check_data_path(data: str) -> None:
    if not data or not str(data).strip():
        raise ConfigError("--data is empty; give a record folder or webdataset shards")
    if "{" in data or "::" in data or data.startswith(("http://", "https://", "pipe:", "s3://", "gs://")):
        return  # shard patterns and remote URLs are checked when the loader opens them
    if not os.path.exists(os.path.expanduser(data)):
        raise ConfigError(f"training data {data} does not exist; give a record folder or webdataset shards")
