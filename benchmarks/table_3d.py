"""The study's table in 3D (docs/findings.md, "The table in 3D"), printed from a compare's ``compare.json``.

Rows are the guidance terms, columns the 3D parameterizations; each cell is the held-out views
matched (over the 8 pairs' 8 views each), the pairs whose every view matched, the median shape IoU and
palette error over the views, and seconds per run::

    python benchmarks/table_3d.py docs/findings/3d/compare.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: method -> the row's label
METHODS = {"sds": "SDS", "nfsd": "NFSD", "robust_nfsd": "robust NFSD (cuisine 2)", "vsd": "VSD", "ism": "ISM",
           "csd": "CSD"}
#: column -> (its label, how a recipe key names the parameterization)
COLUMNS = {"nerf_latent": "nerf, `space: latent` (Latent-NeRF; EHL in 3D)",
           "texture": "mesh-texture on a sphere",
           "nerf": "nerf, `space: rgb` (EHC in 3D)"}
#: the bundled recipes' keys, which name the parameterization first
BUNDLED = {"nerf_latent_robust_nfsd": ("robust_nfsd", "nerf_latent"), "texture_robust_nfsd": ("robust_nfsd", "texture"),
           "nerf_robust_nfsd": ("robust_nfsd", "nerf")}


def cell_of(key: str) -> tuple[str, str] | None:
    """(method, column) of a compare key (``vsd_nerf_latent``, ``nerf_robust_nfsd``, ...)."""
    if key in BUNDLED:
        return BUNDLED[key]
    for column in sorted(COLUMNS, key=len, reverse=True):  # nerf_latent before nerf
        if key.endswith("_" + column) and key[: -len(column) - 1] in METHODS:
            return key[: -len(column) - 1], column
    return None


def text(entry: dict) -> str:
    s = entry["summary"]
    whole = sum(1 for run in entry["runs"] if run.get("views")
                and all(v.get("metrics", {}).get("shapes-judge", {}).get("match") for v in run["views"]))
    return (f"{s['matches']}/{s['judged']} views, {whole}/{s['runs']} pairs "
            f"({s['median_shape_iou']:.2f}, {s['median_palette_error']:.3f}, {s['seconds_per_run']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_json", type=Path)
    results = json.loads(parser.parse_args().compare_json.read_text())
    cells = {cell_of(key): text(entry) for key, entry in results.items() if cell_of(key)}
    print("| method | " + " | ".join(COLUMNS.values()) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for method, label in METHODS.items():
        print(f"| {label} | " + " | ".join(cells.get((method, c), "") for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
