"""Cameras ``orbit``: a random camera on a sphere around the object each step, fixed held-out views.

Each step draws azimuth, elevation, distance and field of view uniformly from the recipe's
ranges (from the run's host generator: no device sync, and a resumed run draws the same
cameras). The angle and field-of-view defaults are threestudio's DreamFusion configuration
(threestudio-project/threestudio@28d9d80, ``configs/dreamfusion-sd.yaml``: elevation
[-10, 45]°, azimuth [-180, 180]°, field of view [40, 70]°). Its distances ([1.5, 2.0]) sit
inside its bounding box of radius 2; sdsctl's scene lives in a sphere of radius 1 and its
cameras stay outside it, at [2.0, 2.6]: at the middle distance and field of view the sphere
just fills the frame and the initial density blob (radius 0.5) about half of it. The held-out
views are ``eval_views`` cameras evenly spaced over the azimuth range at ``eval_elevation``,
``eval_distance`` and ``eval_fov``: a full orbit spaces them 360°/N apart starting at azimuth
0, an arc puts the first and last on its ends.
"""

from __future__ import annotations

from pydantic import Field, model_validator

import sdsctl
from sdsctl.cameras import VIEW_WORDS, Camera
from sdsctl.components import Cameras, ComponentConfig, InvalidConfig


def _range(low: float, high: float, description: str):
    return Field((low, high), description=description)


class Orbit(Cameras):
    """A random orbit camera per step; ``eval_views`` fixed views for judging the result."""

    class Config(ComponentConfig):
        name: str = "orbit"
        azimuth_range: tuple[float, float] = _range(-180.0, 180.0, "degrees; 0 looks at the object's +z side")
        elevation_range: tuple[float, float] = _range(-10.0, 45.0, "degrees above the ground plane, in [-90, 90]")
        distance_range: tuple[float, float] = _range(2.0, 2.6, "from the origin, beyond the bounding sphere's radius 1")
        fov_range: tuple[float, float] = _range(40.0, 70.0, "full field of view in degrees, in (0, 180)")
        eval_views: int = Field(8, description="held-out views evenly spaced over the azimuth range (≥ 1)")
        eval_elevation: float = Field(15.0, description="elevation of the held-out views")
        eval_distance: float = Field(2.3, description="distance of the held-out views")
        eval_fov: float = Field(55.0, description="field of view of the held-out views")
        view_prompts: bool = Field(False, description="DreamFusion's view-dependent prompts "
                                   "('<prompt>, front view', ... by azimuth and elevation)")

        @model_validator(mode="after")
        def _bounds(self):
            problems = []
            for key in ("azimuth_range", "elevation_range", "distance_range", "fov_range"):
                low, high = getattr(self, key)
                if low > high:
                    problems.append(f"{key}: its low end {low:g} is above its high end {high:g}")
            elevations = [*self.elevation_range, self.eval_elevation]
            if any(abs(e) > 90 for e in elevations):
                problems.append(f"elevations must lie in [-90, 90] degrees, got {elevations}")
            fovs = [*self.fov_range, self.eval_fov]
            if any(not 0 < f < 180 for f in fovs):
                problems.append(f"fields of view must lie strictly between 0 and 180 degrees, got {fovs}")
            distances = [*self.distance_range, self.eval_distance]
            if any(d <= 1.0 for d in distances):
                problems.append(f"distances must be beyond the bounding sphere (radius 1), got {distances}")
            if self.eval_views < 1:
                problems.append(f"eval_views must be at least 1, got {self.eval_views}")
            if problems:
                raise ValueError("; ".join(problems))
            return self

    @classmethod
    def check(cls, config, recipe, model) -> None:
        if config.view_prompts:
            unknown = model.unknown_words(" ".join(f"{word} view" for word in VIEW_WORDS))
            if unknown:
                raise InvalidConfig(f"view_prompts adds {', '.join(map(repr, VIEW_WORDS))} + 'view' to the prompt, "
                                    f"but the model's tokenizer has no whole-word token for "
                                    f"{', '.join(map(repr, unknown))} (the shapes prior never saw views): "
                                    "use view_prompts: false with this model", field="view_prompts")

    def sample(self, step: int) -> Camera:
        c = self.config

        def uniform(bounds: tuple[float, float]) -> float:
            low, high = bounds
            return low + (high - low) * self.ctx.rand()

        return Camera(azimuth=uniform(c.azimuth_range), elevation=uniform(c.elevation_range),
                      distance=uniform(c.distance_range), fov=uniform(c.fov_range))

    def evaluation(self) -> list[Camera]:
        c = self.config
        low, high = c.azimuth_range
        n = c.eval_views
        full = high - low >= 360.0
        if full:  # from the front (azimuth 0) around towards +x
            azimuths = [(360.0 * i / n + 180.0) % 360.0 - 180.0 for i in range(n)]
        elif n == 1:
            azimuths = [(low + high) / 2]
        else:
            azimuths = [low + (high - low) * i / (n - 1) for i in range(n)]
        return [Camera(azimuth=round(a, 6), elevation=c.eval_elevation, distance=c.eval_distance, fov=c.eval_fov)
                for a in azimuths]

    @property
    def view_prompts(self) -> bool:
        return self.config.view_prompts


@sdsctl.hookimpl
def register_cameras(register):
    register("orbit", Orbit)
