"""Where the runs of a comparison or a sweep execute: here, in worker processes, or on Ray.

Every executor takes the planned runs that are not reused (``sdsctl.experiments.plan.RunSpec``) and tells
the driver, through :class:`Events`, as each one starts, is retried and finishes. They share
one policy, so a result never depends on where it ran:

* a failed run is tried once more from scratch (:data:`ATTEMPTS`); if it fails again it is
  reported with its error, never dropped;
* results land in the comparison's folder on the driver (``DIR/runs/...``) as each run
  finishes, so whatever stops the driver later, every finished run is there to be reused;
* Ctrl-C (or SIGTERM) stops what is outstanding and raises :class:`Interrupted`.

:class:`LocalExecutor` runs one run after another in this process (runs that share a model
share its loaded weights; the live panel shows the current run), or ``--jobs N`` runs at once
in worker processes (``python -m sdsctl.experiments.runtask``), each pinned to one visible GPU
(``CUDA_VISIBLE_DEVICES``) when there are GPUs. :class:`RayExecutor` makes each run a Ray task
asking for one GPU (or ``--cpus-per-run`` CPUs on a cluster without GPUs) on a local Ray
instance or the cluster at ``--address``; the task runs in a scratch folder on its node and
returns the run directory's files, which the driver writes into its folder -- no shared
filesystem is assumed. A run to continue ships its partial files with the task.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from sdsctl.devices import ACCEPTED
from sdsctl.errors import SdsctlError, summarize
from sdsctl.experiments.runtask import Outcome, describe_error, install, pack, run_shipped, run_task, task_for

#: tries per run: the first, and one retry from scratch
ATTEMPTS = 2
EXECUTORS = ("local", "ray")
RAY_MISSING = ('--executor ray needs Ray, which is not installed here: pip install "sdsctl[ray]" '
               '(on every node of a cluster as well)')


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the runs; every finished run is in its folder, every interrupted
    one that could save its state can be continued (the same command again)."""


class Events:
    """What the driver hears from an executor (the base class ignores it all)."""

    def reporter(self, spec):
        """The reporter of a run executed in this process (the live panel, or a quiet one)."""
        from sdsctl.experiments.runtask import Quiet

        return Quiet()

    def started(self, spec) -> None: ...
    def retrying(self, spec, outcome: Outcome) -> None: ...
    def finished(self, spec, outcome: Outcome) -> None: ...


