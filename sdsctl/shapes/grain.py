"""Grain codes: noise that the shapes VAE can draw and guidance cannot turn into blotches.

Why this exists. The world's noise is random, so a decoder trained with L1 + L2 can only
draw its mean: noisy renders come back nearly clean, and a UNet trained on their encoder
latents learns ``noisy`` as random displacements of the latents that carry the shape.
Classifier-free guidance multiplies those displacements into coloured blotches that lose
the shape (``docs/shapes-prior.md``). The world's latents barely use one of the four latent
directions (the smallest eigenvalue of the latent cells' covariance is about 0.03, against
1.5 to 17 for the others), so a code along it can never be mistaken for content. The
decoder is fine-tuned to draw a random per-cell code along that direction as a coarse grey
grain, saturating at ``code_max``, so that guidance overshooting along the code makes the
grain stronger and never moves the shape; the world's noisy images then reach the UNet as
the clean scene's latents plus such a code (the encoder, which EHC back-propagates
through, is left as smooth as it was).

A code is a field ``c`` of ``[n, 8, 8]`` values in units of the latents' standard
deviation: latents ``z + std * c * u`` decode to the image plus a grey offset of
``per_code * clamp(c, -code_max, code_max)`` per cell, Gaussian-blurred (sigma 2 px) as
the world blurs its own coarse noise.
"""

from __future__ import annotations

import numpy as np
import torch

from . import world

#: grey offset (image units in [0, 1]) per unit of code
PER_CODE = 0.13
#: codes beyond this many units draw no stronger grain
CODE_MAX = 1.5
#: the world's coarse noise is blurred this much (``world.degrade``)
BLUR_SIGMA = 2.0


def least_used_direction(latents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The unit direction of latent space that the cells of ``latents`` ``[n, c, h, w]`` vary
    least along (the smallest eigenvector of their ``c x c`` covariance), and the latents'
    overall standard deviation (the unit codes are measured in)."""
    cells = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    _, vectors = torch.linalg.eigh(torch.cov(cells.T))
    u = vectors[:, 0].float()
    return u * torch.sign(u[u.abs().argmax()]), float(latents.std())


def random_codes(amplitude: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Codes ``[n, size, size]``: independent N(0, 1) per cell times each image's ``amplitude`` ``[n]``."""
    return amplitude.reshape(-1, 1, 1) * torch.randn(len(amplitude), size, size, generator=generator)


def amplitude_for_strength(strength: torch.Tensor) -> torch.Tensor:
    """The code amplitude whose grain matches the world's coarse noise at a noise ``strength``
    in [0, 1] (``world.degrade``: per-cell sigma ``(0.06 + 0.04 s) * 1.6``)."""
    return (0.06 + 0.04 * strength) * 1.6 / PER_CODE


def displace(z: torch.Tensor, codes: torch.Tensor, direction: torch.Tensor, std: float) -> torch.Tensor:
    """Latents ``z`` ``[n, c, h, w]`` plus the codes ``[n, h, w]`` along ``direction``."""
    return z + std * codes[:, None] * direction.to(z).reshape(1, -1, 1, 1)


def grain(codes: torch.Tensor, image_size: int, per_code: float = PER_CODE, code_max: float = CODE_MAX) -> torch.Tensor:
    """The grey offset ``[n, 3, image_size, image_size]`` (in the VAE's [-1, 1] units) that
    the decoder is taught to draw for ``codes``."""
    factor = image_size // codes.shape[-1]
    cells = per_code * codes.clamp(-code_max, code_max)
    up = cells.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    # the world's own blur (edge padding), the images as channels of one array
    blurred = world._gaussian_blur(up.permute(1, 2, 0).detach().cpu().numpy(), BLUR_SIGMA)
    offset = torch.from_numpy(np.ascontiguousarray(blurred)).permute(2, 0, 1).to(codes)
    return 2 * offset[:, None].expand(-1, 3, -1, -1)


def training_amplitudes(n: int, generator: torch.Generator, high: float = 10.0) -> torch.Tensor:
    """Code amplitudes for the decoder's grain rows: half in the world's range (0.25 to 3),
    half beyond it (3 to ``high``), where the target grain is saturated, so that a UNet
    overshooting along the code under guidance meets a decoder that still draws the shape."""
    r = torch.rand(n, generator=generator)
    in_range = torch.arange(n) % 2 == 0
    return torch.where(in_range, 0.25 + 2.75 * r, 3.0 + (high - 3.0) * r)


def off_manifold(z: torch.Tensor, direction: torch.Tensor, std: float, rms_range: tuple[float, float],
                 generator: torch.Generator) -> torch.Tensor:
    """Latents ``z`` moved by random Gaussian deviations with no component along ``direction``.

    Each image's deviation has an rms drawn uniformly from ``rms_range`` (in units of the
    latents' spread ``std``). Sampled latents deviate from the encoder's in such ways; drawn
    by the decoder from before the grain stage, they anchor the tuned decoder to draw them as
    it did, so that learning the grain does not change how it draws everything else.
    """
    u = direction.to(z).reshape(1, -1, 1, 1)
    d = torch.randn(z.shape, generator=generator).to(z)
    d = d - (d * u).sum(1, keepdim=True) * u
    rms = rms_range[0] + (rms_range[1] - rms_range[0]) * torch.rand(len(z), generator=generator).to(z)
    return z + d * (std * rms / d.flatten(1).pow(2).mean(1).sqrt()).reshape(-1, 1, 1, 1)
