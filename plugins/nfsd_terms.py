"""NFSD's two terms at one timestep, shared by guidances ``nfsd`` and ``robust-nfsd``.

Not a plugin (no entry point): the base class both guidance plugins derive from, so that
neither imports the other. With the prompt y, the empty prompt ∅ and the recipe's
``negative_prompt`` y_neg (Katzir et al. 2023, arXiv 2310.17590)::

    δ_C = ε(z_t; y) − ε(z_t; ∅)                                    (classifier)
    δ_D = ε(z_t; ∅)                         if t < threshold       (correction)
        = ε(z_t; ∅) − ε(z_t; y_neg)         otherwise

All rows of a step go through the UNet in one batched call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, InvalidConfig
from sdsctl.diffusion import eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch

#: The negative prompt of the NFSD paper (the bundled NFSD recipes' ``negative_prompt``): its
#: words are part of the shapes world's vocabulary.
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


class NFSDConfig(ComponentConfig):
    name: str = "nfsd"
    guidance_scale: float = Field(7.5, ge=0, description="scale s of the classifier term")
    correction_scale: float = Field(1.0, ge=0, description="scale of the correction term δ_D")
    threshold: int = Field(200, ge=0, description="below this timestep δ_D = ε(z_t; ∅)")


class NFSDTerms(Guidance):
    """δ_C and δ_D at a timestep, and NFSD's score from them; ``score`` is the subclass's."""

    Config = NFSDConfig
    gives_denoised = True
    unconditional_rows = True

    @classmethod
    def check_negative_prompt(cls, config, recipe, model) -> None:
        if not recipe.negative_prompt.strip() and config.threshold < model.num_train_timesteps:
            raise InvalidConfig(
                f"the recipe's negative_prompt is empty, so NFSD's correction ε(∅) − ε(y_neg) is zero for "
                f"t >= {config.threshold}. Set negative_prompt (the NFSD paper's: {NFSD_NEGATIVE_PROMPT!r}), "
                f"or threshold: {model.num_train_timesteps} to use ε(∅) at every t")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.uncond = ctx.embeddings("")
        self.cond = ctx.embeddings(ctx.recipe.prompt)
        self.negative = ctx.embeddings(ctx.recipe.negative_prompt)
        # the batched call's embedding rows, concatenated once: ε(∅), ε(y), and at a large t ε(y_neg)
        self.rows = {True: torch.cat([self.uncond, self.cond, self.negative]),
                     False: torch.cat([self.uncond, self.cond])}

    def noised(self, z: torch.Tensor, t: int) -> torch.Tensor:

        eps = self.ctx.randn(z.shape, z.dtype)
        return self.ctx.prior.add_noise(z, eps, t)

    def terms(self, z_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ε(z_t; ∅), δ_C, δ_D) at one timestep, from one batched UNet call."""
        import torch

        large = t >= self.config.threshold
        rows = self.rows[large]
        preds = self.ctx.prior.predict_noise(torch.cat([z_t] * len(rows)), t, rows).chunk(len(rows))
        return preds[0], preds[1] - preds[0], (preds[0] - preds[2] if large else preds[0])

    def nfsd(self, z: torch.Tensor, t: int, correction_scale: float) -> GuidanceOutput:
        """s·δ_C + correction_scale·δ_D at t, with the CFG prediction's denoised estimate."""
        z_t = self.noised(z, t)
        uncond, classifier, correction = self.terms(z_t, t)
        c = self.config.guidance_scale * classifier
        d = correction_scale * correction
        return GuidanceOutput(score=c + d, norms={"classifier": c.norm(), "correction": d.norm()},
                              timesteps={"t": t},
                              denoised=lambda: eps_to_x0(uncond + c, z_t, self.ctx.prior.alphas_cumprod[t]))
