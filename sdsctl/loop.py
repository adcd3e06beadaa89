"""The optimization loop -- one loop for every method (``docs/architecture.md``).

One step::

    times  = schedule(step)
    x      = parameterization()                      # latents, or RGB
    z      = x if space == "latent" else prior.encode_images(x)
    out    = guidance.score(z.detach(), times)       # under no_grad: no gradient through the UNet
    g      = weighting(times.t) * out.score
    target = (z - score_scale * g).detach()          # z* = z − k·g
    loss   = 0.5 * ||z - target||^2                  # its gradient w.r.t. z is k·g
    fit θ to target                                  # optimizer.fit: one Adam step (adam) or until
                                                     # R(θ) ≈ z* (full: assignment or inner steps)

For RGB parameterizations ``optimizer.fit_space`` may add or substitute an image-space loss
0.5·‖x − sg(x*)‖² (``image``: instead of the latent loss, no encoder graph; ``both``: added
with weight ``image_weight``); x* is HiFA's decoded denoised estimate or the decoded target
(``optimizer.image_target``).

Reliability (issue 5): the step's numbers are checked before θ moves, so a non-finite score
stops the run with the last good θ; SIGINT/SIGTERM finish the step and save; the saved state
(θ, Adam, the generator, the guidance's own state, the step) makes ``sdsctl resume`` continue
exactly where the run stopped -- on the CPU, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import math
import platform
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import plugins
from .components import RunContext
from .errors import PluginError, RunFailed, SdsctlError
from .images import contact_sheet, save_image
from .panel import peak_memory_mb
from .plugins import Registered
from .recipe import LoadedRecipe, to_yaml
from .records import NonFinite, PendingRecords, StepRecord
from .rundir import RunDir, check_target

#: CUDA out-of-memory (torch.cuda.OutOfMemoryError before torch 2.5)
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class RunResult:
    status: str  # "completed" or "interrupted" (failures raise RunFailed)
    steps_done: int
    steps: int
    run_dir: Path


@dataclasses.dataclass
class FitTarget:
    """What θ is fitted to in one step: the target latent z* = z − k·g (``fit_space`` latent or
    both) and/or the target image x* (image or both: ``optimizer.image_target``)."""

    latent: torch.Tensor | None
    image: torch.Tensor | None


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; an unavailable device is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SdsctlError(f"device: {name} requested, but torch sees no CUDA device "
                              "(a CPU build of torch, or no GPU); use --device cpu or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SdsctlError(f"device: {name} requested, but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SdsctlError(f"device: {name} requested, but MPS is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The dtype the model's weights are loaded in (θ, Adam and the guidance arithmetic stay
    float32). bfloat16 runs on CUDA and on the CPU; float16 only on CUDA (on the CPU many of
    its kernels are missing or slower than float32)."""
    if name == "float16" and device.type != "cuda":
        return torch.float32, (f"dtype float16 is for CUDA devices; running in float32 on {device.type} "
                               "(bfloat16 halves the memory on the CPU too: --set dtype=bfloat16)")
    if name == "bfloat16" and device.type not in ("cuda", "cpu"):
        return torch.float32, f"dtype bfloat16 is for CUDA and CPU devices; running in float32 on {device.type}"
    return DTYPES[name], None


