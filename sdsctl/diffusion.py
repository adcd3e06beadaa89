"""The diffusion formulas sdsctl states once: classifier-free guidance, v -> ε, ε -> x̂₀, and
the flow-matching conversion (velocity and σ to ε and ᾱ, the timestep shift; below).

Classifier-free guidance (Ho & Salimans 2022), in the form diffusers uses::

    ε̂ = ε(z_t; ∅) + s · (ε(z_t; y) − ε(z_t; ∅))

Note that threestudio's SDS uses ``ε(z_t; y) + s·(ε(z_t; y) − ε(z_t; ∅))``, i.e. scale s + 1
in this form. Every guidance in sdsctl calls :func:`cfg`.

Noising ``z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε`` is the model's own scheduler's ``add_noise``
(``sdsctl.models.base.Prior.add_noise``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is called: guidance plugins import this module at load
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
    import torch

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


def strided_path(start: int, end: int, stride: int) -> list[int]:
    """Timesteps from ``start`` to ``end`` in steps of ``stride``, the last step shorter
    (LucidDreamer's ``add_noise_with_cfg``: ``next = min(cur + delta_t, end)``); ``[start]``
    when they are equal."""
    if stride < 1:
        raise ValueError(f"a stride must be at least 1, got {stride}")
    return [*range(start, end, stride), end]


# ----------------------------------------------------------------------------- flow matching
#
# A rectified-flow (flow-matching) model -- SD3/3.5, FLUX.1 -- is trained on
#
#     x_σ = (1 − σ)·x₀ + σ·ε,    σ ∈ (0, 1],    target v = ε − x₀,
#
# and predicts v̂(x_σ, σ). The guidance terms are written in the VP convention
# z_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε with an ε-prediction. The two are the same sample up to a scale:
# with s(σ) = √((1 − σ)² + σ²),
#
#     x_σ / s = √ᾱ·x₀ + √(1 − ᾱ)·ε    where    ᾱ(σ) = (1 − σ)² / ((1 − σ)² + σ²),
#
# so a flow prior exposes the VP-equivalent ᾱ table and keeps the VP interface: ``add_noise``
# returns z_t = x_σ / s (the same ε), ``predict_noise`` feeds x_σ = s·z_t to the model at σ
# and returns
#
#     ε̂ = x_σ + (1 − σ)·v̂        (and x̂₀ = x_σ − σ·v̂),
#
# exact when v̂ = ε − x₀. The ε-space SDS residual is then the velocity residual, weighted:
#
#     ε̂ − ε = (1 − σ)·(v̂ − (ε − x₀)),
#
# which is why RFDS (Yang et al. 2024, arXiv 2406.03293) is SDS with w(t) = 1/(1 − σ_t)
# (the ``rfds`` weighting); CFG commutes with the conversion (its weights sum to one). The VP
# x̂₀ = (z_t − √(1 − ᾱ)·ε̂)/√ᾱ of :func:`eps_to_x0` equals x_σ − σ·v̂.
#
# Timesteps: t ∈ {0, ..., N − 1} (N = ``num_train_timesteps``) is the model's own training
# index, σ_u = (t + 1)/N -- the scheduler's training table read from the least noisy end --
# shifted as the model was trained: a static ``shift`` (SD3: σ = shift·σ_u/(1 + (shift − 1)·σ_u),
# already in the table the scheduler builds) or, with ``use_dynamic_shifting`` (FLUX.1-dev),
# the scheduler's ``time_shift(μ, 1, σ_u)`` with μ from the image's sequence length (the
# pipeline's ``calculate_shift``). :func:`flow_sigmas` is the one place this happens. The top
# index t = N − 1 is σ = 1: pure noise, ᾱ = 0.


def flow_sigmas(scheduler, mu: float | None = None) -> Tensor:
    """σ_t for t = 0..N−1 (float32, ascending), from a ``FlowMatchEulerDiscreteScheduler``
    freshly built from the model's config: its training sigmas, shifted as the scheduler shifts
    them (static ``shift`` already applied in its table; ``use_dynamic_shifting``: ``mu`` needed)."""
    import torch

    sigmas = scheduler.sigmas.flip(0).to(torch.float32)  # built descending from 1 to 1/N
    if scheduler.config.use_dynamic_shifting:
        if mu is None:
            raise ValueError("the scheduler shifts dynamically: mu (from the image's sequence length) is needed")
        sigmas = scheduler.time_shift(mu, 1.0, sigmas).to(torch.float32)
    return sigmas


def flow_scale(sigma: Tensor) -> Tensor:
    """s(σ) = √((1 − σ)² + σ²): x_σ = s · z_t."""
    return ((1 - sigma) ** 2 + sigma**2).sqrt()


def flow_alpha_bar(sigma: Tensor) -> Tensor:
    """The VP-equivalent ᾱ(σ) = (1 − σ)² / ((1 − σ)² + σ²)."""
    return (1 - sigma) ** 2 / flow_scale(sigma) ** 2


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """The inverse of :func:`flow_alpha_bar`: σ = √(1 − ᾱ) / (√ᾱ + √(1 − ᾱ))."""
    return (1 - alpha_bar).sqrt() / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())


def flow_noise(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε (``sigma``: one value per row)."""
    s = _per_row(sigma, x0)
    return (1 - s) * x0 + s * eps


def vp_to_flow(z_t: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = s(σ)·z_t: the guidance's VP sample as the flow model's input."""
    return _per_row(flow_scale(sigma), z_t) * z_t


def flow_to_vp(x: Tensor, sigma: Tensor) -> Tensor:
    """z_t = x_σ / s(σ)."""
    return x / _per_row(flow_scale(sigma), x)


def velocity_to_eps(v: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = x_σ + (1 − σ)·v̂."""
    return x + (1 - _per_row(sigma, x)) * v


def velocity_to_x0(v: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """x̂₀ = x_σ − σ·v̂."""
    return x - _per_row(sigma, x) * v


def true_cfg_note(term: str, model) -> str | None:
    """What a guidance term that needs unconditional or negative rows does on a
    guidance-distilled model (``model.guidance_distilled``: FLUX.1-dev, FLUX.1-schnell), for
    its ``check`` to return as a warning; None on a model trained with ordinary CFG."""
    if not model.guidance_distilled:
        return None
    embedded = " (guidance embedding at 1)" if model.guidance_embedded else ""
    return (f"{term} on {model.pipeline} ({model.family}), a guidance-distilled model: its unconditional and "
            f"negative rows run as true classifier-free guidance{embedded} -- each a full model call where "
            "the model alone needs one row, and off the distribution it was distilled on")
