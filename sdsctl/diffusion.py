"""The diffusion formulas sdsctl states once: classifier-free guidance, v -> ε, ε -> x̂₀.

Classifier-free guidance (Ho & Salimans 2022), in the form diffusers uses::

    ε̂ = ε(z_t; ∅) + s · (ε(z_t; y) − ε(z_t; ∅))

Note that threestudio's SDS uses ``ε(z_t; y) + s·(ε(z_t; y) − ε(z_t; ∅))``, i.e. scale s + 1
in this form. Every guidance in sdsctl calls :func:`cfg`.

Noising ``z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε`` is the model's own scheduler's ``add_noise``
(``sdsctl.models.base.Prior.add_noise``).
"""

from __future__ import annotations

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
