"""Guidance ``nfsd``: Noise-Free Score Distillation (Katzir et al. 2023, arXiv 2310.17590).

NFSD splits the CFG score into a classifier term and a domain-correction term and drops
the sampled noise that makes SDS over-smooth::

    δ_C = ε(z_t; y) − ε(z_t; ∅)                                    (classifier)
    δ_D = ε(z_t; ∅)                         if t < 200             (correction)
        = ε(z_t; ∅) − ε(z_t; y_neg)         otherwise
    score = s · δ_C + correction_scale · δ_D

No sampled noise ε is subtracted. y_neg is the recipe's ``negative_prompt`` (the one meaning
it has for every guidance: what the image should not look like; SDS and VSD put it in CFG's
unconditional row); the bundled NFSD recipes set the paper's, :data:`NFSD_NEGATIVE_PROMPT`.
All rows go through the UNet in one batched call: one model call per step (two rows below
t = 200, three above). The study's first cuisine scales δ_D by 0.1. The denoised estimate
handed to HiFA's image target is that of the CFG prediction ε(∅) + s·δ_C at t.

On a guidance-distilled model (FLUX.1) the rows are the same, run as "true CFG" rows (no
guidance input: FLUX.1-dev's embedding at 1): ``check`` says so, since they cost a model
row each where the model alone needs one and are off its training distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sdsctl
from sdsctl.components import GuidanceOutput, StepTimes

from .nfsd_terms import NFSD_NEGATIVE_PROMPT, NFSDConfig, NFSDTerms

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch

__all__ = ["NFSD", "NFSD_NEGATIVE_PROMPT", "NFSDConfig"]


class NFSD(NFSDTerms):
    Config = NFSDConfig

    @classmethod
    def check(cls, config, recipe, model) -> None:
        cls.check_negative_prompt(config, recipe, model)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        return self.nfsd(z, times.t, self.config.correction_scale)


@sdsctl.hookimpl
def register_guidances(register):
    register("nfsd", NFSD)
