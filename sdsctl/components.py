"""The base classes every component derives from, and the small types they exchange.

A component is a class with a nested pydantic ``Config`` (a :class:`ComponentConfig`:
unknown keys are rejected, the field ``name`` selects the class) holding its options and
their defaults next to its code. The loop builds components as ``cls(config, ctx)`` with the
run's :class:`RunContext`; models, which exist before the context, as ``cls(config)``.

The step these components take part in (``docs/architecture.md``)::

    times  = schedule(step)
    x      = parameterization()
    z      = x if space == "latent" else prior.encode_images(x)
    out    = guidance.score(z.detach(), times)
    g      = weighting(times.t) * out.score
    target = (z - score_scale * g).detach();  loss = 0.5 * ||z - target||^2
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sdsctl.errors import InvalidConfig  # noqa: F401 -- re-exported: components raise it
from sdsctl.modelinfo import ModelInfo  # noqa: F401 -- re-exported: components' checks read it
from sdsctl.schema import ComponentConfig

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import Tensor

    from sdsctl.cameras import Camera
    from sdsctl.models.base import Prior
    from sdsctl.schema import Recipe

@dataclasses.dataclass
class StepTimes:
    """The schedule's answer for one step."""

    t: int  # the step's timestep
    phase: str = "main"  # e.g. "warmup" / "main"; shown in the panel and metrics.jsonl
    #: the lower end of the range ``t`` was drawn from, for a term that measures from it (ASD's
    #: shift; an annealed range moves it); None when the schedule has no range (``linear``)
    t_min: int | None = None
    #: how far the run is, step / steps (0 at the first step; threestudio's ``global_step /
    #: max_steps``), filled in by the loop: terms that anneal a setting read their :class:`Ramp`
    #: at it. Derived from the step index, so a resumed run continues every ramp exactly.
    progress: float = 0.0


class Ramp(BaseModel):
    """A setting that changes over the run, as threestudio's ``[start_step, start, end, end_step]``
    values (``threestudio/utils/misc.py::C``): ``start`` until the fraction ``begin`` of the run,
    ``end`` from ``until`` on, linear between (``begin == until``: a switch at that fraction).
    A recipe may write a number for a constant; ``{start, end}`` ramps over the whole run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: float
    end: float
    begin: float = Field(0.0, ge=0, le=1, description="fraction of the run where the ramp leaves start")
    until: float = Field(1.0, ge=0, le=1, description="fraction of the run where it reaches end")

    @model_validator(mode="before")
    @classmethod
    def _constant(cls, value):
        return {"start": value, "end": value} if isinstance(value, (int, float)) else value

    @model_validator(mode="after")
    def _order(self):
        if self.until < self.begin:
            raise ValueError(f"until ({self.until}) must not come before begin ({self.begin})")
        return self

    def at(self, progress: float) -> float:
        """The value at ``progress`` (step / steps)."""
        if self.until == self.begin:
            return self.start if progress < self.begin else self.end
        fraction = min(max((progress - self.begin) / (self.until - self.begin), 0.0), 1.0)
        return self.start + (self.end - self.start) * fraction

    @property
    def constant(self) -> bool:
        return self.start == self.end


@dataclasses.dataclass
class GuidanceOutput:
    """A guidance's answer for one step."""

    score: Tensor  # same shape as z; float32
    norms: dict[str, float | Tensor]  # e.g. {"classifier": .., "correction": ..}; 0-dim tensors are fine
    timesteps: dict[str, int]  # every timestep used, e.g. {"t": 700, "t_correction": 120}
    #: the one-step denoised estimate ẑ₀ = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t of the step's guided
    #: prediction (``sdsctl.diffusion.eps_to_x0``); HiFA's image target decodes it. Either the
    #: tensor or a zero-argument function computing it: the loop calls the function only when
    #: the recipe's fit needs the estimate (``image_target: hifa``), so the other steps skip its
    #: arithmetic. None for a guidance without one (``gives_denoised = False``).
    denoised: Tensor | Callable[[], Tensor] | None = None

    def denoised_estimate(self) -> Tensor | None:
        """ẑ₀ as a tensor (computed now when ``denoised`` is a function), or None."""
        return self.denoised() if callable(self.denoised) else self.denoised


