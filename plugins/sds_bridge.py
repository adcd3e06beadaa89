"""Guidance ``sds-bridge``: score distillation as a bridge between image distributions
(McAllister et al. 2024, "Rethinking Score Distillation as a Bridge Between Image
Distributions", arXiv 2406.09417).

SDS transports the current image from a *source* distribution, which it models as the
unconditional one, to the prompt's. The paper calibrates the source with a text description of
the current images' failure modes instead, after a first SDS stage has put the image near the
prompt::

    stage 1 (the schedule's ``warmup`` phase): SDS,  ε_CFG(x_t; y) − ε
    stage 2 (every other phase):  s · (ε(x_t; y + target) − ε(x_t; y + source))

with y + text = ``f"{prompt}, {text}"``, the paper's source text "oversaturated, smooth,
pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed" and target text
"detailed high resolution, high quality, sharp" as defaults, and one scale s for both stages
(the paper's 2-D experiments: 40, stage two from the middle of the run). Use the ``warmup``
schedule to get the first stage; with a schedule without a warm-up phase the bridge acts from
the first step. CFG's unconditional row in stage 1 is the recipe's ``negative_prompt``.

Both rows of a stage go through the UNet in one batched call: one model call per step. The
denoised estimate is that of the stage's guided prediction (stage 2: ε_src + s·(ε_tgt − ε_src)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch

SOURCE_TEXT = "oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"
TARGET_TEXT = "detailed high resolution, high quality, sharp"


class SDSBridge(Guidance):
    gives_denoised = True
    unconditional_rows = True

    class Config(ComponentConfig):
        name: str = "sds-bridge"
        guidance_scale: float = Field(40.0, ge=0, description="s, in both stages (the paper's 2-D experiments: 40)")
        source: str = Field(SOURCE_TEXT, description="the current images' failure modes, appended to the prompt")
        target: str = Field(TARGET_TEXT, description="what they should be instead, appended to the prompt")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        prompt = ctx.recipe.prompt
        self.sds_rows = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), ctx.embeddings(prompt)])
        self.bridge_rows = torch.cat([ctx.embeddings(f"{prompt}, {config.source}"),
                                      ctx.embeddings(f"{prompt}, {config.target}")])

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior, s = self.ctx.prior, self.config.guidance_scale
        eps = self.ctx.randn(z.shape, z.dtype)
        z_t = prior.add_noise(z, eps, times.t)
        stage_one = times.phase == "warmup"
        first, second = prior.predict_noise(torch.cat([z_t, z_t]), times.t,
                                            self.sds_rows if stage_one else self.bridge_rows).chunk(2)
        guided = cfg(first, second, s)
        direction = s * (second - first)
        if stage_one:
            score, norms = guided - eps, {"classifier": direction.norm(), "denoise": (first - eps).norm()}
        else:
            score, norms = direction, {"bridge": direction.norm()}
        return GuidanceOutput(score=score, norms=norms, timesteps={"t": times.t},
                              denoised=lambda: eps_to_x0(guided, z_t, prior.alphas_cumprod[times.t]))


@sdsctl.hookimpl
def register_guidances(register):
    register("sds-bridge", SDSBridge)