def _retry_mode(outcome: Outcome) -> str:
    """A run interrupted on its worker continues from its saved state; a failed one starts again
    (continuing from its last good state would meet the same failure at once)."""
    return "resume" if outcome.status == "interrupted" and outcome.steps_done else "restart"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """In the driver, SIGTERM stops the executor as Ctrl-C does (the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM while a worker process starts: a signal that arrived while
    ``Popen`` ran would otherwise leave a started worker unknown to the pool, never asked to
    stop nor waited for. A held signal is acted on as it would have been, once the worker is
    registered (the main thread only; elsewhere signals do not reach Python code)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:  # the first signal held is acted on; a second would only repeat it
            handler = previous[held[0]]
            if callable(handler):
                handler(held[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), held[0])  # delivered again, to its default action


# ----------------------------------------------------------------------------- local

class Models:
    """The loaded priors of the in-process executor: runs that share a model (config, device,
    dtype) share its weights. One is kept at a time (memory); a run that changed the model (a
    guidance that added adapters to the UNet, e.g. VSD's LoRA) or failed gets it dropped, so
    the next run loads a clean copy."""

    def __init__(self):
        self.key: tuple | None = None
        self.prior = None
        self.loads = 0

    def get(self, loaded):
        from sdsctl.engine.loop import load_prior, placement

        device, dtype, _ = placement(loaded.recipe)
        key = (loaded.recipe.model.model_dump_json(), str(device), str(dtype))
        if key != self.key:
            self.drop()
            self.prior = load_prior(loaded, device, dtype)
            self.key = key
            self.loads += 1
        return self.prior

    def drop(self) -> None:
        self.prior, self.key = None, None

    def after_run(self) -> None:
        unet = getattr(self.prior, "unet", None)
        if getattr(unet, "peft_config", None):
            self.drop()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (none: [])."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    named = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return named[:n] if named else [str(i) for i in range(n)]


def worker_env(slot: int, gpus: list[str], jobs: int) -> dict[str, str]:
    """The environment of worker ``slot``: pinned to one GPU (round robin over ``gpus``), and on
    the CPU a share of the cores unless ``OMP_NUM_THREADS`` says otherwise."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


class _Worker:
    """One ``python -m sdsctl.experiments.runtask`` process running one task; its outcome goes to ``done``."""

    def __init__(self, spec, mode: str, attempt: int, slot: int, env: dict[str, str], done: queue.Queue):
        self.spec, self.attempt, self.slot = spec, attempt, slot
        self.reported = threading.Event()
        task = task_for(spec, mode)
        self.proc = subprocess.Popen([sys.executable, "-m", "sdsctl.experiments.runtask"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)  # Ctrl-C reaches it through the driver, once
        payload = json.dumps({k: v for k, v in dataclasses.asdict(task).items() if k != "files"})
        threading.Thread(target=self._wait, args=(payload, done), daemon=True).start()

    def _wait(self, payload: str, done: queue.Queue) -> None:
        out, err = self.proc.communicate(payload)
        done.put((self, self._outcome(out, err)))
        self.reported.set()

    def _outcome(self, out: str, err: str) -> Outcome:
        lines = [line for line in out.splitlines() if line.strip()]
        if lines:
            try:
                return Outcome(**json.loads(lines[-1]))
            except (ValueError, TypeError):
                pass
        code = self.proc.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = next((line for line in reversed(err.splitlines()) if line.strip()), "")
        return Outcome("failed", error=f"the worker process died ({how})" + (f": {last.strip()}" if last else ""))

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)


class LocalExecutor:
    """Runs on this machine: one after another in this process, or ``jobs`` worker processes."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise SdsctlError(f"--jobs {jobs}: must be 1 or more")
        self.jobs = jobs
        self.models = Models()

    def describe(self) -> str:
        if self.jobs == 1:
            return f"model loaded {self.models.loads} time(s)"
        return f"{self.jobs} worker processes"

    def run(self, specs: list, events: Events) -> None:
        if self.jobs == 1:
            self._sequential(specs, events)
        else:
            with _sigterm_as_interrupt():
                self._pool(specs, events)

    # -- in this process
    def _once(self, spec, mode: str, events: Events) -> Outcome:
        try:
            prior = self.models.get(spec.loaded)
        except Exception as exc:  # noqa: BLE001 - a model that fails to load fails the run
            self.models.drop()
            return Outcome("failed", error=describe_error(exc))
        outcome = run_task(task_for(spec, mode), loaded=spec.loaded, prior=prior, reporter=events.reporter(spec))
        if outcome.status == "failed":
            self.models.drop()
        else:
            self.models.after_run()
        return outcome

    def _sequential(self, specs: list, events: Events) -> None:
        for spec in specs:
            events.started(spec)
            mode = spec.state
            for attempt in range(1, ATTEMPTS + 1):
                outcome = self._once(spec, mode, events)
                outcome.attempts = attempt
                if outcome.status != "failed" or attempt == ATTEMPTS:
                    break
                events.retrying(spec, outcome)
                mode = _retry_mode(outcome)
            if outcome.status == "interrupted":
                raise Interrupted(f"interrupted in {spec.path} at step {outcome.steps_done}/{spec.steps}")
            events.finished(spec, outcome)

    # -- worker processes
    def _pool(self, specs: list, events: Events) -> None:
        gpus = visible_gpus()
        todo = collections.deque((spec, spec.state, 1) for spec in specs)
        free = list(range(self.jobs))
        running: dict[int, _Worker] = {}
        done: queue.Queue = queue.Queue()
        try:
            while todo or running:
                while todo and free:
                    spec, mode, attempt = todo.popleft()
                    slot = free.pop(0)
                    if attempt == 1:
                        events.started(spec)
                    with _signals_held():
                        running[slot] = _Worker(spec, mode, attempt, slot, worker_env(slot, gpus, self.jobs), done)
                worker, outcome = _next(done)
                del running[worker.slot]
                free.append(worker.slot)
                outcome.attempts = worker.attempt
                if outcome.status != "completed" and worker.attempt < ATTEMPTS:
                    events.retrying(worker.spec, outcome)
                    todo.appendleft((worker.spec, _retry_mode(outcome), worker.attempt + 1))
                else:
                    events.finished(worker.spec, outcome)
        except KeyboardInterrupt:
            stopped = self._stop(running, done, events)
            raise Interrupted(f"stopped {len(running)} running run(s) ({stopped}); "
                              f"{len(todo)} not started") from None

    @staticmethod
    def _stop(running: dict[int, _Worker], done: queue.Queue, events: Events) -> str:
        """Ask every worker to stop after its current step and save it; wait for them to."""
        for worker in running.values():
            worker.interrupt()
        saved = 0
        waiting = dict(running)
        while waiting:
            try:
                worker, outcome = done.get(timeout=0.5)
            except queue.Empty:  # an outcome the interrupted loop had taken already
                for slot in [slot for slot, w in waiting.items() if w.reported.is_set() and done.empty()]:
                    del waiting[slot]
                continue
            except KeyboardInterrupt:  # Ctrl-C again: the workers stop their step at once
                for worker in waiting.values():
                    worker.interrupt()
                continue
            waiting.pop(worker.slot, None)
            saved += outcome.status == "interrupted" and outcome.steps_done > 0
            if outcome.status == "completed":
                outcome.attempts = worker.attempt
                events.finished(worker.spec, outcome)
        return f"{saved} saved to continue"


def _next(done: queue.Queue) -> tuple[_Worker, Outcome]:
    """The next finished worker (waking up now and then: Ctrl-C must not wait for it)."""
    while True:
        try:
            return done.get(timeout=0.5)
        except queue.Empty:
            continue


# ----------------------------------------------------------------------------- Ray

def import_ray():
    try:
        import ray
    except ImportError:
        raise SdsctlError(RAY_MISSING) from None
    return ray


class RayExecutor:
    """Each run a Ray task (see the module docstring). ``task_fn`` is what the task calls on its
    worker (default :func:`sdsctl.experiments.runtask.run_shipped`); tests pass one that fails on purpose."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: float = 1, task_fn: Callable | None = None):
        if cpus_per_run <= 0:
            raise SdsctlError(f"--cpus-per-run {cpus_per_run}: must be positive")
        self.ray = import_ray()  # missing: an input error now, before any run
        self.address, self.cpus_per_run = address, cpus_per_run
        self.task_fn = task_fn or run_shipped
        self.gpus = 0.0
        self._remote = None

    def describe(self) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        per_run = "1 GPU" if self.gpus else f"{self.cpus_per_run:g} CPU(s)"
        return f"Ray tasks on {where} ({per_run} per run)"

    def _connect(self) -> bool:
        """Join the running Ray (a test session's), the cluster at ``address``, or start a local
        instance; True when this call started it (and must shut it down)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        # Ray's own notices (e.g. "Token authentication is enabled") are not sdsctl's to print in
        # the middle of its output: shown with `sdsctl -v` only, as transformers' and diffusers'
        level = logging.WARNING if os.environ.get("SDSCTL_VERBOSE") else logging.ERROR
        try:
            if self.address:
                ray.init(address=self.address, logging_level=level, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, logging_level=level, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises several kinds here
            where = f"the Ray cluster at --address {self.address}" if self.address else "a local Ray instance"
            raise SdsctlError(f"could not start or join {where}: {summarize(exc)}; check the address "
                              "(`ray status` on the head node prints it) and that the Ray versions agree") from None
        return True

    def _check_resources(self) -> None:
        ray = self.ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
        self.gpus = ray.cluster_resources().get("GPU", 0)
        if not self.gpus and cpus < self.cpus_per_run:
            raise SdsctlError(f"--cpus-per-run {self.cpus_per_run:g}: no node of the Ray cluster has that many "
                              f"CPUs (the largest has {cpus:g}); ask for fewer")

    def _submit(self, spec, mode: str) -> Any:
        if self._remote is None:
            self._remote = self.ray.remote(self.task_fn)
        files = pack(spec.path) if mode == "resume" else None
        # a lost worker (its node gone, killed for memory) is Ray's to reschedule: max_retries
        remote = self._remote.options(num_gpus=1 if self.gpus and spec.device != "cpu" else 0,
                                      num_cpus=self.cpus_per_run, max_retries=ATTEMPTS - 1, retry_exceptions=False,
                                      name=f"sdsctl {spec.describe()}"[:120])
        return remote.remote(task_for(spec, mode, files))

    def run(self, specs: list, events: Events) -> None:
        ray = self.ray
        started_here = self._connect()
        try:
            self._check_resources()
            with _sigterm_as_interrupt():
                self._run(specs, events)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, specs: list, events: Events) -> None:
        ray = self.ray
        pending: dict[Any, tuple[Any, int]] = {}
        try:
            for spec in specs:
                events.started(spec)
                pending[self._submit(spec, spec.state)] = (spec, 1)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    spec, attempt = pending.pop(ref)
                    outcome = self._result(ref, spec, attempt)
                    if outcome.status != "completed" and outcome.attempts < ATTEMPTS:
                        events.retrying(spec, outcome)
                        pending[self._submit(spec, _retry_mode(outcome))] = (spec, attempt + 1)
                    else:
                        events.finished(spec, outcome)
        except KeyboardInterrupt:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise Interrupted(f"cancelled {len(pending)} outstanding Ray task(s)") from None

    def _result(self, ref, spec, attempt: int) -> Outcome:
        """The task's outcome, its run directory written into the driver's folder."""
        ray = self.ray
        try:
            outcome = ray.get(ref)
        except ray.exceptions.WorkerCrashedError as exc:  # Ray rescheduled it already: no retry of ours
            return Outcome("failed", attempts=ATTEMPTS,
                           error=f"the Ray worker running it died, {ATTEMPTS} times ({summarize(exc)})")
        except ray.exceptions.RayError as exc:
            return Outcome("failed", attempts=attempt, error=f"Ray: {summarize(getattr(exc, 'cause', None) or exc)}")
        if outcome.files:
            install(outcome.files, spec.path)
        outcome.files, outcome.attempts = None, attempt
        return outcome


# ----------------------------------------------------------------------------- command-line options

#: the executor options ``compare`` and ``sweep`` share (Typer ``Annotated`` types)
ExecutorOption = Annotated[str, typer.Option(
    "--executor", metavar="local|ray",
    help="Where the runs execute: local (here; --jobs N processes) or ray (a local Ray instance, "
         "or the cluster at --address; pip install \"sdsctl[ray]\").")]
JobsOption = Annotated[Optional[int], typer.Option(
    "--jobs", "-j", help="local: N runs at once in worker processes, each pinned to one visible GPU when "
                         "there are GPUs (default 1: one after another in this process).")]
AddressOption = Annotated[Optional[str], typer.Option(
    "--address", metavar="ADDR", help="ray: the cluster to join (e.g. auto, or ray://HEAD:10001); "
                                     "default: a local Ray instance.")]
CpusPerRunOption = Annotated[Optional[float], typer.Option(
    "--cpus-per-run", help="ray: CPUs each run asks for on a cluster without GPUs (default 1); with "
                           "GPUs each run asks for one GPU.")]
#: the run options they share: the same model, device and length for every run, a CLIP score, the panel
ModelOption = Annotated[Optional[str], typer.Option(
    metavar="MODEL", help="Model for every run (shortcut for --set model=...).")]
DeviceOption = Annotated[Optional[str], typer.Option(
    metavar="DEVICE", help=f"{ACCEPTED}, for every run (shortcut for --set device=...).")]
StepsOption = Annotated[Optional[int], typer.Option(help="Steps of every run (shortcut for --set steps=...).")]
ClipOption = Annotated[Optional[Path], typer.Option(
    metavar="DIR", help="A local CLIP folder (transformers CLIPModel): adds a CLIP score.")]
NoLiveOption = Annotated[bool, typer.Option("--no-live", help="One line per run instead of the live panel.")]


def from_options(executor: str, jobs: int | None, address: str | None, cpus_per_run: float | None):
    """The executor the options name; an option for the other executor is an input error."""
    if executor not in EXECUTORS:
        raise SdsctlError(f"--executor {executor}: expected one of {', '.join(EXECUTORS)}")
    if executor == "local":
        for option, value in (("--address", address), ("--cpus-per-run", cpus_per_run)):
            if value is not None:
                raise SdsctlError(f"{option} is for --executor ray; add --executor ray, or drop {option}")
        return LocalExecutor(jobs if jobs is not None else 1)
    if jobs is not None:
        raise SdsctlError("--jobs is for --executor local; on Ray every run is a task and the cluster's "
                          "resources decide how many run at once (see --cpus-per-run)")
    return RayExecutor(address, cpus_per_run if cpus_per_run is not None else 1)
