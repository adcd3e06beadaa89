"""Logger ``wandb``: a run in Weights & Biases, offline.

``sdsctl run RECIPE --log wandb`` records an offline W&B run in ``<run>/wandb/offline-run-*``
(nothing leaves the machine; upload it later with ``wandb sync <run>/wandb/offline-run-*``):
the resolved recipe as the run's config, every step's loss, norms, timesteps, weight and
learning rate, the previews as images, the summary's numbers in the run summary. The project
is ``$WANDB_PROJECT`` (default ``sdsctl``). Needs the ``wandb`` package:
``pip install "sdsctl[wandb]"``.
"""

from __future__ import annotations

import importlib.util
import os

import sdsctl
from sdsctl.components import Logger
from sdsctl.engine.loggers import flat_numbers


class WandbLogger(Logger):
    """Weights & Biases, offline, in the run directory (`--log wandb`)."""

    @classmethod
    def missing(cls):
        if importlib.util.find_spec("wandb") is None:
            return 'the wandb package is not installed (pip install "sdsctl[wandb]")'
        return None

    def start(self, info):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            mode="offline", dir=str(self.run_dir), project=os.environ.get("WANDB_PROJECT", "sdsctl"),
            name=self.run_dir.name, config=self.recipe.model_dump(mode="json"),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def step(self, record):
        self.run.log({"loss": record["loss"], "weight": record["weight"], "lr": record["lr"],
                      **{f"norms/{k}": v for k, v in record["norms"].items()},
                      **{f"timesteps/{k}": v for k, v in record["timesteps"].items()}}, step=record["step"])

    def preview(self, step, image):
        pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        self.run.log({"preview": self.wandb.Image(pixels)}, step=step)

    def summary(self, summary):
        self.run.summary.update(flat_numbers(summary))
        self.run.summary["status"] = summary.get("status")

    def close(self):
        run = getattr(self, "run", None)
        if run is not None:
            run.finish()
            # finish() can return before W&B's service process has written the run file;
            # teardown waits for it, so the offline run is complete when sdsctl exits.
            self.wandb.teardown()
            self.run = None


@sdsctl.hookimpl
def register_loggers(register):
    register("wandb", WandbLogger)
