"""Check that a change leaves every bundled recipe's results bit for bit the same.

Runs every bundled recipe for ``--steps`` steps twice -- with the code of another checkout
(``--old DIR``, e.g. a ``git worktree add /tmp/old HEAD~3``) and with this one -- and compares
θ and every saved state (state.pt), the records (metrics.jsonl but ``seconds``), final.png and
the run directory's file list. The old code runs with its own plugins and entry points (its
``plugins/`` and ``recipes/`` on the path, ``SDSCTL_LOAD_PLUGINS`` set to its entry points), so
the two sides never mix::

    git worktree add /tmp/old HEAD~1
    OMP_NUM_THREADS=1 python benchmarks/bit_identity.py --old /tmp/old [--new /tmp/new] [--steps 12] [--out /tmp/bitid]

Prints one line per recipe and the count; exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib
import torch

#: -P: the working directory is not put on the path (it would give both sides this checkout's sdsctl)
SDSCTL = [sys.executable, "-P", "-c", "from sdsctl.cli import main; main()"]


def old_env(old: Path, links: Path) -> dict[str, str]:
    """The environment in which ``sdsctl`` is the old checkout's, plugins and recipes included."""
    links.mkdir(parents=True, exist_ok=True)
    for package, folder in (("sdsctl_plugins", "plugins"), ("sdsctl_recipes", "recipes")):
        link = links / package
        if not link.exists():
            link.symlink_to(old / folder)
    entry_points = tomllib.loads((old / "pyproject.toml").read_text())["project"]["entry-points"]["sdsctl"]
    # the old checkout's own entry points: a distribution found on PYTHONPATH comes before the
    # installed one, and importlib.metadata keeps the first distribution of a name
    info = links / "sdsctl-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sdsctl\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[sdsctl]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    return {**os.environ, "PYTHONPATH": f"{old}{os.pathsep}{links}", "SDSCTL_LOAD_PLUGINS": ",".join(entry_points)}


def run(name: str, out: Path, steps: int, env: dict[str, str]) -> Path:
    done = subprocess.run([*SDSCTL, "run", name, "--set", f"steps={steps}", "--set", "output.preview_every=4",
                           "--no-live", "--out", str(out)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{name} ({out}): {done.stderr[-2000:]}")
    return out


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a if k != "seconds")
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def identical(old: Path, new: Path) -> bool:
    def records(d: Path):
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                for x in (d / "metrics.jsonl").read_text().splitlines()]

    return (records(old) == records(new) and (old / "final.png").read_bytes() == (new / "final.png").read_bytes()
            and same(torch.load(old / "state.pt", weights_only=False), torch.load(new / "state.pt", weights_only=False))
            and sorted(p.name for p in old.rglob("*")) == sorted(p.name for p in new.rglob("*")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the code to compare against")
    parser.add_argument("--new", type=Path, default=None,
                        help="a checkout to use as the new side (default: the installed sdsctl, this checkout)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bit-identity"))
    args = parser.parse_args()
    env_old = old_env(args.old.resolve(), args.out / "links")
    env_new = old_env(args.new.resolve(), args.out / "links-new") if args.new else {**os.environ}
    # the recipes the old checkout bundles: a recipe added since has nothing to be compared with
    names = [line.split()[0] for line in subprocess.run([*SDSCTL, "recipes"], capture_output=True, text=True,
                                                         env=env_old).stdout.splitlines() if line.strip()]
    different = []
    for name in names:
        same_here = identical(run(name, args.out / "old" / name, args.steps, env_old),
                              run(name, args.out / "new" / name, args.steps, env_new))
        print(f"{name}: {'identical' if same_here else 'DIFFERENT'}", flush=True)
        different += [] if same_here else [name]
    print(f"{len(names) - len(different)}/{len(names)} identical" + (f"; different: {different}" if different else ""))
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