@contextlib.contextmanager
def blame(reg: Registered, action: str):
    """Turn an exception inside a plugin into a PluginError naming the plugin and component."""
    try:
        yield
    except (SdsctlError, NonFinite, KeyboardInterrupt, OOM):
        raise
    except Exception as exc:
        raise PluginError(f"{reg.describe()} failed while {action}: {type(exc).__name__}: {exc}") from exc


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT aborts."""

    def __init__(self, reporter):
        self.reporter = reporter
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        self.reporter.note(f"{signal.Signals(signum).name} received: finishing the step, then saving "
                           "(press Ctrl-C again to abort without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


class Optimization:
    """The components of one run and the step that ties them together."""

    def __init__(self, loaded: LoadedRecipe, prior, device: torch.device, dtype: torch.dtype):
        recipe = loaded.recipe
        self.recipe, self.regs, self.prior = recipe, loaded.components, prior
        torch.manual_seed(recipe.seed)  # modules' default weight init, should a plugin use it
        self.generator = torch.Generator(device=device).manual_seed(recipe.seed)
        self.ctx = RunContext(prior=prior, recipe=recipe, device=device, dtype=dtype,
                              generator=self.generator, steps=recipe.steps)

        def build(section: str):
            reg = self.regs[section]
            with blame(reg, "starting"):
                return reg.obj(getattr(recipe, section), self.ctx)

        self.param = build("parameterization")
        with blame(self.regs["parameterization"], "starting"):
            self.param.to(device)
            with torch.no_grad():  # the size it renders, for a noise schedule that depends on it (FLUX's shift)
                shape = self.param().shape[-2:]
        factor = prior.vae_scale_factor if self.param.space == "latent" else 1
        prior.set_image_size(shape[0] * factor, shape[1] * factor)
        self.guidance = build("guidance")
        self.schedule = build("schedule")
        self.weighting = build("weighting")
        opt = recipe.optimizer
        self.optimizer = torch.optim.Adam(self.param.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps)
        with blame(self.regs["model"], "preparing its fast paths"):
            prior.accelerate(channels_last=recipe.channels_last, compile=recipe.compile)
        self.latent = self.param.space == "latent"

    def initialize(self) -> None:
        with blame(self.regs["parameterization"], "initializing"):
            self.param.initialize()

    # -- state
    def state(self, step: int, seconds: float) -> dict[str, Any]:
        return {
            "step": step,
            "seconds": seconds,
            "param": self.param.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "guidance": self.guidance.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        with blame(self.regs["parameterization"], "loading its state"):
            self.param.load_state_dict(state["param"])
            self.optimizer.load_state_dict(state["optimizer"])
        with blame(self.regs["guidance"], "loading its state"):
            self.guidance.load_state_dict(state["guidance"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    def theta_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.param.parameters())

    def image(self) -> torch.Tensor:
        with blame(self.regs["parameterization"], "rendering the image"):
            return self.param.image()

    # -- the step
    def render(self, encode: bool = True) -> torch.Tensor:
        """The step's latents z (RGB parameterizations: through the VAE encoder).

        ``encode=False`` (refits of the image loss alone) renders only ``last_rgb`` and
        returns it: no latents are needed then.
        """
        with blame(self.regs["parameterization"], "rendering"):
            x = self.param()
            self.last_rgb = x
            if self.latent or not encode:
                return x
            if self.recipe.optimizer.fit_space == "image":  # z only feeds the score: no encoder graph
                with torch.no_grad():
                    return self.prior.encode_images(x)
            return self.prior.encode_images(x)

    def target(self, z: torch.Tensor, step: torch.Tensor, out) -> FitTarget:
        """The step's target: z* = z − k·g and/or the image x* of ``optimizer.image_target``."""
        opt = self.recipe.optimizer
        latent = (z - step).detach()
        image = None
        if opt.fit_space != "latent":
            if opt.image_target == "hifa":
                if out.denoised is None:
                    raise PluginError(f"{self.regs['guidance'].describe()} gave no denoised estimate, which "
                                      "image_target: hifa needs")
                source = out.denoised
            else:
                source = latent
            with blame(self.regs["model"], "decoding the image target"), torch.no_grad():
                image = self.prior.decode_latents(source.detach())
        return FitTarget(latent=None if opt.fit_space == "image" else latent, image=image)

    def fit_loss(self, z: torch.Tensor, target: FitTarget) -> torch.Tensor:
        """0.5·‖z − z*‖² and/or ``image_weight``·0.5·‖x − x*‖² (x: the last rendered RGB)."""
        loss = torch.zeros((), device=z.device)
        if target.latent is not None:
            loss = loss + 0.5 * (z - target.latent).pow(2).sum()
        if target.image is not None:
            weight = 1.0 if target.latent is None else self.recipe.optimizer.image_weight
            loss = loss + weight * 0.5 * (self.last_rgb - target.image).pow(2).sum()
        return loss

    def adam_step(self, z: torch.Tensor, target: FitTarget) -> torch.Tensor:
        """One Adam step of θ towards the step's target (``z`` and ``last_rgb`` from one render)."""
        loss = self.fit_loss(z, target)
        self.optimizer.zero_grad(set_to_none=True)
        with blame(self.regs["parameterization"], "back-propagating"):
            loss.backward()
        self.optimizer.step()
        return loss

    def residual(self, z: torch.Tensor, target: FitTarget) -> torch.Tensor:
        """‖R(θ) − target‖ in the space the fit measures: latents, or the image for ``fit_space: image``."""
        if target.latent is not None:
            return (z.detach() - target.latent).norm()
        return (self.last_rgb.detach() - target.image).norm()

    def fit(self, z: torch.Tensor, target: FitTarget) -> tuple[int, torch.Tensor | None]:
        """Move θ towards ``target`` by ``optimizer.fit``; returns (Adam steps taken, the
        reached fraction 1 − ‖R(θ) − target‖ / ‖R(θ₀) − target‖, or None where measuring it
        would cost an extra VAE encoder pass)."""
        opt = self.recipe.optimizer
        encode = target.latent is not None
        start = self.residual(z, target).clamp_min(1e-20)
        if opt.fit == "adam":
            self.adam_step(z, target)
            for _ in range(opt.inner_steps - 1):
                self.adam_step(self.render(encode=encode), target)
            if not self.latent and encode:
                return opt.inner_steps, None
            with torch.no_grad():
                return opt.inner_steps, 1 - self.residual(self.render(encode=encode), target) / start
        in_render_space = target.latent if self.latent else (None if encode else target.image)
        if in_render_space is not None:
            with blame(self.regs["parameterization"], "assigning the target"), torch.no_grad():
                assigned = self.param.assign(in_render_space)
            if assigned:
                with torch.no_grad():
                    return 0, 1 - self.residual(self.render(encode=encode), target) / start
        limit = opt.fit_tolerance * start
        steps = 0
        while True:
            self.adam_step(z, target)
            steps += 1
            z = self.render(encode=encode)
            remaining = self.residual(z, target)
            if steps >= opt.max_fit_steps or bool(remaining <= limit):  # a sync per inner step: the fit's stop test
                return steps, 1 - remaining / start

    def step(self, k: int) -> StepRecord:
        """Step ``k`` (0-based). Its numbers stay on the device (``sdsctl.records``): no host
        sync here unless the fit itself needs one (``fit: full``'s stop test)."""
        regs = self.regs
        with blame(regs["schedule"], f"giving step {k + 1} its timestep"):
            times = self.schedule(k)
        z = self.render()
        with torch.no_grad(), blame(regs["guidance"], f"computing the score at step {k + 1}"):
            out = self.guidance.score(z.detach(), times)
        with blame(regs["weighting"], f"weighting t={times.t}"):
            w = float(self.weighting(times.t))
        step = (self.recipe.optimizer.score_scale * w) * out.score
        target = self.target(z, step, out)
        with torch.no_grad():
            values = [z.detach().norm(), *(_as_tensor(v, z.device) for v in out.norms.values()),
                      step.norm(), self.fit_loss(z, target).detach()]
        fit_steps, fraction = self.fit(z, target)
        names = ["render", *out.norms, "score", "loss"]
        if fraction is not None:
            names.append("fit_fraction")
            values.append(fraction.detach())
        host = {"step": k + 1, "phase": times.phase, "t": times.t, "timesteps": {"t": times.t, **out.timesteps},
                "weight": w, "lr": self.optimizer.param_groups[0]["lr"], "fit_steps": fit_steps}
        return StepRecord(host=host, names=names, values=torch.stack([v.float() for v in values]),
                          norms=list(out.norms))

    def checkpoint(self, step: int) -> None:
        """Keep an in-memory copy of the state at ``step``, whose numbers were all finite: a
        non-finite value found at the next logging step restores it (:meth:`restore_checked`)."""
        self.checked = (step, copy.deepcopy(self.state(step, 0.0)))

    def restore_checked(self) -> int:
        """Put back the state of the last checked step; returns that step."""
        step, state = self.checked
        self.load_state(copy.deepcopy(state))
        return step

    def close(self) -> None:
        """Let the guidance undo what it did to the shared prior (VSD's LoRA)."""
        with blame(self.regs["guidance"], "closing"):
            self.guidance.close()


