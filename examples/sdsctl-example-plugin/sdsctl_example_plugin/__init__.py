"""An example sdsctl plugin: one guidance, one schedule, one metric, one model family and a recipe.

Registered through the ``sdsctl`` entry-point group (``pyproject.toml``); uses only sdsctl's
public API.
"""

from __future__ import annotations

from pydantic import Field, model_validator

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, InvalidConfig, Metric, Schedule, StepTimes
from sdsctl.diffusion import cfg, eps_to_x0


class SDSRescaled(Guidance):
    """SDS with CFG rescale: the guided prediction brought back to the conditional one's spread.

    ε̂ = cfg(ε_∅, ε_y, s);  ε̂_r = φ · ε̂ · std(ε_y) / std(ε̂) + (1 − φ) · ε̂;  score = ε̂_r − ε.
    One model call per step (two rows).
    """

    gives_denoised = True

    class Config(ComponentConfig):
        name: str = "sds-rescaled"
        guidance_scale: float = Field(30.0, ge=0, description="CFG scale s")
        rescale: float = Field(0.7, ge=0, le=1, description="φ: 0 is plain SDS")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.rows = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), ctx.embeddings(ctx.recipe.prompt)])

    def score(self, z, times):
        import torch

        prior, g = self.ctx.prior, self.ctx.generator
        eps = torch.randn(z.shape, generator=g, device=g.device, dtype=z.dtype)
        z_t = prior.add_noise(z, eps, times.t)
        e_uncond, e_cond = prior.predict_noise(torch.cat([z_t, z_t]), times.t, self.rows).chunk(2)
        guided = cfg(e_uncond, e_cond, self.config.guidance_scale)
        phi = self.config.rescale
        rescaled = phi * guided * (e_cond.std() / guided.std().clamp_min(1e-12)) + (1 - phi) * guided
        return GuidanceOutput(score=rescaled - eps, norms={"guided": rescaled.norm()}, timesteps={"t": times.t},
                              denoised=eps_to_x0(rescaled, z_t, prior.alphas_cumprod[times.t]))


class LinearDecay(Schedule):
    """t falls linearly from t_max at the first step to t_min at the last."""

    class Config(ComponentConfig):
        name: str = "linear-decay"
        t_min: int = Field(20, ge=0)
        t_max: int = Field(980, ge=0)

        @model_validator(mode="after")
        def _order(self):
            if self.t_min >= self.t_max:
                raise ValueError(f"t_min ({self.t_min}) must be below t_max ({self.t_max})")
            return self

    @classmethod
    def check(cls, config, recipe, model):
        if config.t_max >= model.num_train_timesteps:
            raise InvalidConfig(f"{config.t_max} is outside the model's timesteps 0..{model.num_train_timesteps - 1}",
                                field="t_max")

    def __call__(self, step):
        fraction = step / max(self.ctx.steps - 1, 1)
        return StepTimes(t=round(self.config.t_max - (self.config.t_max - self.config.t_min) * fraction))


class BrightnessContrast(Metric):
    """Mean brightness and contrast (standard deviation of the grey values) of the final image."""

    class Config(ComponentConfig):  # metrics have no options in a recipe; built as Config(name=...)
        name: str = "brightness-contrast"

    def __call__(self, image, prompt):
        grey = image.mean(dim=0)
        return {"brightness": float(grey.mean()), "contrast": float(grey.std())}


@sdsctl.hookimpl
def register_guidances(register):
    register("sds-rescaled", SDSRescaled)


@sdsctl.hookimpl
def register_schedules(register):
    register("linear-decay", LinearDecay)


@sdsctl.hookimpl
def register_metrics(register):
    register("brightness-contrast", BrightnessContrast)


@sdsctl.hookimpl
def register_recipes(register):
    from pathlib import Path

    register("example-rescaled", Path(__file__).with_name("example.yaml"))  # package data


@sdsctl.hookimpl
def register_families(register):
    from .family import ExamplePrior  # torch and diffusers: imported when a model is looked up

    register("example-tiny", ExamplePrior)
