"""One run's life, from a validated recipe to a run directory: :class:`Run`.

The phases, one method each (``docs/architecture.md``, "The life of a run")::

    open      the target directory: a fresh one (refused if it holds something) or a run to resume
    load      the model, under the run's lock; a signal here stops at once, nothing written
    prepare   the directory: recipe.yaml, metrics up to the starting step, previews after it dropped
    build     the components (:class:`~sdsctl.engine.loop.Optimization`) from the state or fresh
    steps     the loop: a step, its records logged every ``log_every``, previews, checkpoints
    finish    final.png, progress.png, state.pt, metrics and summary.json for the last step
    stop      the same for the step a signal left (a second signal: the last checked step)
    fail      non-finite numbers, a plugin's exception, out of memory: the last good state kept,
              the reason in summary.json (and error.log), :class:`~sdsctl.errors.RunFailed`

Reliability: the step's numbers are checked before θ moves, so a non-finite score stops the
run with the last good θ; SIGINT/SIGTERM finish the step and save (:class:`StopRequest`); the
saved state (θ, Adam, the generator, the guidance's own state, the step) makes ``sdsctl
resume`` continue exactly where the run stopped -- on the CPU, bit for bit.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from sdsctl import plugins
from sdsctl.devices import peak_memory_mb
from sdsctl.engine import scene
from sdsctl.engine.images import contact_sheet, save_image, save_view
from sdsctl.engine.loop import OOM, Optimization, blame, load_prior, placement, threads_for
from sdsctl.engine.recipe import LoadedRecipe, to_yaml
from sdsctl.engine.records import NonFinite, PendingRecords
from sdsctl.engine.rundir import RunDir, RunLock, check_target
from sdsctl.errors import PluginError, RunFailed, SdsctlError


@dataclasses.dataclass
class RunResult:
    status: str  # "completed" or "interrupted" (failures raise RunFailed)
    steps_done: int  # the step state.pt, final.png and summary.json hold
    steps: int
    run_dir: Path
    signal: str = ""  # SIGINT or SIGTERM, for an interrupted run
    note: str | None = None  # how it stopped, when not simply after a step


class StopNow(KeyboardInterrupt):
    """A signal that stops the run at once: while the model loads (nothing is written yet), or
    a second signal in the middle of a step (θ then goes back to the last checked step)."""


class StopRequest:
    """What SIGINT (Ctrl-C) and SIGTERM do, by phase of the run:

    * ``loading`` (the model loads): stop at once (:class:`StopNow`); nothing is written yet.
    * after that, the first signal asks the loop to stop after the current step and save it;
    * a second signal while a step computes stops that step (:class:`StopNow`): θ goes back
      to the last checked step, which is then saved;
    * while files are being written (``busy``, ``saving``) further signals wait: the files
      a stop writes (state.pt, final.png, progress.png, metrics.jsonl, summary.json) always
      describe one and the same step.

    The handler only sets flags and raises; what it has to say is queued in :attr:`notes`
    and shown by the loop (printing inside a signal handler can interrupt another print).
    """

    def __init__(self, reporter):
        self.reporter = reporter
        self.signal: int | None = None
        self.aborted = False
        self.phase = "loading"
        self.notes: list[str] = []
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase == "loading":
            self.signal = signum
            raise StopNow(name)
        if self.signal is None:
            self.signal = signum
            again = (" (Ctrl-C again stops the step at once, back to the last checked step)"
                     if signum == signal.SIGINT else "")
            self.notes.append(f"{name} received: finishing the current step, then saving{again}")
            return
        if self.phase == "stepping":
            self.aborted = True
            raise StopNow(name)
        self.notes.append(f"{name} received again: already stopping, the files are being saved")

    def request(self, signum: int, why: str) -> None:
        """A stop asked for by the run itself rather than by a signal (``why`` says what
        happened): as a first signal, the current step finishes and is saved."""
        if self.signal is None:
            self.signal = signum
            self.notes.append(f"{why}: finishing the current step, then saving")

    def show_notes(self) -> None:
        while self.notes:
            self.reporter.note(self.notes.pop(0))


    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class PipeGuard:
    """The reporter, with standard output closed under it (``sdsctl run ... | head``) turned into
    a stop as SIGTERM's: the step finishes and is saved, the run is marked interrupted and can be
    resumed. Standard output then goes to /dev/null (Python's advice for a broken pipe), so that
    nothing later fails on it."""

    def __init__(self, reporter, stop: StopRequest):
        self.reporter, self.stop = reporter, stop

    def __getattr__(self, name: str):
        attr = getattr(self.reporter, name)
        if not callable(attr):
            return attr

        def guarded(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except BrokenPipeError:
                _silence_stdout()
                self.stop.request(signal.SIGPIPE, "standard output was closed (broken pipe)")

        return guarded


def _silence_stdout() -> None:
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)

def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("sdsctl", "torch", "diffusers", "transformers", "pluggy", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def oom_message(step: int | None, device) -> str:
    """What to do about CUDA running out of memory (``step`` None: while loading the model)."""
    where = f"at step {step}" if step is not None else "while loading the model"
    kept = " The last good state is in state.pt: `sdsctl resume` continues from it." if step is not None else ""
    return (
        f"CUDA out of memory {where} on {device}. To use less memory: --set dtype=float16 "
        "(or bfloat16); a smaller image (--set parameterization.resolution=...); a guidance with "
        "fewer UNet rows (VSD needs the most); close other processes on the GPU (nvidia-smi); or "
        f"run on the CPU with --device cpu (slow).{kept}"
    )


def execute(loaded: LoadedRecipe, path: Path, reporter, *, overwrite: bool = False, resume: bool = False,
            prior=None, command: str = "sdsctl run") -> RunResult:
    """Run (or resume) a validated recipe into the run directory ``path``.

    ``prior``: the recipe's model already loaded on its device and dtype (``sdsctl compare``
    shares one among runs); None loads it. The run directory is locked for the whole call
    (:class:`~sdsctl.engine.rundir.RunLock`): a second writer gets an error naming this one. Raises
    :class:`StopNow` when a signal stopped it while the model loaded (nothing is written then)."""
    return Run(loaded, path, reporter, overwrite=overwrite, resume=resume, prior=prior, command=command).execute()


class Run:
    """One run (or resumed run) of a validated recipe into one directory; see the module docstring."""

    def __init__(self, loaded: LoadedRecipe, path: Path, reporter, *, overwrite: bool, resume: bool, prior,
                 command: str):
        self.loaded, self.recipe, self.path, self.reporter = loaded, loaded.recipe, path, reporter
        self.overwrite, self.resume, self.prior, self.command = overwrite, resume, prior, command
        self.device, self.dtype, dtype_warning = placement(self.recipe)
        self.threads = 0  # torch's CPU threads during the run (``execute`` sets them)
        self.base_summary: dict[str, Any] = {}  # the summary's fixed part (``prepare``)
        if dtype_warning:
            reporter.note(f"warning: {dtype_warning}")
        self.state: dict[str, Any] | None = None  # the saved state a resumed run starts from
        self.dir: RunDir | None = None
        self.opt: Optimization | None = None
        self.pending = PendingRecords()
        self.start = self.done = 0
        self.seconds_before = 0.0
        self.started = 0.0
        self.stop: StopRequest | None = None

    # -- the phases
    def execute(self) -> RunResult:
        if self.resume:
            self.dir = RunDir.open(self.path)
        else:
            check_target(self.path, self.overwrite)
        created = not self.path.exists()
        with RunLock(self.path).held(self.command, self.reporter) as lock, StopRequest(self.reporter) as stop, \
                threads_for(self.recipe) as self.threads:
            self.stop = stop
            stop.reporter = self.reporter = PipeGuard(self.reporter, stop)
            if self.resume:
                self.state = self.resumable_state()
            self.load(lock, created)
            stop.phase = "starting"
            self.prepare()
            return self.optimize()

    def resumable_state(self) -> dict[str, Any]:
        """The state a resumed run starts from; a completed run with nothing left is an input error."""
        previous, steps = self.dir.read_summary(), self.recipe.steps
        if previous.get("status") == "completed" and previous.get("steps_done", 0) >= steps:
            raise SdsctlError(f"{self.path} is a completed run ({previous.get('steps_done')}/{steps} steps); "
                              f"nothing to resume. To continue it: sdsctl resume {self.path} --set steps=N "
                              f"(N > {previous.get('steps_done')})")
        return self.dir.load_state()

    def load(self, lock: RunLock, created: bool) -> None:
        """Load the model unless given one; a signal meanwhile stops at once (StopNow), leaving
        nothing behind (a directory this call created is removed again)."""
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            if self.prior is None:
                self.reporter.loading(f"loading model {self.loaded.model_info.source} on {self.device}")
                self.prior = load_prior(self.loaded, self.device, self.dtype)
        except KeyboardInterrupt:
            self.reporter.close()
            lock.release()
            if created and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
            raise StopNow(self.stop.name or "SIGINT") from None

    def prepare(self) -> None:
        """The directory's recipe, metrics and previews as of the starting step; the summary's
        fixed part."""
        if not self.resume:
            self.dir = RunDir.create(self.path, self.overwrite)
            self.dir.write_recipe(f"# resolved by sdsctl from {self.loaded.origin}\n" + to_yaml(self.recipe))
        else:
            _update_recipe(self.dir, self.loaded)
        self.start = self.done = self.state["step"] if self.state else 0
        self.dir.load_metrics(self.start)
        self.dir.drop_previews_after(self.start)
        self.seconds_before = self.state["seconds"] if self.state else 0.0
        self.started = time.perf_counter()
        prior, device = self.prior, self.device
        self.base_summary = {"steps": self.recipe.steps, "device": str(device), "threads": self.threads,
                             "dtype": str(self.dtype).removeprefix("torch."),
                             "model": prior.summary() if hasattr(prior, "summary") else {}, "recipe": "recipe.yaml",
                             "versions": versions()}
        if device.type == "cuda":
            self.base_summary["device_name"] = torch.cuda.get_device_name(device)

    def optimize(self) -> RunResult:
        """Build, step, and end one way or another: completed, stopped or failed."""
        try:
            try:
                self.build()
                self.steps()
            except NonFinite as exc:
                self.fail_non_finite(exc)
            except PluginError as exc:
                self.fail_plugin(exc)
            except OOM:
                self.fail_oom()
        except StopNow:  # a second signal in the middle of a step: back to the last checked step
            return self.stopped_mid_step()
        else:
            if self.done < self.recipe.steps:
                return self.stopped(self.done)
            return self.complete()
        finally:
            self.stop.phase = "saving"
            self.reporter.close()
            if self.opt is not None:
                self.opt.close()  # after the last save: VSD's LoRA leaves the shared UNet

    def build(self) -> None:
        """The components, from the saved state or initialized; the first summary and panel."""
        self.opt = opt = Optimization(self.loaded, self.prior, self.device, self.dtype)
        self.prior.release_text_encoders()  # the components have encoded their prompts
        if self.state:
            opt.load_state(self.state)
            if opt.device_note:
                self.reporter.note(f"note: {opt.device_note}")
        else:
            opt.initialize()
        opt.checkpoint(self.start)
        self.dir.write_summary(self.summary("running", self.start))
        self.reporter.start({"title": _title(self.loaded), "steps": self.recipe.steps, "start_step": self.start,
                             "device": str(self.device), "threads": self.threads, "run_dir": str(self.path),
                             "preview_every": self.recipe.output.preview_every})

    def steps(self) -> None:
        """Steps until the last one or a signal; every ``log_every`` steps the records are
        fetched and checked, previews and checkpoints as ``output`` says."""
        out, stop = self.recipe.output, self.stop
        for k in range(self.start, self.recipe.steps):
            stop.show_notes()
            if stop.signal is not None:
                break
            stop.phase = "stepping"  # a second signal may stop the step itself
            record = self.opt.step(k)
            stop.phase = "busy"
            self.done = done = k + 1
            record.host["seconds"] = round(self.seconds_before + time.perf_counter() - self.started, 4)
            self.pending.add(record)
            preview = done % out.preview_every == 0 or done == self.recipe.steps
            if preview or done % out.log_every == 0 or done % out.checkpoint_every == 0:
                self.log(done)
            if preview:
                self.preview(done)
            if done % out.checkpoint_every == 0:
                self.save(done)
        stop.phase = "saving"
        self.log(self.done)  # stopped between logging steps

    def preview(self, done: int) -> None:
        image, view_size = self.opt.image(), self.recipe.output.view_size
        save_image(image, self.dir.preview_path(done))
        if max(image.shape[-2:]) < view_size:  # an enlarged copy, where it enlarges
            save_view(image, self.dir.preview_view_path(done, view_size), view_size)
        self.reporter.preview(done, image)

    def complete(self) -> RunResult:
        self.reporter.close()
        image = self.finish(self.done)
        metrics = _metrics(self.opt, image, self.reporter)
        extra = self.scene_outputs() if self.opt.scene else {}
        self.dir.write_summary(self.summary("completed", self.done, metrics=metrics, **extra))
        return RunResult("completed", self.done, self.recipe.steps, self.path)

    # -- stops
    def stopped(self, step: int, note: str | None = None) -> RunResult:
        """Save everything for ``step`` (signals wait meanwhile) and report the stop."""
        stop = self.stop
        stop.phase = "saving"
        stop.show_notes()
        self.reporter.close()
        if self.opt is None:
            self.dir.flush_metrics()
        else:
            self.finish(step)
        extra = {"signal": stop.name} if stop.name else {}
        self.dir.write_summary(self.summary("interrupted", step, **extra, **({"note": note} if note else {})))
        return RunResult("interrupted", step, self.recipe.steps, self.path, signal=stop.name, note=note)

    def stopped_mid_step(self) -> RunResult:
        self.stop.phase = "saving"
        if self.opt is None:
            return self.stopped(self.start)
        done = self.opt.restore_checked()
        self.dir.truncate_metrics(done)
        return self.stopped(done, note=f"a second signal stopped the step in progress; the run went back to step "
                                       f"{done}, the last checked step")

    # -- failures
    def fail_non_finite(self, exc: NonFinite) -> None:
        self.stop.phase = "saving"
        done = self.opt.restore_checked()
        kept = self.keep_good(done)
        message = (f"non-finite value at step {exc.step}: {exc.term} is {exc.value} "
                   f"({_term_owner(exc.term, self.loaded)}). Stopped; {kept}. {_non_finite_advice(self.recipe)}")
        self.dir.write_summary(self.summary("failed", done, error=message, failed_step=exc.step,
                                            failed_term=exc.term))
        raise RunFailed(message) from None

    def fail_plugin(self, exc: PluginError) -> None:
        self.stop.phase = "saving"
        self.dir.write_error_log("".join(traceback.format_exception(exc.__cause__ or exc)))
        failed_at, done = self.done + 1, self.done
        if self.opt is not None:
            done = self.settle(done)
        kept = self.keep_good(done)
        message = f"{exc}. Stopped at step {failed_at}; {kept}; traceback in {self.dir.file('error.log')}"
        self.dir.write_summary(self.summary("failed", done, error=message))
        raise RunFailed(message) from None

    def fail_oom(self) -> None:
        self.stop.phase = "saving"
        torch.cuda.empty_cache()
        done = self.done
        try:
            if self.opt is not None:
                done = self.settle(done)
            self.keep_good(done)
        except OOM:  # saving needs a little memory too; the last checkpoint stays
            self.dir.flush_metrics()
        message = oom_message(done + 1, self.device)
        self.dir.write_summary(self.summary("failed", done, error=message))
        raise RunFailed(message) from None

    def settle(self, step: int) -> int:
        """After a failure: log what is pending, or go back to the last checked step."""
        try:
            self.log(step)
            return step
        except NonFinite:
            return self.opt.restore_checked()

    def keep_good(self, done: int) -> str:
        """After a failure: save θ and its image if θ is still finite, else keep the last checkpoint."""
        if self.opt is None:
            self.dir.flush_metrics()
            return "nothing was optimized yet"
        if self.opt.theta_finite():
            self.finish(done)
            return f"the last good state (step {done}) is in {self.dir.file('state.pt')} and its image in final.png"
        self.dir.flush_metrics()
        return f"θ itself is not finite; {self.dir.file('state.pt')} keeps the last checkpoint"

    # -- files
    def log(self, step: int) -> None:
        """Fetch the pending steps' numbers (one host sync), write and show them; θ at ``step``
        is then known good (raises NonFinite otherwise)."""
        for record in self.pending.flush():
            self.dir.add_metrics(record)
            self.reporter.step(record)
        self.opt.checkpoint(step)

    def save(self, step: int) -> None:
        self.dir.save_state(self.opt.state(step, self.seconds_before + time.perf_counter() - self.started))
        self.dir.flush_metrics()

    def finish(self, step: int) -> torch.Tensor:
        """final.png (and its enlarged copy), progress.png, state.pt and the metrics for ``step``."""
        image, view_size = self.opt.final_image(), self.recipe.output.view_size
        save_image(image, self.dir.file("final.png"))
        if view_size:
            save_view(image, self.dir.file(f"final_{view_size}.png"), view_size)
        sheet = contact_sheet(self.dir.preview_paths(), labels=True)
        if sheet is not None:
            save_image(sheet, self.dir.file("progress.png"))
        self.save(step)
        return image

    def scene_outputs(self) -> dict[str, Any]:
        """A 3D run's views/, turntable, mesh and per-view metrics (:mod:`sdsctl.engine.scene`);
        what goes into summary.json about them."""
        opt = self.opt
        with blame(self.loaded.components["cameras"], "giving the held-out views"):
            cameras = opt.cameras.evaluation()
        with blame(self.loaded.components["parameterization"], "rendering the held-out views"):
            images = scene.render_views(opt.param, cameras)
            scene.write_views(self.dir.file("views"), cameras, images, self.recipe.output.view_size)
            scene.write_turntable(self.path, scene.render_views(opt.param, scene.orbit(cameras[0])))
            mesh, textured = scene.meshes_of(opt.param, cameras)
        written = scene.write_mesh(self.path, mesh, textured) if mesh is not None else []
        per_view = [_metrics(opt, image, self.reporter) for image in images]
        views = [{"camera": camera.as_dict(), "file": f"views/{scene.view_name(camera)}.png", "metrics": metrics}
                 for camera, metrics in zip(cameras, per_view)]
        found = None if mesh is None else {"vertices": len(mesh.vertices), "faces": len(mesh.faces),
                                           "files": [path.name for path in written]}
        return {"views": views, "view_metrics": scene.aggregate(per_view), "mesh": found}

    def summary(self, status: str, done: int, **extra) -> dict[str, Any]:
        session = time.perf_counter() - self.started
        start = self.start
        return {"status": status, "steps_done": done, **self.base_summary,
                "seconds": round(self.seconds_before + session, 3),
                "steps_per_second": round((done - start) / session, 3) if session > 0 and done > start else 0.0,
                "peak_memory_mb": round(peak_memory_mb(self.device), 1), **extra}


def _update_recipe(run: RunDir, loaded: LoadedRecipe) -> None:
    """A run resumed with ``--set`` (e.g. more steps) goes on with the changed recipe: write it."""
    text = run.file("recipe.yaml").read_text()
    body = to_yaml(loaded.recipe)
    if text.endswith(body):
        return
    lines = text.splitlines(keepends=True)
    first_key = next((i for i, x in enumerate(lines) if not x.startswith("#")), len(lines))
    header = "".join(line for line in lines[:first_key])
    run.write_recipe(f"{header}# resumed with {loaded.origin}\n{body}")


def _title(loaded: LoadedRecipe) -> str:
    r = loaded.recipe
    return f"{r.guidance.name} on {r.parameterization.name} · {r.prompt!r}"


def _metrics(opt: Optimization, image: torch.Tensor, reporter) -> dict[str, Any]:
    """Every registered metric that applies to the prior, on the final image."""
    results: dict[str, Any] = {}
    for name, reg in plugins.components("metrics").items():
        try:
            with blame(reg, "scoring the final image"):
                if not reg.obj.applies_to(opt.prior):
                    continue
                metric = reg.obj(reg.obj.Config(name=name), opt.ctx)
                results[name] = metric(image, opt.recipe.prompt)
        except PluginError as exc:  # a metric must not cost the run its result
            reporter.note(f"warning: {exc}")
            results[name] = {"error": str(exc)}
    return results


def _non_finite_advice(recipe) -> str:
    """What to turn when the step's numbers overflow: the knobs that change the step's size."""
    knobs = ["optimizer.lr", "the guidance scale"]
    if recipe.optimizer.fit == "full":
        knobs.append("optimizer.score_scale (the amplification)")
    advice = f"Lower {', '.join(knobs[:-1])} or {knobs[-1]}"
    if recipe.dtype != "float32":
        advice += ", or use dtype float32"
    return advice + "."


def _term_owner(term: str, loaded: LoadedRecipe) -> str:
    if term == "render":
        return f"the rendered latents of parameterization {loaded.recipe.parameterization.name!r}"
    if term in ("score", "loss"):
        return (f"the weighted score of guidance {loaded.recipe.guidance.name!r} "
                f"and weighting {loaded.recipe.weighting.name!r}")
    return f"term {term!r} of guidance {loaded.recipe.guidance.name!r}"