@dataclasses.dataclass
class RunContext:
    """Everything a component may use during a run."""

    prior: Prior  # the frozen model, on ``device``
    recipe: Recipe  # the validated recipe
    device: torch.device
    dtype: torch.dtype  # compute dtype of the prior's forward passes
    generator: torch.Generator  # all randomness of the run (seeded by recipe.seed), on ``device``
    steps: int
    #: host-side randomness (timesteps): a CPU generator, so that drawing an integer never waits
    #: for the device. On the CPU it is ``generator`` itself: one stream, so a CPU run draws
    #: its timesteps and its noise from the same sequence.
    host_generator: torch.Generator | None = None
    _embeddings: dict[str, Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        import torch

        if self.host_generator is None:
            self.host_generator = self.generator if self.generator.device.type == "cpu" else \
                torch.Generator().manual_seed(self.generator.initial_seed())

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high) from the host generator: no device synchronisation."""
        import torch  # here, not at the top: plugins import this module without torch (cheap once loaded)

        return int(torch.randint(low, high, (1,), generator=self.host_generator))

    def rand(self) -> float:
        """A float in [0, 1) from the host generator: no device synchronisation."""
        import torch

        return float(torch.rand((), generator=self.host_generator))

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal noise of ``shape`` from the run's generator, on its device (float32
        unless ``dtype``): every draw a component makes from it keeps a run reproducible and
        resumable."""
        import torch

        g = self.generator
        return torch.randn(shape, generator=g, device=g.device, dtype=dtype or torch.float32)

    def embeddings(self, prompt: str) -> Tensor:
        """Text embeddings ``[1, L, D]`` of ``prompt``, computed once per run and cached."""
        if prompt not in self._embeddings:
            self._embeddings[prompt] = self.prior.encode_prompts([prompt])
        return self._embeddings[prompt]


class Component:
    """What every component has: its validated ``config`` and the run's ``ctx``."""

    kind: ClassVar[str] = "component"
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig, ctx: RunContext):
        self.config = config
        self.ctx = ctx

    @classmethod
    def check(cls, config: ComponentConfig, recipe: Recipe, model: ModelInfo) -> list[str] | None:
        """Validate options against the model and the recipe, before any weights load.

        Raise :class:`InvalidConfig` (with ``field``) for a bad option; return warnings (one
        sentence each) for options that run but mean less than they say on this model (e.g. a
        guidance scale on a guidance-distilled model). The default accepts everything.
        """


class Model(Component):
    """A frozen text-to-image model; ``load`` returns the run's :class:`~sdsctl.models.base.Prior`."""

    kind = "model"

    def __init__(self, config: ComponentConfig):  # built before the run context exists
        self.config = config

    def describe(self) -> ModelInfo:
        """Read the model's configuration (no weights) for validation."""
        raise NotImplementedError

    def load(self, device: torch.device, dtype: torch.dtype) -> Prior:
        raise NotImplementedError


def _define_parameterization() -> type:
    """Make :class:`Parameterization`; see ``__getattr__`` below for why on first use."""
    import torch

    class Parameterization(torch.nn.Module, Component):
        """Holds θ and renders it: latents ``[1, C, h, w]`` or RGB in [0, 1] ``[1, 3, H, W]``."""

        kind = "parameterization"
        space: ClassVar[str] = "latent"  # "latent" or "rgb"
        #: a 3D scene: rendered from a camera the loop sets each step (``camera``), judged on
        #: held-out views; it provides ``view(camera, size)``, ``render_size``, ``out_size``,
        #: ``mesh_grid()``, ``surface_colours(points)`` and ``last_regularizer`` (docs/3d.md)
        scene: ClassVar[bool] = False

        @classmethod
        def space_for(cls, config: ComponentConfig) -> str:
            """What a parameterization with ``config`` renders: ``latent`` or ``rgb`` (the class's
            ``space`` unless an option chooses, as ``nerf``'s ``space``)."""
            return cls.space

        def __init__(self, config: ComponentConfig, ctx: RunContext):
            torch.nn.Module.__init__(self)
            Component.__init__(self, config, ctx)

        def initialize(self) -> None:
            """Set θ's starting value (a fresh run only; a resumed run loads its state)."""

        def parameter_groups(self, lr: float) -> list[dict[str, Any]] | None:
            """Adam's parameter groups when some of θ learns at another rate than ``lr``
            (``optimizer.lr``): ``[{"params": [...]}, {"params": [...], "lr": ...}]`` covering
            every parameter once, the first group at ``lr``; None (the default): one group."""
            return None

        def assign(self, target: Tensor) -> bool:
            """Set θ so that it renders ``target`` exactly, if this parameterization can (a full
            fit in one move: ``optimizer.fit: full``); return whether it did. ``target`` is in the
            space this parameterization renders. The default cannot."""
            return False

        def image(self) -> Tensor:
            """The current image as float RGB ``[3, H, W]`` in [0, 1], without gradients."""
            with torch.no_grad():
                x = self()
                if self.space == "latent":
                    x = self.ctx.prior.decode_latents(x)
                return x[0].float().clamp(0, 1)

    Parameterization.__qualname__ = "Parameterization"
    return Parameterization


