"""Which devices a run may use, checked once for every command that takes ``--device``.

Accepted names: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda``,
``cuda:N`` and ``mps`` (Apple GPUs). A name that is well formed but not present on this
machine is an input error (exit 2) naming the devices that are: ``validate`` says so as
``run``, ``sample`` or ``compare`` would.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sdsctl.errors import SdsctlError

if TYPE_CHECKING:
    import torch

#: what ``--device`` accepts (its help text and the recipe's validator use this)
ACCEPTED = "auto, cpu, cuda, cuda:N or mps"
PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def available() -> list[str]:
    """The devices present here, as ``--device`` names them."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names += ["cuda"] + [f"cuda:{i}" for i in range(n)] if n > 1 else ["cuda"]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def problem(name: str) -> str | None:
    """Why ``name`` cannot be used here (None: it can)."""
    if not PATTERN.fullmatch(name):
        return f"expected {ACCEPTED}, got {name!r}"
    import torch

    here = f"devices here: {', '.join(available())} (or auto)"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"{name} is not available: torch sees no CUDA device (a CPU build of torch, or no GPU); {here}"
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            return f"{name} is not available: there are {torch.cuda.device_count()} CUDA devices; {here}"
    if name == "mps" and name not in available():
        return f"mps is not available (it needs an Apple GPU and a torch built with MPS); {here}"
    return None


def resolve(name: str, option: str = "--device") -> torch.device:
    """``name`` as a torch device; an unavailable one is an :class:`SdsctlError` (exit 2)."""
    why = problem(name)
    if why is not None:
        raise SdsctlError(f"{option} {name}: {why}")
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB (``peak_memory_mb`` in summary.json and ``bench``): allocated on a CUDA
    device (since the last reset), else the process's peak RSS.

    On Linux the peak RSS is ``VmHWM`` (/proc/self/status), this process's own: ``ru_maxrss``
    keeps the peak of whatever the process was before ``exec`` -- with ``vfork``, as Python's
    ``subprocess`` uses, the *parent's* peak -- so a run started by a script that had held a
    15 GB model reported 15 GB whatever it used itself (found by ``benchmarks/fullsize.py``)."""
    import resource
    import sys

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024) / 2**20
