"""``sdsctl doctor``'s checks of a 3D run: what goes wrong only when a scene is seen from many
views. Each reads the run's files (``views/``, ``summary.json``'s per-view readings,
``mesh.ply``), states its evidence and names a knob.

Thresholds (the shapes prior's 600-step 3D runs: `nerf_robust_nfsd`, `nerf_sds`,
`texture_robust_nfsd` on the red circle; their object covers 25-45 % of each view, touches the
frame on 0 % of its border, and their meshes are one piece):

* empty view: < 2 % of the view's pixels unlike its background (the median of its four
  corner patches, unlike = a channel differs by more than 0.15);
* object leaving the frame: > 30 % of the border's pixels unlike the background;
* disagreeing view: a metric's word readings (the shapes judge's colour, shape, background)
  differ from what most views read;
* floaters: a density field's mesh in pieces, pieces besides the largest holding ≥ 1 % of
  its faces.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

EMPTY_FOREGROUND = 0.02
FRAME_BORDER = 0.30
UNLIKE = 0.15
FLOATER_FACES = 0.01


def foreground(image: np.ndarray) -> tuple[float, float]:
    """(share of pixels unlike the background, share of the border's pixels unlike it) of an
    RGB view in [0, 1], the background being the median of its four 4×4 corner patches."""
    corners = np.concatenate([image[:4, :4], image[:4, -4:], image[-4:, :4], image[-4:, -4:]]).reshape(-1, 3)
    unlike = np.abs(image - np.median(corners, axis=0)).max(axis=-1) > UNLIKE
    border = np.concatenate([unlike[0], unlike[-1], unlike[1:-1, 0], unlike[1:-1, -1]])
    return float(unlike.mean()), float(border.mean())


def scene_findings(path: Path, summary: dict[str, Any], recipe: dict[str, Any], finding) -> list:
    """The multi-view findings of the 3D run at ``path`` (none for a 2D run); ``finding`` makes
    one (doctor's ``Finding``)."""
    views = summary.get("views")
    if not views:
        return []
    from PIL import Image

    images = {view["file"]: np.asarray(Image.open(path / view["file"]).convert("RGB"), dtype=np.float64) / 255
              for view in views if (path / view["file"]).is_file()}
    shares = {name: foreground(image) for name, image in images.items()}
    out = [_empty(shares, finding), _frame(shares, recipe, finding), _agreement(views, finding)]
    if "mesh_threshold" in recipe.get("parameterization", {}):  # a density field: its mesh can break up
        out.append(_floaters(path / "mesh.ply", finding))
    return out


def _label(name: str) -> str:
    from sdsctl.engine.images import picture_label

    return picture_label(Path(name))


def _empty(shares: dict[str, tuple[float, float]], finding):
    empty = [f"{_label(n)} ({inside:.1%})" for n, (inside, _) in shares.items() if inside < EMPTY_FOREGROUND]
    if empty:
        return finding("views-empty", False, "empty views", f"{len(empty)} of {len(shares)} held-out views show "
                       f"almost nothing but background: {', '.join(empty)} of their pixels unlike it",
                       "more steps, or a smaller cameras.distance_range (the object is small in the frame)")
    low = min((inside for inside, _ in shares.values()), default=0.0)
    return finding("views-empty", True, "every view shows the object",
                   f"the object covers at least {low:.0%} of each held-out view")


def _frame(shares: dict[str, tuple[float, float]], recipe: dict[str, Any], finding):
    leaving = [f"{_label(n)} ({border:.0%})" for n, (_, border) in shares.items() if border > FRAME_BORDER]
    distance = recipe.get("cameras", {}).get("distance_range")
    if leaving:
        return finding("views-frame", False, "the object leaves the frame",
                       f"in {len(leaving)} held-out views the object reaches the border: {', '.join(leaving)} of the "
                       "border's pixels", f"a larger cameras.distance_range (now {distance}) or a smaller object "
                       "(nerf: parameterization.blob_radius; mesh-texture: parameterization.scale)")
    return finding("views-frame", True, "the object stays in the frame",
                   f"at most {max((b for _, b in shares.values()), default=0.0):.0%} of a view's border touched")


def _agreement(views: list[dict[str, Any]], finding):
    """Views whose word readings (a metric's strings) differ from what most views read."""
    words: dict[str, list[str]] = {}
    for view in views:
        for metric, reading in view.get("metrics", {}).items():
            for key, value in (reading.items() if isinstance(reading, dict) else ()):
                if isinstance(value, str):
                    words.setdefault(f"{metric}.{key}", []).append(value)
    odd = []
    for key, values in words.items():
        usual, _ = Counter(values).most_common(1)[0]
        for view, value in zip(views, values):
            if value != usual:
                odd.append(f"{_label(view['file'])}: {key} {value!r} (most views {usual!r})")
    if odd:
        return finding("views-agree", False, "views disagree", f"{len(odd)} reading(s) differ from the others': "
                       + "; ".join(odd[:6]) + (" ..." if len(odd) > 6 else ""),
                       "more steps, or view-dependent prompts on a model that knows them "
                       "(cameras.view_prompts: true): the object is not the same from every side")
    if not words:
        return finding("views-agree", None, "views agree: n/a", "no metric gives word readings of the views")
    return finding("views-agree", True, "the views agree", f"every held-out view reads the same "
                   f"({', '.join(sorted(words))})")


def _floaters(mesh_path: Path, finding):
    if not mesh_path.is_file():
        return finding("floaters", None, "floaters: n/a", "no mesh.ply (the density never crossed the surface level)")
    import trimesh

    mesh = trimesh.load(mesh_path, process=False)
    pieces = sorted((len(piece.faces) for piece in mesh.split(only_watertight=False)), reverse=True)
    total = max(sum(pieces), 1)
    floating = [n for n in pieces[1:] if n / total >= FLOATER_FACES]
    if floating:
        return finding("floaters", False, "density floaters", f"the mesh is in {len(pieces)} pieces; besides the "
                       f"object, {len(floating)} hold {sum(floating) / total:.0%} of its faces",
                       "parameterization.sparsity_weight (e.g. 0.1) or entropy_weight, which empty the space "
                       "around the object")
    return finding("floaters", True, "no floaters", f"the mesh is one piece ({pieces[0] if pieces else 0} faces)"
                   + (f" with {len(pieces) - 1} specks under 1 %" if len(pieces) > 1 else ""))
