"""Volume rendering against closed forms: a ball of constant density, seen through the rays
of a camera, has the silhouette and opacity 1 − exp(−σ · chord) the geometry gives."""

from __future__ import annotations

import math

import torch

from sdsctl.cameras import Camera
from sdsctl.volume import composite, sphere_interval, stratified_depths


def test_sphere_interval_is_where_rays_enter_and_leave():
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    directions = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    near, far, hit = sphere_interval(origins, directions, 1.0)
    assert hit.tolist() == [True, False, True]
    assert torch.allclose(near, torch.tensor([2.0, near[1], 0.0]))
    assert torch.allclose(far[[0, 2]], torch.tensor([4.0, 1.0]))
    assert near[1] == far[1]  # a miss covers nothing


def test_a_ball_renders_its_silhouette_and_closed_form_opacity():
    sigma, r, size = 3.0, 0.5, 32
    camera = Camera(azimuth=30, elevation=20, distance=3.0, fov=40)
    origins, directions = camera.rays(size)
    near, far, _ = sphere_interval(origins, directions, 1.0)
    depths = stratified_depths(near, far, 512)
    points = origins[:, None] + directions[:, None] * depths[..., None]
    density = sigma * (points.norm(dim=-1) < r).float()
    values = torch.ones(*depths.shape, 1)
    rendered, opacity, weights = composite(density, values, depths, far, torch.zeros(1))
    # the closed form: impact parameter b of each ray, chord 2√(r² − b²)
    b = torch.linalg.cross(origins, directions).norm(dim=-1)
    chord = 2 * (r * r - b * b).clamp_min(0).sqrt()
    expected = 1 - torch.exp(-sigma * chord)
    assert (opacity - expected).abs().max() < 0.03
    assert torch.allclose(rendered[:, 0], opacity, atol=1e-6)  # white ball on black
    assert torch.allclose(weights.sum(-1), opacity)
    silhouette = (b < r).float().mean()  # the share of pixels inside the ball's outline
    assert abs(float((opacity > 1e-3).float().mean()) - float(silhouette)) < 0.02
    half_angle = math.asin(r / 3.0)  # the outline's size from the geometry alone
    assert abs(float(silhouette) - math.pi * (math.tan(half_angle) / math.tan(math.radians(20))) ** 2 / 4) < 0.03


def test_jittered_depths_stay_in_their_bins_and_follow_the_generator():
    near, far = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.5])
    a = stratified_depths(near, far, 4, torch.Generator().manual_seed(1))
    b = stratified_depths(near, far, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    bins = (a - near[:, None]) / (far - near)[:, None] * 4
    assert torch.all((bins >= torch.arange(4)) & (bins < torch.arange(4) + 1))
    assert torch.allclose(stratified_depths(near, far, 2), torch.tensor([[1.5, 2.5], [2.125, 2.375]]))
