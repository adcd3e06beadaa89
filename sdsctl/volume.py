"""Volume rendering inside a bounding sphere (NeRF, Mildenhall et al. 2020, eq. 3).

Rays are clipped to the sphere of radius ``radius`` around the origin, sampled at ``n``
stratified depths (one uniform jitter per bin from the run's generator, so a run stays
reproducible and resumable; no jitter for evaluation views), and composited front to back:

    αᵢ = 1 − exp(−σᵢ δᵢ),   Tᵢ = ∏_{j<i} (1 − αⱼ),   wᵢ = Tᵢ αᵢ,   C = Σ wᵢ cᵢ + (1 − Σ wᵢ) · background

which is threestudio's ``nerfacc.render_weight_from_density`` and ``accumulate_along_rays``
(threestudio-project/threestudio@28d9d80, threestudio/models/renderers/nerf_volume_renderer.py)
without nerfacc's packed samples: every ray has the same number of samples, so the whole
batch is three dense tensors. ``tests/test_volume.py`` renders an analytic ball and compares
its silhouette and opacity with the closed form.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sphere_interval(origins: Tensor, directions: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Where unit rays enter and leave the sphere: (near, far, hit), each ``[N]``; near ≥ 0
    (a camera inside the sphere starts at its centre); rays that miss get near = far."""
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    hit = disc > 0
    root = disc.clamp_min(0).sqrt()
    near = (-b - root).clamp_min(0)
    far = torch.where(hit, -b + root, near)
    return near, far, hit


def stratified_depths(near: Tensor, far: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` depths per ray ``[N, n]``, one per equal bin of [near, far]: at a uniform random
    place in the bin with ``generator``, at its middle without."""
    bins = torch.arange(n, device=near.device, dtype=near.dtype)
    if generator is None:
        offsets = torch.full((near.shape[0], n), 0.5, device=near.device, dtype=near.dtype)
    else:
        offsets = torch.rand((near.shape[0], n), generator=generator, device=generator.device).to(near.device)
    return near[:, None] + (far - near)[:, None] * (bins + offsets) / n


def composite(density: Tensor, values: Tensor, depths: Tensor, far: Tensor,
              background: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rendered values ``[N, C]``, the accumulated opacity ``[N]`` and the weights ``[N, S]``.

    ``density`` ``[N, S]`` (σ ≥ 0), ``values`` ``[N, S, C]``, ``depths`` ``[N, S]`` increasing,
    ``far`` ``[N]`` (the last sample's interval ends there), ``background`` ``[N, C]`` or ``[C]``.
    """
    deltas = torch.cat([depths[:, 1:] - depths[:, :-1], far[:, None] - depths[:, -1:]], dim=1).clamp_min(0)
    tau = density * deltas
    alpha = 1 - torch.exp(-tau)
    # Tᵢ = exp(−Σ_{j<i} σⱼδⱼ): the exclusive cumulative sum, stable where the product underflows
    transmittance = torch.exp(-torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1].cumsum(dim=1)], dim=1))
    weights = transmittance * alpha
    opacity = weights.sum(dim=1)
    rendered = (weights[..., None] * values).sum(dim=1) + (1 - opacity)[:, None] * background
    return rendered, opacity, weights
