"""The camera convention (docs/3d.md): right-handed, y up, azimuth 0 on +z, 90 on +x, looking
at the origin; image x to the right, y up. Checked on an asymmetric scene rendered through
the cameras' own rays."""

from __future__ import annotations

import math

import pytest
import torch

from sdsctl.cameras import Camera, view_prompt, view_word
from sdsctl.volume import composite, sphere_interval, stratified_depths

#: three coloured balls: red on +x, green on +z, blue on +y
BALLS = [((0.6, 0.0, 0.0), (1.0, 0.0, 0.0)), ((0.0, 0.0, 0.6), (0.0, 1.0, 0.0)), ((0.0, 0.6, 0.0), (0.0, 0.0, 1.0))]


def render_balls(camera: Camera, size: int = 48) -> torch.Tensor:
    origins, directions = camera.rays(size)
    near, far, _ = sphere_interval(origins, directions, 1.0)
    depths = stratified_depths(near, far, 128)
    points = origins[:, None] + directions[:, None] * depths[..., None]
    density = torch.zeros(depths.shape)
    colour = torch.zeros(*depths.shape, 3)
    for centre, rgb in BALLS:
        inside = (points - torch.tensor(centre)).norm(dim=-1) < 0.25
        density = density + 50.0 * inside
        colour = colour + inside[..., None] * torch.tensor(rgb)
    image, _, _ = composite(density, colour, depths, far, torch.zeros(3))
    return image.t().reshape(3, size, size)


def centroid(image: torch.Tensor, channel: int) -> tuple[float, float] | None:
    """(column, row) of a colour channel's mass, in [0, 1] (row 0 at the top), or None if absent."""
    mask = (image[channel] > 0.5) & (image.sum(0) - image[channel] < 0.3)
    if mask.sum() == 0:
        return None
    rows, cols = torch.nonzero(mask, as_tuple=True)
    n = image.shape[-1]
    return float(cols.float().mean() + 0.5) / n, float(rows.float().mean() + 0.5) / n


def test_azimuth_0_looks_at_the_plus_z_side_with_plus_x_to_the_right():
    image = render_balls(Camera(azimuth=0, elevation=0, distance=3, fov=50))
    green, red, blue = centroid(image, 1), centroid(image, 0), centroid(image, 2)
    assert green and abs(green[0] - 0.5) < 0.05 and abs(green[1] - 0.5) < 0.05  # +z faces the camera
    assert red and red[0] > 0.65  # +x on the right
    assert blue and blue[1] < 0.35  # +y up


def test_azimuth_90_looks_at_the_plus_x_side_with_plus_z_to_the_left():
    image = render_balls(Camera(azimuth=90, elevation=0, distance=3, fov=50))
    red, green = centroid(image, 0), centroid(image, 1)
    assert red and abs(red[0] - 0.5) < 0.05
    assert green and green[0] < 0.35


def test_positive_elevation_looks_down_on_the_object():
    image = render_balls(Camera(azimuth=0, elevation=60, distance=3, fov=50))
    green, blue = centroid(image, 1), centroid(image, 2)
    assert green and blue and green[1] > blue[1]  # the +z ball is below the +y ball's image
    assert centroid(render_balls(Camera(azimuth=0, elevation=90, distance=3, fov=50)), 2) is not None


@pytest.mark.parametrize("az,el", [(0, 0), (37, 20), (-120, -10), (200, 90), (90, -90)])
def test_the_camera_frame_is_right_handed_and_looks_at_the_origin(az, el):
    camera = Camera(azimuth=az, elevation=el, distance=2.5, fov=60)
    axes = torch.tensor(camera.rotation())
    assert torch.allclose(axes @ axes.t(), torch.eye(3), atol=1e-6)
    assert torch.allclose(torch.linalg.cross(axes[0], axes[1]), axes[2], atol=1e-6)
    position = torch.tensor(camera.position())
    assert math.isclose(float(position.norm()), 2.5, rel_tol=1e-6)
    origins, directions = camera.rays(5)
    centre_ray = directions[12]  # the middle pixel of a 5x5 image
    assert torch.allclose(centre_ray, -position / position.norm(), atol=1e-6)
    assert torch.allclose(origins[0], position)


def test_field_of_view_spans_the_image():
    camera = Camera(azimuth=0, elevation=0, distance=3, fov=90)
    _, directions = camera.rays(2)
    # pixel centres of a 2x2 image sit at ±0.5 of the half-width: tan = 0.5 · tan(45°)
    assert torch.allclose(directions[0, 0] / -directions[0, 2], torch.tensor(-0.5), atol=1e-6)


@pytest.mark.parametrize("az,el,word", [(0, 10, "front"), (44, 0, "front"), (90, 0, "side"), (-100, 0, "side"),
                                        (180, 0, "back"), (-150, 30, "back"), (30, 70, "overhead")])
def test_view_words_follow_dreamfusion(az, el, word):
    camera = Camera(azimuth=az, elevation=el, distance=2, fov=50)
    assert view_word(camera) == word
    assert view_prompt("a red circle", camera) == f"a red circle, {word} view"
