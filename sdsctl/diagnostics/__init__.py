"""The diagnostics built on the engine: ``bench`` (a recipe's step speed), ``doctor`` (the
study's checklist on a run directory) and ``model`` (what sdsctl reads from a model's
configuration), each command's front-end beside its logic."""
