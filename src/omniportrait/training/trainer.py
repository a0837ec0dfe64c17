"""Training of the Pivot ID Encoder with the face localization loss (paper §3.2, eq. 5; §4.2), on accelerate.

The trainer is built around a loaded OmniPortrait pipeline (:func:`omniportrait.pipelines.loading.load_pipeline`):
its UNet, VAE and text encoders are frozen and only run forward; the PIE (vision tower + fusion layer) is
the one module that trains. One micro-batch:

1. VAE-encode the images, add noise at a uniform timestep (DDPM forward process of the base scheduler);
2. drop text and ID together with p = 0.1: the dropped samples get the empty prompt and no ``e_mix``;
3. encode the captions with the pipeline's ``encode_prompt``; replace the class word's states by
   ``e_mix = PIE(face crop, e_txt)`` (the PIE's own ``forward`` = ``fuse_embeddings(encode_image(...))``);
4. run the UNet recording the ``e_mix`` cross-attention of the latent/4 layers (:mod:`omniportrait.attention`);
5. ``L = L_diff + η · L_loc`` (:class:`~omniportrait.training.losses.FaceLocalizationObjective`).

Randomness (noise, timesteps, dropout) comes from a generator seeded by (seed, data position, rank), and
the data order is fixed by the seed, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omniportrait.attention import AttentionStore, attention_layers, record_attention
from omniportrait.errors import ConfigError
from omniportrait.training.checkpoints import (
    PIVOT_FOLDER,
    TrainState,
    complete_checkpoints,
    export_pivot_encoder,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from omniportrait.training.config import PAPER_VISION_MODEL, TrainConfig
from omniportrait.training.data import BatchStream, RecordSource, TrainBatch, make_dataloader, resumed_position
from omniportrait.training.losses import FaceLocalizationObjective, LossTerms
from omniportrait.training.runlog import LossWindow, RunLog
from omniportrait.training.samples import SampleWriter, sample_prompts, sample_reference

FROZEN_MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
LOC_DIVISOR = 4  # the loss reads the cross-attention layers at latent/4 (DESIGN §2)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VISION_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "projection_dim", "hidden_act", "layer_norm_eps", "num_channels")


@dataclass
class TrainResult:
    """What a run did: the last step, where the trained PIE is, and this process's log lines."""

    step: int
    run_dir: Path
    pivot_encoder: Path
    resumed_from: int | None = None
    history: list[dict] = field(default_factory=list)
    main_process: bool = True


# ---------------------------------------------------------------------------------------------- building


def make_accelerator(config: TrainConfig):
    """An ``Accelerator`` for ``config``. accelerate keeps one state per process: outside a distributed
    launch it is reset first, so several runs in one Python session may differ in mixed precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              cpu=launched and not torch.cuda.is_available())  # gloo DDP on CPU-only hosts
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    return accelerator


def load_frozen_pipeline(config: TrainConfig, device: torch.device, dtype: torch.dtype):
    """The pipeline of the preset/base on ``device``; its PIE is replaced by :func:`initial_pivot_encoder`."""
    from omniportrait.pipelines.base import NO_PIVOT_WARNING
    from omniportrait.pipelines.loading import load_pipeline

    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(NO_PIVOT_WARNING))  # a regex: its "(" are literal
        return load_pipeline(config.preset, config.base, config.arch, None, str(device), dtype_name)


def initial_pivot_encoder(config: TrainConfig, text_width: int):
    """The PIE training starts from, in fp32: a trained folder, the tiny PIE, or a CLIP vision tower."""
    from omniportrait.pipelines.loading import get_preset, load_pivot_encoder

    if config.pivot_encoder is not None:
        return load_pivot_encoder(config.pivot_encoder, text_width)
    if get_preset(config.preset).base is None and config.base is None and config.vision_model is None:
        from omniportrait.models.tiny import tiny_pivot_encoder

        return tiny_pivot_encoder(text_width)
    return pivot_encoder_from_vision_model(config.vision_model or PAPER_VISION_MODEL, text_width)


def init_pivot(config: TrainConfig, pipe, text_width: int):
    """With ``--init photomaker:PATH``, the checkpoint's encoder and LoRA (a ``Pivot``), the LoRA loaded into
    ``pipe``'s UNet (which stays frozen: the localization loss fine-tunes the encoder alone); else ``None``."""
    if config.init is None:
        return None
    from omniportrait.pipelines.loading import read_pivot
    from omniportrait.pipelines.plugins import load_pivot_lora
    from omniportrait.training.config import parse_init

    pivot = read_pivot(parse_init(config.init), text_width)
    if pivot.lora is not None:
        load_pivot_lora(pipe, pivot.lora, config.init)
    return pivot


