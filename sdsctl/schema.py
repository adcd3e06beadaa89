"""The recipe's types: :class:`Recipe`, its sections' configs, and :class:`ComponentConfig`.

Pure data, validated by pydantic: no files are read and no plugin is asked here. Loading a
recipe -- ``extends:``, ``--set``, finding each section's component, checking it against the
model -- is :mod:`sdsctl.engine.recipe`'s; the components' base classes are
:mod:`sdsctl.components`'s. Both, and the run loop, share these types, so they live below all
of them (``docs/architecture.md``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator


class ComponentConfig(BaseModel):
    """Options of one component; subclasses add fields with their defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str


class OptimizerConfig(BaseModel):
    """How θ follows each step's target z* = z − k·g (k = ``score_scale``, g the weighted score).

    ``fit`` says how far θ moves towards z* in one step:

    * ``adam`` -- one Adam step on the surrogate 0.5·‖z − sg(z*)‖² (its gradient w.r.t. z is
      k·g), then ``inner_steps`` − 1 more Adam steps towards the same target. This is what
      most SDS code does, and it is *not* a full fit: an Adam step moves each parameter by
      about ``lr`` whatever the gradient's size, so it covers a small fraction of the way to
      z* (``fit_fraction`` in metrics.jsonl), and a constant ``score_scale`` cancels in Adam's
      normalisation (it has almost no effect; validation warns).
    * ``full`` -- the study's cuisine 1 ("fully optimize θ to match the score"): θ is fitted
      until the rendering reaches z*. Latent pixels are assigned (θ ← z*); other
      parameterizations take Adam steps until ‖R(θ) − z*‖ ≤ ``fit_tolerance``·‖z − z*‖ or
      ``max_fit_steps`` steps. Here ``score_scale`` amplifies the step (the study's "amplify
      the NFSD score" to need fewer iterations).

    ``fit_space`` says where θ is fitted: ``latent`` (the surrogate above, gradients through
    the VAE encoder for RGB parameterizations), ``image`` (RGB parameterizations only: θ is
    fitted by 0.5·‖x − sg(x*)‖² to a target image x*, no gradient through the encoder) or
    ``both`` (the latent loss plus ``image_weight`` times the image loss). ``image_target``
    says what x* is: ``hifa`` -- HiFA's (Zhu & Zhuang 2023, eq. 7), the decoded one-step
    denoised estimate D(ẑ₀), ẑ₀ = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, given by the guidance; or
    ``decoded-target`` -- the decoded step target D(z*) (sdsctl's own: it pulls the pixels the
    encoder cannot see, its null space, towards the decoder's image of where the score points).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adam"] = "adam"
    lr: float = Field(0.01, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    fit: Literal["adam", "full"] = "adam"
    inner_steps: int = Field(1, ge=1, description="fit: adam -- Adam steps per step towards the same target")
    max_fit_steps: int = Field(50, ge=1, description="fit: full -- the most Adam steps a step's fit may take")
    fit_tolerance: float = Field(0.01, gt=0, lt=1, description="fit: full -- stop when ‖R(θ) − z*‖ ≤ this · ‖z − z*‖")
    score_scale: float = Field(1.0, gt=0, description="k: the target is z − k·g (amplification; fit: full)")
    fit_space: Literal["latent", "image", "both"] = "latent"
    image_target: Literal["hifa", "decoded-target"] = "hifa"
    image_weight: float = Field(0.1, ge=0, description="weight of the image loss when fit_space is both")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class OutputConfig(BaseModel):
    """Where runs go (``dir/<recipe>-<timestamp>/`` unless ``--out``) and how often to save."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: str = "runs"
    preview_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1, description="fetch the steps' numbers from the device every N steps")
    view_size: int = Field(512, ge=0, description="final_<N>.png: the final image enlarged for viewing (0: none)")


class Recipe(BaseModel):
    """A validated recipe; component sections hold their own ``Config`` instances."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: SerializeAsAny[ComponentConfig]
    prompt: str
    negative_prompt: str = ""
    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: int = Field(500, gt=0)
    parameterization: SerializeAsAny[ComponentConfig]
    guidance: SerializeAsAny[ComponentConfig]
    schedule: SerializeAsAny[ComponentConfig]
    weighting: SerializeAsAny[ComponentConfig]
    cameras: SerializeAsAny[ComponentConfig] | None = None  # 3D parameterizations only
    optimizer: OptimizerConfig = OptimizerConfig()
    output: OutputConfig = OutputConfig()
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: bool = Field(False, description="torch.compile the denoiser (static shapes; CUDA graphs on CUDA)")
    channels_last: bool = Field(False, description="NHWC convolution weights (faster on tensor cores)")
    threads: int | None = Field(None, ge=1, description="CPU threads of torch's operations (torch.set_num_threads); "
                                "none: torch's default, one per core")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is empty; say what the image should show")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from sdsctl.devices import ACCEPTED, PATTERN

        if not PATTERN.fullmatch(v):
            raise ValueError(f"expected {ACCEPTED}, got {v!r}")
        return v
