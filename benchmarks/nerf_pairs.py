"""The 3D recipes on the shapes world's prompts: views matched per run (docs/3d.md).

Runs a recipe on "a red circle on a blue background" and on the 8 (prompt, seed) pairs of
``sdsctl compare --pairs 8``; circles on a full orbit, squares and triangles on a frontal arc
(``cameras.azimuth_range=[-30,30]``: docs/3d.md says why). Each run goes to its own folder
under ``--out`` and is skipped when its summary.json says completed (rerun to resume a
stopped sweep). Prints a Markdown table: prompt, seed, orbit, views matched, shape IoU (mean),
palette error (mean), seconds::

    python benchmarks/nerf_pairs.py nerf_robust_nfsd [--out /tmp/nerf-pairs] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sdsctl import plugins
from sdsctl.experiments.plan import shapes_pairs

SDSCTL = [sys.executable, "-P", "-c", "from sdsctl.cli import main; main()"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nerf-pairs"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    plugins.load_plugins()
    pairs = [("a red circle on a blue background", 0), *shapes_pairs(args.pairs)]
    print("| prompt | seed | cameras | views matched | shape IoU | palette error | seconds |")
    print("|---|---|---|---|---|---|---|")
    for prompt, seed in pairs:
        arc = "circle" not in prompt
        folder = args.out / args.recipe / f"{'-'.join(prompt.split()[1:3])}-on-{prompt.split()[-2]}-{seed}"
        summary_path = folder / "summary.json"
        done = summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "completed"
        if not done:
            command = [*SDSCTL, "run", args.recipe, "--prompt", prompt, "--seed", str(seed), "--no-live",
                       "--out", str(folder)]
            if args.steps:
                command += ["--steps", str(args.steps)]
            if arc:
                command += ["--set", "cameras.azimuth_range=[-30,30]"]
            if folder.exists():
                command = [*SDSCTL, "resume", str(folder), "--no-live"]
            subprocess.run(command, check=True, capture_output=True)
        summary = json.loads(summary_path.read_text())
        judge = summary["view_metrics"]["shapes-judge"]
        match = judge["match"]
        print(f"| {prompt} | {seed} | {'arc ±30°' if arc else 'orbit'} | {match['count']}/{match['views']} | "
              f"{judge['shape_iou']['mean']:.2f} | {judge['palette_error']['mean']:.3f} | {summary['seconds']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