class Guidance(Component):
    """Turns latents into a latent-space score.

    ``score`` is called under ``torch.no_grad()``; a guidance that trains something of its
    own (e.g. VSD's LoRA) enables gradients for that part itself. A guidance with state
    overrides ``state_dict``/``load_state_dict`` so that ``sdsctl resume`` restores it.
    """

    kind = "guidance"
    #: whether ``score`` fills ``GuidanceOutput.denoised`` (HiFA's image target needs it)
    gives_denoised: ClassVar[bool] = False
    #: whether the term evaluates unconditional or negative-prompt rows (ε(∅), ε(y_neg)) -- the
    #: rows CFG needs. On a guidance-distilled model (FLUX.1) they run as "true CFG" rows, off
    #: the distribution the model was distilled on; validation warns about it for every term
    #: that says True here (``sdsctl.diffusion.true_cfg_note``), so a term need not check itself.
    unconditional_rows: ClassVar[bool] = False

    def score(self, z: Tensor, times: StepTimes) -> GuidanceOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Undo what the guidance did to the shared prior (e.g. VSD's LoRA); called when the
        run ends, however it ends. The default does nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Schedule(Component):
    """Gives step ``step`` (0-based) its timestep and phase."""

    kind = "schedule"


class TimestepRange(ComponentConfig):
    """Options of a schedule that takes its timesteps from ``t_min``..``t_max`` (inclusive);
    its ``check`` asks the model whether ``t_max`` is one of its timesteps
    (``model.check_timestep(config.t_max, "t_max")``)."""

    t_min: int = Field(20, ge=0, description="smallest timestep (inclusive)")
    t_max: int = Field(980, ge=0, description="largest timestep (inclusive)")

    @field_validator("t_max")
    @classmethod
    def _order(cls, v: int, info: ValidationInfo) -> int:
        t_min = info.data.get("t_min")
        if t_min is not None and v <= t_min:
            raise ValueError(f"t_max ({v}) must be greater than t_min ({t_min})")
        return v

    def __call__(self, step: int) -> StepTimes:
        raise NotImplementedError


class Weighting(Component):
    """w(t), from the model's ``alphas_cumprod`` (kept on the CPU here: no device sync)."""

    kind = "weighting"

    def __init__(self, config: ComponentConfig, ctx: RunContext):
        super().__init__(config, ctx)
        self.alpha_bar = ctx.prior.alphas_cumprod.detach().double().cpu()

    def __call__(self, t: int) -> float:
        raise NotImplementedError


class Cameras(Component):
    """Where a 3D scene is seen from: a camera per step and the held-out views (docs/3d.md).

    Draw randomness from ``self.ctx.rand()`` (the host generator): a resumed run then draws
    the same cameras, and no draw waits for the device."""

    kind = "cameras"

    def sample(self, step: int) -> Camera:
        """The camera of step ``step`` (0-based)."""
        raise NotImplementedError

    def evaluation(self) -> list[Camera]:
        """The fixed held-out views the result is judged on, the front view first."""
        raise NotImplementedError

    @property
    def view_prompts(self) -> bool:
        """Whether the prompt gets DreamFusion's view words (``, front view``) per camera."""
        return False


class Metric(Component):
    """A number (or a few) computed on the final image; goes into ``summary.json``."""

    kind = "metric"
    #: the numbers its reading holds (``compare``/``sweep --rank-by NAME.KEY`` names them), so
    #: that a misspelled ``--rank-by`` is refused before any run; None: not declared (not checked)
    keys: ClassVar[tuple[str, ...] | None] = None
    #: the key of its reading whose True/False is a run's verdict (the shapes judge's
    #: ``match``): compare and sweep count it per recipe, write it under each image and rank by
    #: it by default; None: the metric gives no verdict. The first installed metric with one is used.
    verdict: ClassVar[str | None] = None
    #: how tables and pages name the verdict: ``column`` (the count's heading), ``rate`` (what a
    #: ranking says it ranks by), ``yes``/``no`` (under an image), ``none`` (a run it does not judge)
    verdict_words: ClassVar[dict[str, str]] = {"column": "verdict", "rate": "the verdict rate", "yes": "yes",
                                               "no": "no", "none": "n/a"}
    #: the keys summarized per recipe as medians beside the verdict (compare.md's first table):
    #: key -> (label, format), in order
    headline: ClassVar[dict[str, tuple[str, str]]] = {}
    #: the key that breaks ties between equal verdict rates (lower first), or None
    tie_break: ClassVar[str | None] = None
    #: keys of its reading where lower is better (``--rank-by`` without ``:min``/``:max``)
    lower_is_better: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def applies_to(cls, prior: Prior) -> bool:
        """Whether this metric makes sense for this model (e.g. a judge of the shapes world)."""
        return True

    def __call__(self, image: Tensor, prompt: str) -> dict[str, Any]:
        """``image``: float RGB ``[3, H, W]`` in [0, 1]."""
        raise NotImplementedError

    @classmethod
    def reading(cls, image: Any, prompt: str) -> str | None:
        """What this metric sees in ``image`` for ``prompt``, in a few words, for a report on a
        run's intermediate images (``sdsctl doctor`` quotes it at the warm-up's end), or None
        when it has nothing to say -- the default. No model and no run context are at hand:
        ``image`` is a path, a PIL image, an ``[H, W, 3]`` array or a ``[3, H, W]`` tensor
        (``sdsctl.engine.imagestats.as_array`` reads any of them)."""
        return None

    @classmethod
    def prompts(cls) -> list[str] | None:
        """The prompts of the world this metric judges (the shapes judge: every caption of the
        shapes world), or None -- the default. ``sdsctl compare`` and ``sdsctl sweep`` draw their
        default (prompt, seed) pairs from the first installed metric that has some."""
        return None


class Logger(Component):
    """Receives a run as it happens -- each step's record, the preview images, the final
    summary -- and sends it somewhere (TensorBoard, Weights & Biases, ...).

    Chosen on the command line (``sdsctl run RECIPE --log NAME``), not in the recipe: where a
    run's numbers go does not change the run. Built as ``cls(cls.Config(name=NAME), run_dir,
    recipe)`` before the run starts -- open files and connections in :meth:`start`, when the
    run directory exists. A logger that raises is switched off with a warning; the run goes on.
    """

    kind = "logger"

    # no RunContext: loggers see records only
    def __init__(self, config: ComponentConfig, run_dir: Path, recipe: Recipe):
        self.config = config
        self.run_dir = run_dir
        self.recipe = recipe

    @classmethod
    def missing(cls) -> str | None:
        """Why this logger cannot run here -- e.g. its library is not installed, and the
        ``pip install`` that fixes it -- or None when it can. The run then goes on without it."""
        return None

    def start(self, info: dict[str, Any]) -> None:
        """The run starts (or resumes): ``info`` has ``title``, ``steps``, ``start_step``,
        ``device`` and ``run_dir``."""

    def step(self, record: dict[str, Any]) -> None:
        """After every step: the record written to ``metrics.jsonl`` (``step``, ``phase``, ``t``,
        ``timesteps``, ``weight``, ``loss``, ``norms``, ``lr``, ...)."""

    def preview(self, step: int, image: Tensor) -> None:
        """Every ``output.preview_every`` steps: the current image, float RGB ``[3, H, W]`` in [0, 1]."""

    def summary(self, summary: dict[str, Any]) -> None:
        """When the run has ended (completed, interrupted or failed): ``summary.json``'s content."""

    def close(self) -> None:
        """Flush and release; called once, last."""


#: kind (plural, as in ``sdsctl plugins --json``) -> (hook name, name of its base class here)
KINDS: dict[str, tuple[str, str]] = {
    "models": ("register_models", "Model"),
    "families": ("register_families", "Prior"),
    "parameterizations": ("register_parameterizations", "Parameterization"),
    "guidances": ("register_guidances", "Guidance"),
    "schedules": ("register_schedules", "Schedule"),
    "weightings": ("register_weightings", "Weighting"),
    "cameras": ("register_cameras", "Cameras"),
    "metrics": ("register_metrics", "Metric"),
    "loggers": ("register_loggers", "Logger"),
}


def base_class(kind: str) -> type:
    """The class every component of ``kind`` derives from (``"parameterizations"`` and
    ``"families"``: imports torch)."""
    if kind == "families":  # the models layer's interface, not a component with a Config
        from sdsctl.models.base import Prior

        return Prior
    return getattr(sys.modules[__name__], KINDS[kind][1])


def __getattr__(name: str) -> Any:
    """``Parameterization`` derives from ``torch.nn.Module``, so it is made on first use: this
    module is imported by every plugin, and ``sdsctl --help`` (which loads them all) would
    otherwise wait for torch. ``from sdsctl.components import Parameterization`` works as
    ever; it imports torch at that moment."""
    if name == "Parameterization":
        globals()[name] = cls = _define_parameterization()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
