"""Guidance ``vsd``: Variational Score Distillation (ProlificDreamer, Wang et al. 2023, arXiv 2305.16213).

A LoRA on the denoiser's attention projections (through ``peft``) is trained alongside θ with
the standard diffusion loss on the current image, so that it learns the score of the
distribution the optimization is currently in. The score replaces SDS's sampled noise by
that estimate (eq. 9 of the paper, 2-D: no camera conditioning)::

    score = ε_pretrained,CFG(z_t; y, t) − ε_LoRA(z_t; y, t)

The LoRA starts as the identity (B = 0), drawn from the run's generator, and leaves the
shared UNet when the run ends (``close``). The pretrained rows (unconditional -- the
recipe's ``negative_prompt`` -- and conditional) go through the UNet in one batched call
with the adapter disabled; the LoRA's estimate needs a second call with it enabled, and each
LoRA update a third (with gradients) — they cannot share a call since the weights differ:
2 + ``lora_updates`` model calls per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch

ADAPTER = "sdsctl_vsd"


class VSD(Guidance):
    gives_denoised = True
    unconditional_rows = True

    class Config(ComponentConfig):
        name: str = "vsd"
        guidance_scale: float = Field(7.5, ge=0, description="CFG scale of the pretrained estimate")
        lora_rank: int = Field(4, gt=0, description="rank of the LoRA matrices")
        lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator (default: the rank)")
        lora_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the LoRA")
        lora_updates: int = Field(1, ge=0, description="LoRA updates per step")
        target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        from peft import LoraConfig

        self.unet = unet = ctx.prior.denoiser  # a UNet, or the SD3/FLUX transformer: peft adapts either
        if ADAPTER in getattr(unet, "peft_config", {}):
            unet.delete_adapters(ADAPTER)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                    init_lora_weights=True, target_modules=list(config.target_modules)),
                         adapter_name=ADAPTER)
        self.lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        g = ctx.generator
        with torch.no_grad():
            for n, p in self.lora.items():  # LoRA's usual init, but from the run's generator: A random, B zero
                p.data = p.data.float()
                if "lora_A" in n:
                    bound = p.shape[1] ** -0.5
                    p.copy_(torch.rand(p.shape, generator=g, device=g.device) * 2 * bound - bound)
                else:
                    p.zero_()
                p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.lora.values(), lr=config.lora_lr)
        self.uncond = ctx.embeddings(ctx.recipe.negative_prompt)
        self.cond = ctx.embeddings(ctx.recipe.prompt)
        self.pair = torch.cat([self.uncond, self.cond])  # the pretrained model's CFG rows, concatenated once

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior = self.ctx.prior
        eps = self.ctx.randn(z.shape, z.dtype)
        z_t = prior.add_noise(z, eps, times.t)
        with torch.no_grad():
            self.unet.disable_adapters()
            e_uncond, e_cond = prior.predict_noise(torch.cat([z_t, z_t]), times.t, self.pair).chunk(2)
            self.unet.enable_adapters()
            e_lora = prior.predict_noise(z_t, times.t, self.cond)
        pretrained = cfg(e_uncond, e_cond, self.config.guidance_scale)
        lora_loss = self.update_lora(z.detach())
        return GuidanceOutput(
            score=pretrained - e_lora,
            norms={"pretrained": pretrained.norm(), "lora": e_lora.norm(), "lora_loss": lora_loss},
            timesteps={"t": times.t},
            denoised=lambda: eps_to_x0(pretrained, z_t, prior.alphas_cumprod[times.t]),
        )

    def update_lora(self, z: torch.Tensor) -> torch.Tensor:
        """The LoRA's diffusion loss on the current image, ``lora_updates`` Adam steps (a 0-dim
        tensor: the loop fetches it with the step's other numbers, no sync here)."""
        import torch
        import torch.nn.functional as F

        prior = self.ctx.prior
        loss = torch.zeros((), device=z.device)
        with torch.enable_grad():
            for _ in range(self.config.lora_updates):
                t = self.ctx.randint(0, prior.num_train_timesteps)
                eps = self.ctx.randn(z.shape, z.dtype)
                pred = prior.predict_noise(prior.add_noise(z, eps, t), t, self.cond)
                loss = F.mse_loss(pred, eps)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return loss.detach()

    def close(self) -> None:
        if ADAPTER in getattr(self.unet, "peft_config", {}):
            self.unet.delete_adapters(ADAPTER)

    def state_dict(self):
        return {"lora": {n: p.detach().clone() for n, p in self.lora.items()}, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        import torch

        with torch.no_grad():
            for n, p in self.lora.items():
                p.copy_(state["lora"][n])
        self.optimizer.load_state_dict(state["optimizer"])


@sdsctl.hookimpl
def register_guidances(register):
    register("vsd", VSD)
