"""Logger ``tensorboard``: a run's numbers and previews as TensorBoard event files.

``sdsctl run RECIPE --log tensorboard`` writes ``<run>/tensorboard/events.out.tfevents.*``
(view with ``tensorboard --logdir runs``): every step's loss, norms (``norms/<term>``), timesteps
(``timesteps/<name>``), weight and learning rate as scalars; the previews as images; at the end
the summary's numbers (``summary/...``) as scalars and the whole summary as text. Needs the
``tensorboard`` package: ``pip install "sdsctl[tensorboard]"``.
"""

from __future__ import annotations

import importlib.util
import json

import sdsctl
from sdsctl.components import Logger
from sdsctl.engine.loggers import flat_numbers


class TensorBoardLogger(Logger):
    """TensorBoard event files in the run directory (`--log tensorboard`)."""

    @classmethod
    def missing(cls):
        if importlib.util.find_spec("tensorboard") is None:
            return 'the tensorboard package is not installed (pip install "sdsctl[tensorboard]")'
        return None

    def start(self, info):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self.writer.add_text("run", f"{info['title']} -- {info['steps']} steps on {info['device']}", info["start_step"])

    def step(self, record):
        step = record["step"]
        scalars = {"loss": record["loss"], "weight": record["weight"], "lr": record["lr"],
                   **{f"norms/{k}": v for k, v in record["norms"].items()},
                   **{f"timesteps/{k}": v for k, v in record["timesteps"].items()}}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def preview(self, step, image):
        self.writer.add_image("preview", image.detach().float().cpu().clamp(0, 1), step)

    def summary(self, summary):
        step = summary.get("steps_done", 0)
        for key, value in flat_numbers(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", step)

    def close(self):
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()


@sdsctl.hookimpl
def register_loggers(register):
    register("tensorboard", TensorBoardLogger)
