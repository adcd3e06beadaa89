"""The diffusion formulas sdsctl states once: classifier-free guidance, v -> ε, ε -> x̂₀.

Classifier-free guidance (Ho & Salimans 2022), in the form diffusers uses::

    ε̂ = ε(z_t; ∅) + s · (ε(z_t; y) − ε(z_t; ∅))

Note that threestudio's SDS uses ``ε(z_t; y) + s·(ε(z_t; y) − ε(z_t; ∅))``, i.e. scale s + 1
in this form. Every guidance in sdsctl calls :func:`cfg`.

Noising ``z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε`` is the model's own scheduler's ``add_noise``
(``sdsctl.models.base.Prior.add_noise``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cfg(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """``uncond + scale · (cond − uncond)`` (the diffusers form)."""
    return uncond + scale * (cond - uncond)


def _per_row(alpha_bar: Tensor, like: Tensor) -> Tensor:
    return alpha_bar.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def v_to_eps(v: Tensor, z_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """ε from a v-prediction (Salimans & Ho 2022): ``ε = √ᾱ_t · v + √(1 − ᾱ_t) · z_t``.

    ``alpha_bar`` holds ᾱ_t per row of the batch.
    """
    a = _per_row(alpha_bar, z_t)
    return a.sqrt() * v + (1 - a).sqrt() * z_t


def x0_to_eps(x0: Tensor, z_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """ε from a sample prediction: ``ε = (z_t − √ᾱ_t · x̂_0) / √(1 − ᾱ_t)``."""
    a = _per_row(alpha_bar, z_t)
    return (z_t - a.sqrt() * x0) / (1 - a).sqrt()


def eps_to_x0(eps: Tensor, z_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """The one-step denoised estimate ``x̂_0 = (z_t − √(1 − ᾱ_t) · ε̂) / √ᾱ_t`` (DDPM eq. 15;
    HiFA's image target decodes it). ``alpha_bar``: ᾱ_t, one value or one per row."""
    a = _per_row(alpha_bar.reshape(-1).expand(z_t.shape[0]) if alpha_bar.dim() == 0 else alpha_bar, z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(eps: Tensor, z: Tensor, alpha_from: Tensor | float, alpha_to: Tensor | float) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with η = 0) from noise level ᾱ_a to ᾱ_b::

        x̂_0 = (z_a − √(1 − ᾱ_a) · ε̂) / √ᾱ_a,     z_b = √ᾱ_b · x̂_0 + √(1 − ᾱ_b) · ε̂

    With ᾱ_b < ᾱ_a it is a DDIM *inversion* step: what diffusers' ``DDIMInverseScheduler.step``
    computes for an ε-prediction without clipping (``tests/test_beyond.py`` checks the two
    agree), here between any two timesteps rather than a fixed stride.
    """
    a = torch.as_tensor(alpha_from, dtype=torch.float32, device=z.device)
    b = torch.as_tensor(alpha_to, dtype=torch.float32, device=z.device)
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return b.sqrt() * x0 + (1 - b).sqrt() * eps


def ddim_invert(predict, z: Tensor, timesteps: list[int], alphas_cumprod: Tensor) -> tuple[Tensor, Tensor | None]:
    """DDIM-invert ``z`` along ``timesteps`` (increasing; ``z`` is the sample at ``timesteps[0]``).

    ``predict(z, t) -> ε̂`` is called once per step, at the step's source timestep (as in
    LucidDreamer's inversion); returns the sample at ``timesteps[-1]`` and the last ε̂ (None
    for a path of one timestep). One model call per step, each waiting for the one before.
    """
    eps = None
    for a, b in zip(timesteps, timesteps[1:]):
        eps = predict(z, a)
        z = ddim_step(eps, z, alphas_cumprod[a], alphas_cumprod[b])
    return z, eps


def even_path(start: int, end: int, steps: int) -> list[int]:
    """``steps`` + 1 timesteps from ``start`` to ``end``, evenly spaced and rounded (repeats dropped)."""
    if steps < 1:
        raise ValueError(f"a path needs at least one step, got {steps}")
    path = [round(start + (end - start) * i / steps) for i in range(steps + 1)]
    return [t for i, t in enumerate(path) if i == 0 or t != path[i - 1]]
