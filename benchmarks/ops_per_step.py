"""Count the operations a step dispatches outside its model evaluations.

On the shipped shapes prior (8 × 8 latents) every tensor operation costs about the same few
microseconds of dispatch, so the number of operations a step adds to its model evaluations is
what its overhead is made of -- and unlike a time, the count does not depend on the machine's
load. This script runs ``--steps`` steps of each recipe under a ``TorchDispatchMode`` that
counts every aten operation, split into those inside the prior's ``predict_noise``,
``encode_images`` and ``decode_latents`` (the model evaluations ``sdsctl bench`` calls the
floor) and the rest (the step's own work), and prints one JSON object per recipe::

    python benchmarks/ops_per_step.py sds robust_nfsd robust_nfsd_ehc [--steps 20] [--top 10]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdsctl.diagnostics.bench import _run_steps
from sdsctl.engine.loop import Optimization
from sdsctl.engine.recipe import load_recipe

MODEL_CALLS = ("predict_noise", "encode_images", "decode_latents")


class CountOps(TorchDispatchMode):
    """Counts aten operations, inside and outside the model evaluations."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a model evaluation runs
        self.inside, self.outside = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.inside if self.depth else self.outside)[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, prior) -> None:
        for name in MODEL_CALLS:
            original = getattr(prior, name)

            def counted(*args, _original=original, **kwargs):
                self.depth += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.depth -= 1

            setattr(prior, name, counted)


def count(recipe: str, steps: int, top: int) -> dict:
    loaded = load_recipe(recipe, [], {"device": "cpu"})
    device = torch.device("cpu")
    prior = loaded.components["model"].obj(loaded.recipe.model).load(device, torch.float32)
    opt = Optimization(loaded, prior, device, torch.float32)
    opt.initialize()
    _run_steps(opt, 0, 5, loaded.recipe.output.log_every)  # warm-up: lazy initialisations
    counter = CountOps()
    counter.wrap(prior)
    with counter:
        _run_steps(opt, 5, steps, loaded.recipe.output.log_every)
    opt.close()
    return {
        "recipe": loaded.name,
        "steps": steps,
        "ops_per_step_outside": round(sum(counter.outside.values()) / steps, 2),
        "ops_per_step_in_model_calls": round(sum(counter.inside.values()) / steps, 2),
        "most_frequent_outside": {k: round(v / steps, 2) for k, v in counter.outside.most_common(top)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    for recipe in args.recipes:
        print(json.dumps(count(recipe, args.steps, args.top)))


if __name__ == "__main__":
    main()
