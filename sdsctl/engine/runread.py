"""Reading a run directory back: its recipe, summary, per-step metrics and previews.

``sdsctl compare`` and ``sdsctl doctor`` look at finished (or interrupted) runs through
:class:`RunData`; the figures computed here from the files (not during the run) are the
same for every model:

* ``convergence``: how much the image changed over the last tenth of the run -- the mean
  absolute pixel difference between the preview nearest to 90 % of the steps and the final
  image (``imagestats.change``);
* ``seconds_per_step``: wall time over steps done (model loading excluded);
* ``peak_memory_mb``: as the run recorded it (``summary.json``; CUDA: peak allocated on the
  device; CPU: the process's peak RSS, which in a comparison of many runs in one process is
  the peak so far).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from sdsctl.engine import imagestats
from sdsctl.errors import SdsctlError


@dataclasses.dataclass
class RunData:
    path: Path
    recipe: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    previews: dict[int, Path]  # step -> preview image

    @classmethod
    def read(cls, path: Path) -> RunData:
        path = Path(path)
        if not path.is_dir():
            raise SdsctlError(f"run directory {path} not found")
        if not (path / "recipe.yaml").is_file():
            raise SdsctlError(f"{path} is not a run directory (it has no recipe.yaml); "
                              "pass the folder `sdsctl run` wrote (--out)")
        try:
            recipe = yaml.safe_load((path / "recipe.yaml").read_text()) or {}
            summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
            lines = (path / "metrics.jsonl").read_text().splitlines() if (path / "metrics.jsonl").is_file() else []
            records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise SdsctlError(f"cannot read the run in {path}: {type(exc).__name__}: {exc}") from exc
        previews = {int(p.stem.split("_")[1]): p for p in sorted((path / "previews").glob("step_*.png"))}
        return cls(path, recipe, summary, records, previews)

    @property
    def steps_done(self) -> int:
        return self.records[-1]["step"] if self.records else 0

    @property
    def final(self) -> Path | None:
        p = self.path / "final.png"
        return p if p.is_file() else None

    def image_at(self, step: int) -> tuple[int, Path] | None:
        """The preview at ``step`` or the nearest one before it (the final image for the last step)."""
        earlier = [s for s in self.previews if s <= step]
        if not earlier:
            return None
        s = max(earlier)
        return s, self.previews[s]

    def convergence(self) -> dict[str, Any] | None:
        """Change over the last tenth of the run (see the module docstring), or None without images."""
        done, final = self.steps_done, self.final
        if not done or final is None:
            return None
        found = self.image_at(done - max(1, done // 10))
        if found is None:
            return None
        step, image = found
        return {"change": imagestats.change(image, final), "from_step": step, "to_step": done}

    def figures(self) -> dict[str, Any]:
        """The run-level figures of the module docstring (absent ones are None)."""
        conv = self.convergence()
        seconds, done = self.summary.get("seconds"), self.summary.get("steps_done") or self.steps_done
        return {
            "convergence": conv["change"] if conv else None,
            "seconds_per_step": seconds / done if seconds and done else None,
            "peak_memory_mb": self.summary.get("peak_memory_mb"),
        }