def _as_tensor(value, device: torch.device) -> torch.Tensor:
    """A guidance's norm as a 0-dim float32 tensor on the device (a Python float is filled in
    on the device, not copied from the host)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.full((), float(value), device=device)


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


def execute(loaded: LoadedRecipe, path: Path, reporter, *, overwrite: bool = False, resume: bool = False,
            prior=None) -> RunResult:
    """Run (or resume) a validated recipe into the run directory ``path``.

    ``prior``: the recipe's model already loaded on its device and dtype (``sdsctl compare``
    shares one among runs); None loads it."""
    recipe = loaded.recipe
    device = resolve_device(recipe.device)
    dtype, dtype_warning = resolve_dtype(recipe.dtype, device)
    if dtype_warning:
        reporter.note(f"warning: {dtype_warning}")
    state = None
    if resume:
        run = RunDir.open(path)
        previous = run.read_summary()
        if previous.get("status") == "completed" and previous.get("steps_done", 0) >= recipe.steps:
            raise SdsctlError(f"{path} is a completed run ({previous.get('steps_done')}/{recipe.steps} steps); "
                              "nothing to resume (raise `steps` in its recipe.yaml to continue it)")
        state = run.load_state()
    else:
        check_target(path, overwrite)

    # Ctrl-C while the model loads raises KeyboardInterrupt: nothing has been written yet.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if prior is None:
        with blame(loaded.components["model"], "loading the model"):
            prior = loaded.components["model"].obj(recipe.model).load(device, dtype)
    with StopRequest(reporter) as stop:
        if not resume:
            run = RunDir.create(path, overwrite)
            run.write_recipe(f"# resolved by sdsctl from {loaded.origin}\n" + to_yaml(recipe))
        start = state["step"] if state else 0
        run.load_metrics(start)
        run.drop_previews_after(start)
        seconds_before = state["seconds"] if state else 0.0
        started = time.perf_counter()
        base_summary = {"steps": recipe.steps, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                        "model": prior.summary() if hasattr(prior, "summary") else {}, "recipe": "recipe.yaml", "versions": versions()}
        if device.type == "cuda":
            base_summary["device_name"] = torch.cuda.get_device_name(device)
        opt: Optimization | None = None

        def summary(status: str, done: int, **extra) -> dict[str, Any]:
            session = time.perf_counter() - started
            return {"status": status, "steps_done": done, **base_summary,
                    "seconds": round(seconds_before + session, 3),
                    "steps_per_second": round((done - start) / session, 3) if session > 0 and done > start else 0.0,
                    "peak_memory_mb": round(peak_memory_mb(device), 1), **extra}

        def save(step: int) -> None:
            run.save_state(opt.state(step, seconds_before + time.perf_counter() - started))
            run.flush_metrics()

        def finish(step: int) -> torch.Tensor:
            image = opt.image()
            save_image(image, run.file("final.png"))
            sheet = contact_sheet(run.preview_paths())
            if sheet is not None:
                save_image(sheet, run.file("progress.png"))
            save(step)
            return image

        pending = PendingRecords()

        def log(step: int) -> None:
            """Fetch the pending steps' numbers (one host sync), write and show them; θ at
            ``step`` is then known good (raises NonFinite otherwise)."""
            for record in pending.flush():
                run.add_metrics(record)
                reporter.step(record)
            opt.checkpoint(step)

        def settle(step: int) -> int:
            """After a failure: log what is pending, or go back to the last checked step."""
            try:
                log(step)
                return step
            except NonFinite:
                return opt.restore_checked()

        out = recipe.output
        every, ckpt, log_every = out.preview_every, out.checkpoint_every, out.log_every
        done = start
        try:
            try:
                opt = Optimization(loaded, prior, device, dtype)
                prior.release_text_encoders()  # the components have encoded their prompts
                if state:
                    opt.load_state(state)
                else:
                    opt.initialize()
                opt.checkpoint(start)
                run.write_summary(summary("running", start))
                reporter.start({"title": _title(loaded), "steps": recipe.steps, "start_step": start,
                                "device": str(device), "run_dir": str(path)})
                for k in range(start, recipe.steps):
                    if stop.signal is not None:
                        break
                    record = opt.step(k)
                    done = k + 1
                    record.host["seconds"] = round(seconds_before + time.perf_counter() - started, 4)
                    pending.add(record)
                    preview = done % every == 0 or done == recipe.steps
                    if preview or done % log_every == 0 or done % ckpt == 0:
                        log(done)
                    if preview:
                        image = opt.image()
                        save_image(image, run.preview_path(done))
                        reporter.preview(done, image)
                    if done % ckpt == 0:
                        save(done)
                log(done)  # stopped between logging steps
            except NonFinite as exc:
                done = opt.restore_checked()
                kept = _keep_good(opt, run, done, finish)
                message = (f"non-finite value at step {exc.step}: {exc.term} is {exc.value} "
                           f"({_term_owner(exc.term, loaded)}). Stopped; {kept}. {_non_finite_advice(recipe)}")
                run.write_summary(summary("failed", done, error=message, failed_step=exc.step, failed_term=exc.term))
                raise RunFailed(message) from None
            except PluginError as exc:
                run.write_error_log("".join(traceback.format_exception(exc.__cause__ or exc)))
                failed_at = done + 1
                if opt is not None:
                    done = settle(done)
                kept = _keep_good(opt, run, done, finish)
                message = f"{exc}. Stopped at step {failed_at}; {kept}; traceback in {run.file('error.log')}"
                run.write_summary(summary("failed", done, error=message))
                raise RunFailed(message) from None
            except OOM:
                torch.cuda.empty_cache()
                try:
                    if opt is not None:
                        done = settle(done)
                    _keep_good(opt, run, done, finish)
                except OOM:  # saving needs a little memory too; the last checkpoint stays
                    run.flush_metrics()
                message = oom_message(done + 1, device)
                run.write_summary(summary("failed", done, error=message))
                raise RunFailed(message) from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last checkpoint
            run.flush_metrics()
            run.write_summary(summary("interrupted", done, note="aborted mid-step; state.pt is the last checkpoint"))
            return RunResult("interrupted", done, recipe.steps, path)
        else:
            reporter.close()
            image = finish(done)
            if done < recipe.steps:
                run.write_summary(summary("interrupted", done))
                return RunResult("interrupted", done, recipe.steps, path)
            metrics = _metrics(opt, image, reporter)
            run.write_summary(summary("completed", done, metrics=metrics))
            return RunResult("completed", done, recipe.steps, path)
        finally:
            reporter.close()
            if opt is not None:
                opt.close()  # after the last save: VSD's LoRA leaves the shared UNet


def _keep_good(opt: Optimization | None, run: RunDir, done: int, finish) -> str:
    """After a failure: save θ and its image if θ is still finite, else keep the last checkpoint."""
    if opt is None:
        run.flush_metrics()
        return "nothing was optimized yet"
    if opt.theta_finite():
        finish(done)
        return f"the last good state (step {done}) is in {run.file('state.pt')} and its image in final.png"
    run.flush_metrics()
    return f"θ itself is not finite; {run.file('state.pt')} keeps the last checkpoint"


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
        return f"the weighted score of guidance {loaded.recipe.guidance.name!r} and weighting {loaded.recipe.weighting.name!r}"
    return f"term {term!r} of guidance {loaded.recipe.guidance.name!r}"
