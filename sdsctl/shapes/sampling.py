"""Drawing images from a prior with diffusers' own ``StableDiffusionPipeline`` and DDIM.

This is how a user sees what a prior can do (``sdsctl sample``) and how the shapes prior is
checked; sdsctl re-implements nothing of the sampler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu", *, local_files_only: bool = True):
    """A ``StableDiffusionPipeline`` with a DDIM scheduler (offline from a local folder by default)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sdsctl.models.base import _quiet_loading

    _quiet_loading()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=local_files_only,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def native_resolution(pipe) -> int:
    """Image side the prior was trained at: the UNet's latent size times the VAE factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], *, steps: int = 50, guidance_scale: float = 7.5,
           negative_prompt: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Images ``[N, H, W, 3]`` in [0, 1]; image ``i`` depends only on ``(prompts[i], seeds[i])``."""
    size = native_resolution(pipe)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        # draw each image's initial noise from its own generator so a batch gives what single runs give
        shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device, pipe.unet.dtype)
        result = pipe(
            chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            latents=latents, output_type="np", eta=0.0,
        )
        out.append(np.asarray(result.images, dtype=np.float32))
    return np.concatenate(out)
