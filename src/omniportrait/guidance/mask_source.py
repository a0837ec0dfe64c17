"""Where ``M_gen`` comes from (DESIGN §2 "Mask source"): the attention mask of eq. 6, or detected faces.

Eq. 6 reads the class word's cross-attention, which marks the face only once the Pivot ID Encoder was trained with
the face localization loss (eq. 5). With a public pivot (IP-Adapter) or an untrained encoder, the ``detect`` source
decodes the predicted ``x̂0`` once at the first guided step, runs our face analysis on it, takes each face's mask
(the filled face oval of :mod:`omniportrait.faces`), gives each identity the face holding most of its class word's
attention, and keeps those masks for the later steps (detecting again every ``redetect_every`` guided steps).
Where too few faces are found it falls back to the attention mask, with one warning.

The detection reads the GPU and runs on the host, so it happens between steps, never inside a captured one
(:mod:`.steps`): the masks live in one device buffer that a captured guided step reads and a later detection updates
in place with ``copy_``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

ATTENTION, DETECT = "attention", "detect"
NO_FACE_WARNING = "RB-Guidance's detect mask source: {}; the attention mask (eq. 6) is used instead"


def chosen_source(mask: str, pivot_encoder) -> tuple[str, str]:
    """``(source, reason)`` for the config's ``mask``: ``auto`` is ``attention`` with a Pivot ID Encoder trained with
    the localization loss (its class-word attention marks the face), ``detect`` otherwise (DESIGN §2)."""
    if mask != "auto":
        return mask, f"{mask}: asked for"
    if pivot_encoder is None:
        return DETECT, "auto: no pivot encoder (no class-word attention trained to mark the face)"
    if getattr(pivot_encoder.config, "trained_with_localization_loss", False):
        return ATTENTION, "auto: the pivot encoder was trained with the localization loss"
    return DETECT, "auto: the pivot encoder was not trained with the localization loss"


def predicted_original(scheduler, latents: torch.Tensor, timestep: float, output: torch.Tensor) -> torch.Tensor:
    """``x̂0`` of a step from its latents ``z_t`` and the model output it stepped with, by the scheduler's
    ``alphas_cumprod`` and prediction type (DDPM eq. 15). Schedulers whose latents carry ``σ``-scaled noise (Euler,
    ``init_noise_sigma > 1``) are first brought to ``z_t = √ᾱ·x0 + √(1-ᾱ)·ε``, as their ``scale_model_input`` does."""
    alpha = torch.tensor(alpha_at(scheduler.alphas_cumprod, timestep), device=latents.device)
    latents, output = latents.float(), output.float()
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
        latents = latents * alpha.sqrt()  # x0 + σε with σ² = (1-ᾱ)/ᾱ, scaled by 1/√(σ²+1) = √ᾱ
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return alpha.sqrt() * latents - (1 - alpha).sqrt() * output
    if kind == "sample":
        return output
    return (latents - (1 - alpha).sqrt() * output) / alpha.sqrt()


def alpha_at(alphas_cumprod: torch.Tensor, timestep: float) -> float:
    """``ᾱ`` at a timestep that may lie between the training ones (Euler's spacing): ``σ = √((1-ᾱ)/ᾱ)`` interpolated
    linearly in ``t``, as those schedulers interpolate their sigmas; ``alphas_cumprod[t]`` at a whole ``t``."""
    alphas = alphas_cumprod.double().cpu().numpy()
    sigma = float(np.interp(timestep, np.arange(len(alphas)), np.sqrt((1 - alphas) / alphas)))
    return 1.0 / (1.0 + sigma**2)


def attention_fractions(maps: np.ndarray, boxes: list, size: tuple[int, int]) -> np.ndarray:
    """``(n_id, n_faces)``: the share of each identity's class-word attention ``maps`` ``(n_id, h, w)`` that lies in
    each face box (image pixels of an image of ``size`` ``(width, height)``). Shares, not masses: identities whose
    maps differ in scale still compare."""
    width, height = size
    upsampled = F.interpolate(torch.from_numpy(maps)[None].float(), size=(height, width), mode="bilinear",
                              align_corners=False)[0].clamp_min(0).numpy()
    totals = upsampled.reshape(len(maps), -1).sum(1).clip(min=1e-12)
    shares = np.zeros((len(maps), len(boxes)))
    for face, (x0, y0, x1, y1) in enumerate(boxes):
        rows, columns = slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1)))
        shares[:, face] = upsampled[:, rows, columns].reshape(len(maps), -1).sum(1) / totals
    return shares


def assign_faces(shares: np.ndarray) -> list[int]:
    """The face of each identity, each face given once: greedily the (identity, face) pair with the largest share of
    attention first (``shares`` ``(n_id, n_faces)``, ``n_faces >= n_id``)."""
    shares = shares.astype(float).copy()
    owners = [-1] * shares.shape[0]
    for _ in range(shares.shape[0]):
        identity, face = np.unravel_index(np.argmax(shares), shares.shape)
        owners[identity] = int(face)
        shares[identity, :], shares[:, face] = -np.inf, -np.inf
    return owners


def latent_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An image-size bool face mask at latent ``size`` ``(h, w)``: the latent pixels at least half covered."""
    covered = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=size, mode="area")[0, 0]
    return covered >= 0.5


