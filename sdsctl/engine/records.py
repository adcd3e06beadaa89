"""Step records kept on the device and fetched in one go.

A step's numbers (the rendered latents' norm, the guidance's norms, the score's norm, the loss,
the reached fit fraction) are 0-dim tensors on the run's device. Reading one on the host waits
for the device to finish everything queued before it (a *host sync*); on a GPU that costs more
than the arithmetic. So the loop keeps each step's numbers on the device
(:class:`PendingRecords`) and fetches every pending step at once, on logging steps only
(``output.log_every``, previews, checkpoints, the end). :func:`fetch` is the one place device
numbers reach the host (tests count its calls); the finiteness check runs on what it fetched,
and the loop restores θ to the last checked step when a value was not finite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch


class NonFinite(Exception):
    """A step's number was NaN or infinite: ``term`` of step ``step`` (1-based)."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"{term} is {value}")
        self.step, self.term, self.value = step, term, value


def fetch(values: torch.Tensor) -> list[float]:
    """Device numbers to the host: the loop's only host sync (one per logging step)."""
    return values.tolist()


#: the numbers checked for finiteness (the fit fraction follows from them)
CHECKED = ("render", "score", "loss")


@dataclasses.dataclass
class StepRecord:
    """One step: host values now, device values fetched later."""

    host: dict[str, Any]  # step, phase, t, timesteps, weight, lr, fit_steps
    names: list[str]  # "render", the guidance's norms, "score", "loss"[, "fit_fraction"]
    values: torch.Tensor  # 1-D float32, on the device, one value per name
    norms: list[str]  # which names are the guidance's norms

    def fetched(self) -> dict[str, Any]:
        """This record alone, fetched now (tests and one-off callers)."""
        pending = PendingRecords()
        pending.add(self)
        return pending.flush()[0]


class PendingRecords:
    """Step records waiting for the next logging step."""

    def __init__(self):
        self.pending: list[StepRecord] = []

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, record: StepRecord) -> None:
        self.pending.append(record)

    def flush(self) -> list[dict[str, Any]]:
        """Every pending record as metrics.jsonl writes it, after one :func:`fetch`.

        Raises :class:`NonFinite` for the first step with a non-finite number; the records
        before it are in ``exc.records``.
        """
        if not self.pending:
            return []
        records, self.pending = self.pending, []
        flat = fetch(torch.cat([r.values for r in records]))
        out, start = [], 0
        for r in records:
            numbers = dict(zip(r.names, flat[start:start + len(r.names)]))
            start += len(r.names)
            for term in (*CHECKED[:1], *r.norms, *CHECKED[1:]):
                if not math.isfinite(numbers[term]):
                    exc = NonFinite(r.host["step"], term, numbers[term])
                    exc.records = out
                    raise exc
            record = {
                **{k: r.host[k] for k in ("step", "phase", "t", "timesteps", "weight")},
                "loss": numbers["loss"],
                "norms": {"score": numbers["score"], **{n: numbers[n] for n in r.norms}},
                **{k: v for k, v in r.host.items() if k not in ("step", "phase", "t", "timesteps", "weight")},
            }
            if "fit_fraction" in numbers:
                record["fit_fraction"] = round(numbers["fit_fraction"], 6)
            out.append(record)
        return out