def pivot_encoder_from_vision_model(name: str, text_width: int):
    """A fresh PIE on pretrained CLIP vision weights, its fusion initialised to ``e_mix = e_txt``."""
    from transformers import CLIPVisionModelWithProjection

    from omniportrait.models.pivot_encoder import PivotIDEncoder

    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"could not load the CLIP vision model {name!r} ({str(err).splitlines()[0]}); give a hub id or a "
            "local folder with a CLIPVisionModelWithProjection, or --pivot-encoder"
        ) from err
    settings = vision.config.to_dict()
    pie = PivotIDEncoder(vision_config={key: settings[key] for key in VISION_CONFIG_KEYS if key in settings},
                         text_width=text_width)
    pie.vision.load_state_dict(vision.state_dict())
    pie.init_fusion_as_identity()
    return pie


def frozen_modules(pipe) -> dict[str, torch.nn.Module]:
    """The modules that must not change: UNet, VAE and the text encoder(s)."""
    return {name: getattr(pipe, name) for name in FROZEN_MODULES if getattr(pipe, name, None) is not None}


def freeze(pipe) -> None:
    for module in frozen_modules(pipe).values():
        module.requires_grad_(False)
        module.eval()


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module``; cast only when its dtype differs (diffusers warns on every cast)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def generator_for(seed: int, position: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch: the same for the same (seed, data position, rank)."""
    state = np.random.SeedSequence([seed, position, rank]).generate_state(2, dtype=np.uint64)
    return torch.Generator("cpu").manual_seed(int(state[0] >> np.uint64(1)))


def padded_positions(positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K)`` token indices (short rows repeat their last index) and the mask of real ones."""
    width = max(len(row) for row in positions)
    index = torch.tensor([row + [row[-1]] * (width - len(row)) for row in positions])
    valid = torch.tensor([[k < len(row) for k in range(width)] for row in positions])
    return index, valid


def mix_pivot(pie, embeds: torch.Tensor, face_pixels: torch.Tensor, positions: list[list[int]],
              keep: torch.Tensor) -> torch.Tensor:
    """Replace each kept sample's class-word states by ``e_mix = PIE(face, e_txt)`` (post-fusion, §3.2).

    ``pie`` is the (possibly DDP-wrapped) :class:`PivotIDEncoder`; its ``forward`` is
    ``fuse_embeddings(encode_image(face_pixels), e_txt)``. Dropped samples keep their (empty-prompt)
    states. A zero-weighted sum of ``e_mix`` keeps every PIE parameter in the graph when a whole
    micro-batch is dropped, which distributed data parallel needs.
    """
    index, valid = padded_positions(positions)
    index, valid = index.to(embeds.device), valid.to(embeds.device)
    e_txt = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    e_mix = pie(face_pixels, e_txt)
    rows, cols = (valid & keep.to(embeds.device)[:, None]).nonzero(as_tuple=True)
    mixed = embeds.clone()
    mixed[rows, index[rows, cols]] = e_mix[rows, cols].to(embeds.dtype)
    return mixed + 0.0 * e_mix.sum().to(embeds.dtype)


def unique_positions(positions: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Distinct position lists of a batch (one recorded map each) and, per sample, which one is its own."""
    distinct = sorted({tuple(row) for row in positions})
    return [list(row) for row in distinct], torch.tensor([distinct.index(tuple(row)) for row in positions])


# ---------------------------------------------------------------------------------------------- trainer


class PivotTrainer:
    """Trains the PIE of a pipeline; :meth:`train` runs to ``config.max_steps``, checkpointing on the way."""

    def __init__(self, config: TrainConfig, pipe=None, accelerator=None):
        """``pipe``: an OmniPortrait pipeline to train on instead of loading ``config.preset``/``base``; its
        ``pivot_encoder`` (if any) is the starting point unless ``config.pivot_encoder`` names another."""
        self.config = config.validate()
        self.run_dir = config.run_dir
        self.accelerator = accelerator or make_accelerator(config)
        self.device = self.accelerator.device
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        self.source = RecordSource(config.data, config.seed)
        self.source.check_processes(self.accelerator.num_processes)
        starts_elsewhere = config.pivot_encoder is not None or config.init is not None
        given_pie = None if starts_elsewhere else getattr(pipe, "pivot_encoder", None)
        if pipe is None:
            pipe = load_frozen_pipeline(config, self.device, self.weight_dtype)
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.sdxl = is_sdxl(self.pipe)
        self.resolution = config.resolution or self.pipe.default_size()
        width = self.pipe.unet.config.cross_attention_dim
        self.init = init_pivot(config, self.pipe, width)
        self._prepare_frozen()
        self.pie = given_pie or (self.init.encoder if self.init else initial_pivot_encoder(config, width))
        place(self.pie, self.device, torch.float32)
        self.pie.train()
        self.pipe.register_modules(pivot_encoder=self.pie)
        if config.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.objective = FaceLocalizationObjective(config.eta, config.loc_size)
        self.loc_layers = attention_layers(self.pipe.unet, LOC_DIVISOR, "attn2")
        if not self.loc_layers:
            raise ConfigError("the UNet has no cross-attention layer at latent/4 for the face localization loss")
        optimizer, scheduler = self._optimizer_and_scheduler()
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.pie, optimizer, scheduler)

    # -- setup ---------------------------------------------------------------------------------------------

    def _prepare_frozen(self) -> None:
        freeze(self.pipe)
        for module in frozen_modules(self.pipe).values():
            place(module, self.device, self.weight_dtype)
        vae = self.pipe.vae
        if self.weight_dtype == torch.float16 and vae.config.get("force_upcast", False):
            place(vae, self.device, torch.float32)  # SDXL's VAE overflows in fp16

    def _optimizer_and_scheduler(self):
        from diffusers.optimization import get_scheduler

        config = self.config
        optimizer = torch.optim.AdamW(
            self.pie.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay, eps=config.adam_epsilon,
        )
        processes = self.accelerator.num_processes
        # accelerate steps a prepared scheduler once per process and step, as diffusers' scripts count.
        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * processes,
                                  num_training_steps=config.max_steps * processes)
        return optimizer, scheduler

    def enable_gradient_checkpointing(self) -> None:
        self.pipe.unet.enable_gradient_checkpointing()
        self.pie.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def unwrapped_pie(self):
        return self.accelerator.unwrap_model(self.model)

    # -- one micro-batch ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(self.device, dist.mean.dtype)
        latents = dist.mean + dist.std * noise
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.weight_dtype)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt states (and SDXL's pooled embeds) from the pipeline's own ``encode_prompt``."""
        if self.sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return embeds, pooled
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return embeds, None

    def added_conditions(self, batch: TrainBatch, pooled: torch.Tensor | None) -> dict | None:
        """SDXL's micro-conditioning: pooled text embeds and (original size, crop corner, target size) ids."""
        if not self.sdxl:
            return None
        projection_dim = self.pipe.text_encoder_2.config.projection_dim
        target = (self.resolution, self.resolution)
        time_ids = torch.cat([
            self.pipe._get_add_time_ids(tuple(size), tuple(corner), target, dtype=pooled.dtype,
                                        text_encoder_projection_dim=projection_dim)
            for size, corner in zip(batch.original_sizes, batch.crop_top_lefts)
        ])
        return {"text_embeds": pooled, "time_ids": time_ids.to(self.device)}

    def noisy_latents(self, latents: torch.Tensor, generator: torch.Generator):
        """``z_t``, ``t`` uniform in [0, T), and the regression target (ε, or v for v-prediction models)."""
        scheduler = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, noise

    def condition_keep(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """True for samples that keep text and ID; both are dropped together with ``cond_dropout``."""
        return torch.rand(size, generator=generator) >= self.config.cond_dropout

    def conditioning(self, batch: TrainBatch, keep: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """Prompt states with ``e_mix`` in place for the kept samples; the empty prompt for the dropped ones."""
        embeds, pooled = self.encode_text([c if k else "" for c, k in zip(batch.captions, keep.tolist())])
        face_pixels = self.unwrapped_pie.preprocess(batch.faces)
        embeds = mix_pivot(self.model, embeds, face_pixels, batch.positions, keep)
        return embeds, self.added_conditions(batch, pooled)

    @contextmanager
    def recording(self, batch: TrainBatch, keep_grad: bool = True):
        """Record the e_mix cross-attention of the latent/4 layers; the backward pass belongs inside too
        (gradient checkpointing recomputes the forward with these processors)."""
        distinct, self._own_map = unique_positions(batch.positions)
        side = self.resolution // self.pipe.vae_scale_factor
        self.store = AttentionStore(distinct, self.loc_layers, latent_size=(side, side), keep_grad=keep_grad)
        try:
            with record_attention(self.pipe.unet, self.store):
                yield self.store
        finally:
            self.store.clear()

    def forward(self, batch: TrainBatch, noisy: torch.Tensor, timesteps: torch.Tensor, keep: torch.Tensor):
        """UNet prediction and each sample's e_mix map ``(B, 1, h, w)``; call inside :meth:`recording`."""
        embeds, added = self.conditioning(batch, keep)
        prediction = self.pipe.unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                                    return_dict=False)[0]
        maps = self.store.identity_maps()
        return prediction, maps[torch.arange(len(batch)), self._own_map][:, None]

    @torch.no_grad()
    def identity_maps(self, batch: TrainBatch, noisy: torch.Tensor, timesteps: torch.Tensor,
                      keep: torch.Tensor) -> torch.Tensor:
        """The e_mix maps alone, without gradients (for probes)."""
        with self.recording(batch, keep_grad=False), self.accelerator.autocast():
            return self.forward(batch, noisy, timesteps, keep)[1]

    def loss(self, batch: TrainBatch, generator: torch.Generator) -> LossTerms:
        """Eq. 5 on one micro-batch; call inside :meth:`recording`."""
        latents = self.encode_latents(batch.pixel_values, generator)
        noisy, timesteps, target = self.noisy_latents(latents, generator)
        keep = self.condition_keep(len(batch), generator)
        prediction, maps = self.forward(batch, noisy, timesteps, keep)
        return self.objective(prediction, target, maps, batch.masks.to(self.device), keep.to(self.device))

    def micro_step(self, batch: TrainBatch, generator: torch.Generator) -> LossTerms:
        """Forward and backward of one micro-batch; the optimizer steps when gradients are synchronised."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            with self.recording(batch):
                with accelerator.autocast():
                    terms = self.loss(batch, generator)
                accelerator.backward(terms.total)
            if accelerator.sync_gradients and self.config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return terms

    # -- the run ------------------------------------------------------------------------------------------

    def restore(self) -> tuple[TrainState, int | None]:
        folder = resumable_checkpoint(self.run_dir)
        if folder is None:
            return TrainState(), None
        state, saved = load_checkpoint(self.accelerator, folder)
        state.position = resumed_position(state.position, saved, self.config.batch_size,
                                          self.accelerator.num_processes)
        return state, state.step

    def check_fresh_output(self) -> None:
        if complete_checkpoints(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue that run or choose "
                "another --output"
            )

    def dataloader(self, start: int):
        stream = BatchStream(self.source, self.pipe.tokenizer, self.resolution, self.config.batch_size,
                             self.accelerator.process_index, self.accelerator.num_processes, start)
        return make_dataloader(stream, self.config.num_workers)

    def sample_writer(self) -> SampleWriter | None:
        config = self.config
        if not config.sample_every or not self.accelerator.is_main_process:
            return None
        first = self.source.first()
        word = config.sample_class_word or first.class_word
        prompts = sample_prompts(config.sample_prompts, word, self.pipe.tokenizer)
        return SampleWriter(self.pipe, sample_reference(config.sample_reference, first), word, prompts,
                            self.run_dir / "samples", self.resolution, config.sample_steps, config.sample_seed)

    def checkpoint(self, state: TrainState) -> Path:
        extra = {"config": self.config.to_dict(), "world_size": self.accelerator.num_processes,
                 "batch_size": self.config.batch_size}
        return save_checkpoint(self.accelerator, self.model, state, self.run_dir, extra,
                               self.config.checkpoints_total_limit)

    def starting_state(self) -> tuple[TrainState, int | None]:
        """With ``resume``, the newest checkpoint's state (or a fresh one); else a fresh run in a fresh folder."""
        if self.config.resume:
            return self.restore()
        self.check_fresh_output()
        return TrainState(), None

    def train(self, on_step: Callable[[int, "PivotTrainer"], None] | None = None) -> TrainResult:
        """Run to ``config.max_steps``; ``on_step(step, trainer)`` is called after every optimizer step.

        The last step is always checkpointed, then the PIE is exported to ``OUTPUT/pivot_encoder``.
        """
        config, accelerator = self.config, self.accelerator
        state, resumed_from = self.starting_state()
        log = RunLog(self.run_dir / "logs", enabled=accelerator.is_main_process, tensorboard=config.tensorboard)
        log.event("resume" if resumed_from is not None else "start", step=state.step, position=state.position,
                  processes=accelerator.num_processes)
        samples = self.sample_writer()
        batches = iter(self.dataloader(state.position))
        window = LossWindow()
        with self._progress(state.step) as progress:
            while state.step < config.max_steps:
                started = time.perf_counter()
                terms = [self._next_micro(batches, state) for _ in range(config.gradient_accumulation_steps)]
                state.step += 1
                self._account(window, terms, time.perf_counter() - started, state.step)
                progress.update(1)
                progress.set_postfix(loss=f"{window.loss / window.steps:.4f}", loc=f"{terms[-1].localization:.4f}")
                window = self.after_step(state, window, log, samples)
                if on_step is not None:
                    on_step(state.step, self)
        pie_path = self.export(state, log)
        return TrainResult(state.step, self.run_dir, pie_path, resumed_from, log.history, accelerator.is_main_process)

    def after_step(self, state: TrainState, window: LossWindow, log: RunLog, samples) -> LossWindow:
        """Log, checkpoint and draw samples when their step comes; returns the loss window to fill next."""
        config = self.config
        last = state.step == config.max_steps
        if state.step % config.log_every == 0 or last:
            log.scalars(window.summary(state.step, self.lr_scheduler.get_last_lr()[0]))
            window = LossWindow()
        if state.step % config.checkpoint_every == 0 or last:
            log.event("checkpoint", step=state.step, path=str(self.checkpoint(state)))
            log.flush()
        if samples is not None and state.step % config.sample_every == 0:
            log.images(state.step, samples(state.step))
            log.event("samples", step=state.step)
        return window

    def export(self, state: TrainState, log: RunLog) -> Path:
        """Write the trained PIE to ``OUTPUT/pivot_encoder`` (atomically) and close the log. Its config records
        whether the face localization loss (eq. 5) was on: RB-Guidance's ``auto`` mask source reads it (DESIGN §2)."""
        pie_path = self.run_dir / PIVOT_FOLDER
        self.unwrapped_pie.register_to_config(trained_with_localization_loss=self.config.eta > 0)
        if self.accelerator.is_main_process:
            export_pivot_encoder(self.unwrapped_pie, pie_path, self.init.lora if self.init else None)
        log.event("end", step=state.step, pivot_encoder=str(pie_path))
        log.close()
        self.accelerator.wait_for_everyone()
        return pie_path

    def _next_micro(self, batches, state: TrainState) -> LossTerms:
        batch = next(batches)
        generator = generator_for(self.config.seed, state.position, self.accelerator.process_index)
        terms = self.micro_step(batch, generator)
        state.position = batch.position
        return terms

    def _account(self, window: LossWindow, terms: list[LossTerms], seconds: float, step: int) -> None:
        count = len(terms)
        values = torch.stack([torch.stack([t.total.detach().float(), t.diffusion.float(), t.localization.float()])
                              for t in terms]).mean(0)
        values = self.accelerator.reduce(values.to(self.device), "mean")
        kept = int(self.accelerator.reduce(torch.tensor(sum(t.kept for t in terms), device=self.device), "sum"))
        samples = self.config.batch_size * count * self.accelerator.num_processes
        loss, diffusion, localization = (float(v) for v in values)
        if not all(math.isfinite(v) for v in (loss, diffusion, localization)):
            raise ConfigError(f"the training loss became {loss} at step {step}; lower --learning-rate "
                              "(or use bf16 instead of fp16) and continue with --resume")
        window.add(loss, diffusion, localization, kept, samples, seconds)

    def _progress(self, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=self.config.max_steps, initial=initial, desc="train PIE", unit="step", file=sys.stderr,
                    disable=not (self.config.progress and self.accelerator.is_local_main_process))


def train(config: TrainConfig) -> TrainResult:
    """Python entry point: train the Pivot ID Encoder as ``config`` says (see :class:`TrainConfig`)."""
    return PivotTrainer(config).train()