def image_masks(faces: list, maps: np.ndarray | None, count: int, size: tuple[int, int]) -> torch.Tensor | None:
    """``(count, h, w)`` disjoint latent-size masks for one image's ``faces``, face ``k`` going to the identity
    :func:`assign_faces` gives it (by ``maps``; without maps, the largest faces in identity order); None when there
    are fewer faces than identities. Where two face ovals overlap, the earlier identity keeps the pixels."""
    if len(faces) < count:
        return None
    boxes = [face.box for face in faces]
    owners = list(range(count)) if maps is None else assign_faces(attention_fractions(maps, boxes, faces_size(faces)))
    masks = torch.stack([latent_mask(faces[owner].mask, size) for owner in owners])
    taken = torch.zeros_like(masks[0])
    for index in range(count):
        masks[index] &= ~taken
        taken |= masks[index]
    return masks


def faces_size(faces: list) -> tuple[int, int]:
    """``(width, height)`` of the image the faces were found in (their masks' shape)."""
    height, width = faces[0].mask.shape
    return width, height


class MaskSource:
    """``M_gen``'s source for one :class:`~omniportrait.guidance.rb.ReferenceGuidance`, and what ran (``source``,
    ``reason``: the CLI sidecar records both).

    :meth:`remember` keeps each step's latents and noise; :meth:`before_gradient`, called before a guided step that
    computes a gradient, detects where due, from the ``x̂0`` the previous step predicted (for DDIM exactly the ``x̂0``
    of ``z_t`` under that noise; a first guided step without a previous one takes one unguided prediction first).
    ``masks``, when set, is the fixed ``M_gen`` ``(B, n, h, w)`` the guided step reads.
    """

    def __init__(self, guidance, analyzer=None):
        self.guidance, self.analyzer = guidance, analyzer
        config = guidance.config
        self.asked, self.choice = chosen_source(config.mask, getattr(guidance.pipe, "pivot_encoder", None))
        self.source, self.reason = self.asked, self.choice
        self.redetect_every = config.redetect_every
        self.masks: torch.Tensor | None = None
        self.previous: tuple | None = None
        self.detections = 0
        self.gradient_steps = 0  # guided steps that computed a gradient so far
        self.warned = False

    def remember(self, latents: torch.Tensor, timestep: float, noise: torch.Tensor) -> None:
        """The step's latents, host timestep and the noise the scheduler steps with (references, no copies)."""
        if self.asked == DETECT:
            self.previous = (latents, timestep, noise)

    def due(self, gradient_steps: int) -> bool:
        """Whether the guided step after ``gradient_steps`` gradient steps detects: the first, then every
        ``redetect_every``-th."""
        if self.asked != DETECT:
            return False
        if gradient_steps == 0:
            return True
        return self.redetect_every > 0 and gradient_steps % self.redetect_every == 0

    @torch.no_grad()
    def before_gradient(self, latents, t, timestep: float, cond, guidance_scale: float) -> None:
        """Detect the faces of this step's ``x̂0`` where due and set :attr:`masks` (outside any captured step)."""
        due = self.due(self.gradient_steps)
        self.gradient_steps += 1
        if not due:
            return
        if self.previous is None:  # a first step that is guided: one unguided prediction, attention recorded
            self.remember(latents, timestep, self.guidance.plain_noise(latents, t, cond, guidance_scale))
        previous_latents, previous_timestep, noise = self.previous
        x0 = predicted_original(self.guidance.pipe.scheduler, previous_latents, previous_timestep, noise)
        self.use(self.detect(self.guidance.pipe.decode(x0, "pil")), latents.device)

    def detect(self, images: list) -> torch.Tensor | tuple[str, torch.Tensor | None]:
        """``(B, n, h, w)`` masks of the faces in ``images`` (one per batch row), or why there are none."""
        try:
            analyzer = self.analyzer or default_face_analyzer()
        except ImportError as error:
            return f"face analysis is not installed ({error})"
        maps = self.guidance.store.running_mean()
        maps = None if maps is None else maps.float().cpu().numpy()
        count, size = len(self.guidance.references), self.guidance.latent_size
        per_image = []
        for row, image in enumerate(images):
            faces = analyzer.analyze(image)
            masks = image_masks(faces, None if maps is None else maps[row], count, size)
            if masks is None:
                found = "no face" if not faces else f"{len(faces)} face(s) for {count} identities"
                return f"{found} found in the decoded x̂0 of image {row}"
            per_image.append(masks)
        return torch.stack(per_image)

    def use(self, detected, device: torch.device) -> None:
        """Keep detected masks (in place where a buffer exists, so a captured step reads them), or record why the
        attention mask runs: the first miss is warned about and recorded; a later miss keeps the masks detected
        before, if any, or the attention mask."""
        step = self.guidance.active_steps
        if isinstance(detected, str):
            if self.masks is None and not self.warned:
                self.source, self.warned = ATTENTION, True
                self.reason = f"{self.choice}; detect: {detected} at guided step {step}; attention mask used"
                warnings.warn(NO_FACE_WARNING.format(detected), stacklevel=6)
            return
        self.detections += 1
        detected = detected.to(device)
        if self.masks is None:
            self.masks = detected
            self.guidance.steps.graphs.pop("guided", None)  # a guided step captured with the attention mask
        else:
            self.masks.copy_(detected)
        self.source = DETECT
        self.reason = f"{self.choice}; detect: faces found in the decoded x̂0 at guided step {step}"

    def record(self) -> dict:
        """What ran, for the sidecar: the source, why, and how many detections gave masks."""
        return {"mask_source": self.source, "mask_reason": self.reason, "mask_detections": self.detections}


def default_face_analyzer():
    """The process-wide face analyzer of :mod:`omniportrait.faces` (MediaPipe, models in the wheel)."""
    from omniportrait.faces import default_analyzer

    return default_analyzer()
