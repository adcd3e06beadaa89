"""Cameras of a 3D scene: one convention, its rays, and DreamFusion's view words.

The convention (nerfstudio's and OpenGL's, docs/3d.md; ``tests/test_cameras.py`` checks it on
an asymmetric scene):

* the world is right-handed with **y up**; the object sits at the origin;
* a camera at **azimuth 0** sits on the **+z** axis, at azimuth 90° on **+x** (azimuth turns
  from +z towards +x, counter-clockwise seen from above); positive **elevation** lifts it
  above the xz plane; it always looks at the origin;
* in its own frame a camera looks along **−z**, with +x to the right of the image and +y up
  (the columns of :meth:`Camera.rotation`, camera to world);
* images are square; ``fov`` is the full field of view (vertical = horizontal) in degrees.

The right vector of an orbit camera is (cos az, 0, −sin az) whatever the elevation, so a
camera straight overhead (elevation 90°) is well defined.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Camera:
    """One view of the scene: where the camera sits (orbit coordinates) and its field of view."""

    azimuth: float  # degrees: 0 on +z, 90 on +x
    elevation: float  # degrees above the xz plane
    distance: float  # from the origin, in scene units (the bounding sphere has radius 1)
    fov: float  # full field of view, degrees

    def position(self) -> tuple[float, float, float]:
        az, el = math.radians(self.azimuth), math.radians(self.elevation)
        d = self.distance
        return (d * math.cos(el) * math.sin(az), d * math.sin(el), d * math.cos(el) * math.cos(az))

    def rotation(self) -> tuple[tuple[float, float, float], ...]:
        """The camera's axes in world coordinates: (right x, up y, backward z), camera to world."""
        az, el = math.radians(self.azimuth), math.radians(self.elevation)
        back = (math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az))
        right = (math.cos(az), 0.0, -math.sin(az))
        up = (back[1] * right[2] - back[2] * right[1], back[2] * right[0] - back[0] * right[2],
              back[0] * right[1] - back[1] * right[0])  # back × right
        return right, up, back

    def rays(self, size: int, device=None) -> tuple[Tensor, Tensor]:
        """Origins and unit directions ``[size², 3]`` through the pixel centres, row-major
        (row 0 at the top of the image)."""
        import torch

        focal = 0.5 * size / math.tan(math.radians(self.fov) / 2)
        centres = (torch.arange(size, dtype=torch.float32, device=device) + 0.5 - size / 2) / focal
        down, across = torch.meshgrid(centres, centres, indexing="ij")
        local = torch.stack([across, -down, -torch.ones_like(across)], dim=-1).reshape(-1, 3)
        axes = torch.tensor(self.rotation(), dtype=torch.float32, device=device)  # rows: x, y, z axes
        directions = local @ axes
        directions = directions / directions.norm(dim=-1, keepdim=True)
        origin = torch.tensor(self.position(), dtype=torch.float32, device=device)
        return origin.expand_as(directions), directions

    def label(self) -> str:
        return f"az {self.azimuth:g}° el {self.elevation:g}°"

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in dataclasses.asdict(self).items()}


#: DreamFusion's view words and threestudio's thresholds (degrees): front within 45° of
#: azimuth 0, back within 45° of 180°, side between, overhead above elevation 60°
#: (threestudio-project/threestudio@28d9d80, threestudio/models/prompt_processors/base.py)
FRONT_WITHIN, BACK_WITHIN, OVERHEAD_ABOVE = 45.0, 45.0, 60.0
VIEW_WORDS = ("front", "side", "back", "overhead")


def view_word(camera: Camera) -> str:
    """The view-dependent suffix of ``camera``: ``front``, ``side``, ``back`` or ``overhead``."""
    if camera.elevation > OVERHEAD_ABOVE:
        return "overhead"
    az = (camera.azimuth + 180.0) % 360.0 - 180.0  # in [-180, 180)
    if abs(az) <= FRONT_WITHIN:
        return "front"
    if abs(az) >= 180.0 - BACK_WITHIN:
        return "back"
    return "side"


def view_prompt(prompt: str, view: Camera | str) -> str:
    """DreamFusion's view-dependent prompt: ``"<prompt>, <word> view"`` (``view``: a camera or its word)."""
    return f"{prompt}, {view if isinstance(view, str) else view_word(view)} view"
