"""Parameters of Reference-Based Guidance (paper §3.3, eqs. 6-11; DESIGN §2). Defaults are the paper's."""

from __future__ import annotations

from dataclasses import dataclass

REDUCTIONS = ("sum", "mean")
FEATURE_PASSES = ("cfg", "split", "separate")
RECOMPUTES = ("gelu", "projection")  # what the feed-forward recomputes in the backward (guidance/recompute.py)
MASK_SOURCES = ("auto", "attention", "detect")  # where M_gen comes from (guidance/mask_source.py, DESIGN §2)
DEFAULT_DIFT_BLOCK = {"sd15": 1, "sdxl": 0}


@dataclass(frozen=True)
class RBGuidanceConfig:
    """Reference-Based Guidance settings.

    Attributes:
        enabled: run the guidance at all (``--no-rb`` turns it off).
        strength: ``p`` of the energy ``E = p / (1 + S)`` (eq. 10).
        start: ``u``; guidance runs on steps with ``t <= u·T`` (eq. 11).
        ref_timestep: ``t0``, noise level of the reference features.
        dift_ensemble: ``K`` seeded noises averaged for the reference features.
        dift_block: UNet ``up_blocks`` index whose output is the feature map (None: SD1.5 1, SDXL 0).
        strength_per_point: a deviation from eq. 10, off by default: ``E = p·|M_ref| / (1 + S)``. With eq. 8's sum,
            ``|∇E| ≈ p/(1+S)²·|∇S|`` shrinks about as ``1/|M_ref|``, so the same ``p`` pulls about 4× less on
            SDXL's 64×64 feature map than on SD1.5's 32×32; scaling ``p`` by ``|M_ref|`` makes it about the same at
            every size and face size (``p`` is then per reference point: start near ``8.5 / |M_ref|`` of the size
            the paper's ``p`` was set for).
        reduction: ``sum`` over reference points (eq. 8) or ``mean`` (S divided by ``|M_ref|``: the gradient of E then
            grows, by about ``|M_ref|·s²/(1+s)²`` for a mean match score ``s``).
        mask_iterations / mask_power / mask_threshold: ``γ``, ``α``, ``β`` of the regional mask (eq. 6).
        attention_divisor: the mask comes from attention layers whose maps are latent/``attention_divisor``.
        background_masking: multiply the gradient by ``M_gen`` (eq. 9).
        feature_pass: ``cfg`` takes features from the batched CFG pass run with grad; ``split`` runs the CFG
            pass as an unconditional pass without grad and a conditional one with grad (half the backward and
            its memory); ``separate`` runs the CFG pass without grad and a conditional pass stopped after the
            DIFT block (an extra partial pass).
        recompute: what each transformer block's GEGLU feed-forward computes again in the backward instead of
            keeping: ``projection`` its whole projection from its input; ``gelu`` only its gate. In the batched
            ``cfg`` pass the gates keep and differentiate the conditional rows only, and the two cost the same
            FLOPs with ``projection`` keeping less; with ``split`` and ``separate``, ``projection`` costs one more
            matmul per block for less memory. The same gradient either way (up to the rounding of matrix products
            over fewer rows).
        gradient_interval: recompute ``∇E`` on every N-th guided step and add the last one on the steps between
            (1, the paper: every guided step; N cuts the backward passes to about 1/N).
        cuda_graph: capture the sampling step as a CUDA graph on its first call and replay it on the later ones
            (the unguided step and the guided step, each kind once): the host launches one graph instead of every
            kernel, and the latents equal eager steps'. It needs CUDA, a scheduler without input scaling (such as
            the default DDIM) and the UNet's weights in place (no CPU offloading). None (default): on wherever it
            can run, off elsewhere; True: on, and a clear error where it cannot run; False: off.
        mask: where ``M_gen`` comes from (DESIGN §2 "Mask source"): ``attention`` (eq. 6, which needs a class-word
            attention trained by the localization loss), ``detect`` (the face-oval masks of the faces our face
            analysis finds in the decoded ``x̂0`` of the first guided step, assigned to identities by attention mass;
            the attention mask where no face is found), or ``auto`` (default): ``attention`` with a Pivot ID Encoder
            trained with the localization loss, ``detect`` otherwise.
        redetect_every: with detected masks, detect again on every N-th guided step that computes a gradient
            (0, default: never; the masks of the first guided step are kept).
        ref_prompt: prompt for the reference features; ``{word}`` is the identity's class word.
        ref_seed: seed of the reference noises.
    """

    enabled: bool = True
    strength: float = 8.5
    strength_per_point: bool = False
    start: float = 0.6
    ref_timestep: int = 671
    dift_ensemble: int = 8
    dift_block: int | None = None
    reduction: str = "sum"
    mask_iterations: int = 3
    mask_power: float = 2.0
    mask_threshold: float = 0.5
    attention_divisor: int = 4
    background_masking: bool = True
    feature_pass: str = "cfg"
    recompute: str = "projection"
    gradient_interval: int = 1
    cuda_graph: bool | None = None
    mask: str = "auto"
    redetect_every: int = 0
    ref_prompt: str = "a photo of a {word}"
    ref_seed: int = 0

    def __post_init__(self):
        from omniportrait.errors import ConfigError

        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"rb reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.feature_pass not in FEATURE_PASSES:
            raise ConfigError(f"rb feature pass must be one of {FEATURE_PASSES}, got {self.feature_pass!r}")
        if self.recompute not in RECOMPUTES:
            raise ConfigError(f"rb recompute must be one of {RECOMPUTES}, got {self.recompute!r}")
        if self.mask not in MASK_SOURCES:
            raise ConfigError(f"rb mask must be one of {MASK_SOURCES}, got {self.mask!r}")
        if self.redetect_every < 0:
            raise ConfigError(f"rb redetect interval must be >= 0 (0: never), got {self.redetect_every}")
        if not 0.0 <= self.start <= 1.0:
            raise ConfigError(f"rb start u must be in [0, 1], got {self.start}")
        if self.gradient_interval < 1:
            raise ConfigError(f"rb gradient interval must be >= 1, got {self.gradient_interval}")
        if self.dift_ensemble < 1 or self.mask_iterations < 0:
            raise ConfigError("dift ensemble must be >= 1 and mask iterations >= 0")
        if not 0 <= self.ref_timestep < 1000:
            raise ConfigError(f"reference timestep must be in [0, 999], got {self.ref_timestep}")

    def active_at(self, timestep: int, num_train_timesteps: int = 1000) -> bool:
        """Eq. 11: guidance on when ``t <= t̂ = u·T``."""
        from omniportrait.guidance.noise import guidance_active

        return self.enabled and guidance_active(timestep, self.start, num_train_timesteps)
