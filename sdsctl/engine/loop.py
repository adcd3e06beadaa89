"""The optimization loop -- one loop for every method (``docs/architecture.md``).

One step::

    times  = schedule(step)
    x      = parameterization()                      # latents, or RGB
    z      = x if space == "latent" else prior.encode_images(x)
    out    = guidance.score(z.detach(), times)       # under no_grad: no gradient through the UNet
    g      = weighting(times.t) * out.score
    target = (z - score_scale * g).detach()          # z* = z − k·g
    loss   = 0.5 * ||z - target||^2                  # its gradient w.r.t. z is z − target = k·g,
                                                     # back-propagated from z directly
    fit θ to target                                  # optimizer.fit: one Adam step (adam) or until
                                                     # R(θ) ≈ z* (full: assignment or inner steps)

For RGB parameterizations ``optimizer.fit_space`` may add or substitute an image-space loss
0.5·‖x − sg(x*)‖² (``image``: instead of the latent loss, no encoder graph; ``both``: added
with weight ``image_weight``); x* is HiFA's decoded denoised estimate or the decoded target
(``optimizer.image_target``).

A run's life around the steps -- loading, the run directory, signals, failures -- is
:class:`sdsctl.engine.run.Run`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import torch

from sdsctl import devices
from sdsctl.cameras import VIEW_WORDS, view_prompt, view_word
from sdsctl.components import RunContext
from sdsctl.engine.recipe import LoadedRecipe
from sdsctl.engine.records import NonFinite, StepRecord
from sdsctl.engine.scene import render_views
from sdsctl.errors import PluginError, SdsctlError
from sdsctl.plugins import Registered

#: CUDA out-of-memory (torch.cuda.OutOfMemoryError before torch 2.5)
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class FitTarget:
    """What θ is fitted to in one step: the target latent z* = z − k·g (``fit_space`` latent or
    both) and/or the target image x* (image or both: ``optimizer.image_target``)."""

    latent: torch.Tensor | None
    image: torch.Tensor | None


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; an unavailable device is an input error
    naming the devices that are there (:mod:`sdsctl.devices`)."""
    return devices.resolve(name)


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


def placement(recipe) -> tuple[torch.device, torch.dtype, str | None]:
    """Where and in which dtype a recipe's model runs: (device, dtype, a warning or None) --
    the one resolution every command uses (run, compare's executors, bench)."""
    device = resolve_device(recipe.device)
    dtype, warning = resolve_dtype(recipe.dtype, device)
    return device, dtype, warning


@contextlib.contextmanager
def threads_for(recipe):
    """torch's CPU threads set to the recipe's ``threads`` for a ``with`` block (unset: torch's
    default, which ``OMP_NUM_THREADS`` decides) and put back after it, so that a process running
    several recipes (compare's in-process executor) gives each its own; yields the number in
    use. On a busy or small machine fewer threads can be faster (docs/performance.md)."""
    before = torch.get_num_threads()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def load_prior(loaded: LoadedRecipe, device: torch.device, dtype: torch.dtype):
    """The recipe's model loaded by its plugin on ``device`` in ``dtype`` (a failing plugin is
    named: :class:`~sdsctl.errors.PluginError`)."""
    reg = loaded.components["model"]
    with blame(reg, "loading the model"):
        return reg.obj(loaded.recipe.model).load(device, dtype)


@contextlib.contextmanager
def blame(reg: Registered, action: str):
    """Turn an exception inside a plugin into a PluginError naming the plugin and component."""
    try:
        yield
    except (SdsctlError, NonFinite, KeyboardInterrupt, OOM):
        raise
    except Exception as exc:
        raise PluginError(f"{reg.describe()} failed while {action}: {type(exc).__name__}: {exc}") from exc


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
        self.scene = bool(getattr(self.param, "scene", False))  # 3D: a camera per step
        self.cameras = build("cameras") if self.scene else None
        self.view_guidances = self._view_guidances() if self.scene and self.cameras.view_prompts else {}
        fit_config = recipe.optimizer
        self.theta = list(self.param.parameters())
        groups = self.param.parameter_groups(fit_config.lr)  # e.g. a scene's faster background
        self.optimizer = torch.optim.Adam(groups or self.theta, lr=fit_config.lr, betas=fit_config.betas,
                                          eps=fit_config.eps)
        with blame(self.regs["model"], "preparing its fast paths"):
            prior.accelerate(channels_last=recipe.channels_last, compile=recipe.compile)
        self.latent = self.param.space == "latent"

    def _view_guidances(self) -> dict[str, Any]:
        """DreamFusion's view-dependent prompts: one guidance per view word, each built on the
        prompt with its word (``<prompt>, front view``) and the run's context otherwise; the
        step's camera picks one (validation refuses a guidance with state of its own, VSD's LoRA)."""
        reg, out = self.regs["guidance"], {}
        for word in VIEW_WORDS:
            recipe = self.recipe.model_copy(update={"prompt": view_prompt(self.recipe.prompt, word)})
            with blame(reg, "starting"):
                out[word] = reg.obj(self.recipe.guidance, dataclasses.replace(self.ctx, recipe=recipe))
        return out

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
            "generator_device": self.generator.device.type,
            # the host generator (timesteps) is the generator itself on the CPU, its own CPU stream elsewhere
            "host_generator": self.ctx.host_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "guidance": self.guidance.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        with blame(self.regs["parameterization"], "loading its state"):
            self.param.load_state_dict(state["param"])
            self.optimizer.load_state_dict(state["optimizer"])
        with blame(self.regs["guidance"], "loading its state"):
            self.guidance.load_state_dict(state["guidance"])
        self.device_note = self._load_generators(state)
        torch.set_rng_state(state["torch_rng"])

    def _load_generators(self, state: dict[str, Any]) -> str | None:
        """Restore the random streams; on another device than the one that wrote ``state``,
        say what carries over (None: everything did).

        A generator's state is specific to its device (the CPU's Mersenne Twister, CUDA's
        Philox seed and offset) and cannot be converted; the host stream (timesteps) is a CPU
        generator everywhere and always carries over."""
        mine = self.generator.device.type
        saved = state.get("generator_device", mine)
        host = state.get("host_generator")
        if saved == mine:
            self.generator.set_state(state["generator"])
            if host is not None and self.ctx.host_generator is not self.generator:
                self.ctx.host_generator.set_state(host)
            return None
        step = int(state["step"])
        self.generator.manual_seed((self.recipe.seed + 1_000_003 * step) % 2**63)
        cpu_stream = state["generator"] if saved == "cpu" else host
        if cpu_stream is not None:
            self.ctx.host_generator.set_state(cpu_stream)
        return (f"state.pt was written on {saved}, this run continues on {mine}: θ, Adam's moments, the "
                f"guidance's state and the step carry over, and so do the timesteps; the {saved} generator's "
                f"state cannot move to {mine}, so the noise is drawn from seed {self.recipe.seed} and step {step} "
                "from here on (the result will not match an uninterrupted run bit for bit)")

    def theta_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.param.parameters())

    def image(self) -> torch.Tensor:
        with blame(self.regs["parameterization"], "rendering the image"):
            return self.param.image()

    def final_image(self) -> torch.Tensor:
        """final.png: the image, or a scene's first held-out view (the front) at the model's size."""
        if not self.scene:
            return self.image()
        with blame(self.regs["parameterization"], "rendering the front view"):
            front = self.cameras.evaluation()[0]
            return render_views(self.param, [front])[0]

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

    def target(self, z: torch.Tensor, update: torch.Tensor, out) -> FitTarget:
        """The step's target: z* = z − k·g and/or the image x* of ``optimizer.image_target``."""
        fit_config = self.recipe.optimizer
        with torch.no_grad():  # a target: no graph to build and detach
            latent = z - update
        image = None
        if fit_config.fit_space != "latent":
            if fit_config.image_target == "hifa":
                with blame(self.regs["guidance"], "computing its denoised estimate"), torch.no_grad():
                    source = out.denoised_estimate()
                if source is None:
                    raise PluginError(f"{self.regs['guidance'].describe()} gave no denoised estimate, which "
                                      "image_target: hifa needs")
            else:
                source = latent
            with blame(self.regs["model"], "decoding the image target"), torch.no_grad():
                image = self.prior.decode_latents(source.detach())
        return FitTarget(latent=None if fit_config.fit_space == "image" else latent, image=image)

    def residuals(self, z: torch.Tensor, target: FitTarget) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """The fit loss's terms as (rendering, its residual rendering − target, weight): the
        latent term (z, z − z*, 1) and/or the image term (x, x − x*, ``image_weight``, or 1
        alone). The residuals are detached: they are the terms' gradients (below)."""
        terms = []
        if target.latent is not None:
            terms.append((z, z.detach() - target.latent, 1.0))
        if target.image is not None:
            weight = 1.0 if target.latent is None else self.recipe.optimizer.image_weight
            terms.append((self.last_rgb, self.last_rgb.detach() - target.image, weight))
        return terms

    def fit_loss(self, z: torch.Tensor, target: FitTarget, terms: list | None = None) -> torch.Tensor:
        """The value of 0.5·‖z − z*‖² and/or ``image_weight``·0.5·‖x − x*‖² (x: the last rendered
        RGB); ``terms``: :meth:`residuals` already computed for this render."""
        with torch.no_grad():
            return sum((weight * 0.5 * r.pow(2).sum() for _, r, weight in terms or self.residuals(z, target)))

    def adam_step(self, z: torch.Tensor, target: FitTarget, terms: list | None = None) -> None:
        """One Adam step of θ on the fit loss (``z`` and ``last_rgb`` from one render;
        ``terms``: their :meth:`residuals`, when already computed).

        The gradient of w·0.5·‖R − sg(R*)‖² with respect to R is w·(R − R*), so each term
        back-propagates its residual from its rendering directly: the same gradient, bit for
        bit, as autograd's through the loss, without building and walking the loss's graph
        (DreamFusion's SDS implementations inject the score the same way)."""
        terms = terms or self.residuals(z, target)
        for p in self.theta:  # optimizer.zero_grad(set_to_none=True), without its profiler hooks
            p.grad = None
        renderings = [rendered for rendered, _, _ in terms]
        grads = [r if weight == 1.0 else weight * r for _, r, weight in terms]
        regularizer = self.param.last_regularizer if self.scene else None
        if regularizer is not None:  # a scene's own losses (sparsity, ...), from the same render
            renderings.append(regularizer)
            grads.append(torch.ones_like(regularizer))
        with blame(self.regs["parameterization"], "back-propagating"):
            torch.autograd.backward(renderings, grads)
        self.optimizer.step()

    def residual(self, z: torch.Tensor, target: FitTarget) -> torch.Tensor:
        """‖R(θ) − target‖ in the space the fit measures: latents, or the image for ``fit_space: image``."""
        if target.latent is not None:
            return (z.detach() - target.latent).norm()
        return (self.last_rgb.detach() - target.image).norm()

    def fit(self, z: torch.Tensor, target: FitTarget, terms: list | None = None) -> tuple[int, torch.Tensor | None]:
        """Move θ towards ``target`` by ``optimizer.fit``; returns (Adam steps taken, the
        reached fraction 1 − ‖R(θ) − target‖ / ‖R(θ₀) − target‖, or None where measuring it
        would cost an extra VAE encoder pass). ``terms``: the :meth:`residuals` of ``z``."""
        fit_config = self.recipe.optimizer
        encode = target.latent is not None
        terms = terms or self.residuals(z, target)
        start = terms[0][1].norm().clamp_min(1e-20)  # the residual the fit measures (:meth:`residual`)
        if fit_config.fit == "adam":
            self.adam_step(z, target, terms)
            for _ in range(fit_config.inner_steps - 1):
                self.adam_step(self.render(encode=encode), target)
            if not self.latent and encode:
                return fit_config.inner_steps, None
            with torch.no_grad():
                return fit_config.inner_steps, 1 - self.residual(self.render(encode=encode), target) / start
        in_render_space = target.latent if self.latent else (None if encode else target.image)
        if in_render_space is not None:
            with blame(self.regs["parameterization"], "assigning the target"), torch.no_grad():
                assigned = self.param.assign(in_render_space)
            if assigned:
                with torch.no_grad():
                    return 0, 1 - self.residual(self.render(encode=encode), target) / start
        limit = fit_config.fit_tolerance * start
        steps = 0
        while True:
            self.adam_step(z, target, terms if steps == 0 else None)
            steps += 1
            z = self.render(encode=encode)
            remaining = self.residual(z, target)
            # a sync per inner step: the fit's stop test
            if steps >= fit_config.max_fit_steps or bool(remaining <= limit):
                return steps, 1 - remaining / start

    def step(self, k: int) -> StepRecord:
        """Step ``k`` (0-based). Its numbers stay on the device (``sdsctl.engine.records``): no host
        sync here unless the fit itself needs one (``fit: full``'s stop test)."""
        regs = self.regs
        with blame(regs["schedule"], f"giving step {k + 1} its timestep"):
            times = dataclasses.replace(self.schedule(k), progress=k / self.recipe.steps)
        camera = None
        if self.cameras is not None:  # drawn after the timestep, from the same host stream
            with blame(regs["cameras"], f"placing the camera of step {k + 1}"):
                camera = self.param.camera = self.cameras.sample(k)
        z = self.render()
        regularizer = self.param.last_regularizer if self.scene else None
        guidance = self.view_guidances[view_word(camera)] if self.view_guidances else self.guidance
        with torch.no_grad(), blame(regs["guidance"], f"computing the score at step {k + 1}"):
            out = guidance.score(z.detach(), times)
        with blame(regs["weighting"], f"weighting t={times.t}"):
            w = float(self.weighting(times.t))
        update = (self.recipe.optimizer.score_scale * w) * out.score  # k·w(t)·score: z* = z − update
        target = self.target(z, update, out)
        terms = self.residuals(z, target)
        with torch.no_grad():
            values = [z.norm(), *(_as_tensor(v, z.device) for v in out.norms.values()),
                      update.norm(), self.fit_loss(z, target, terms)]
        fit_steps, fraction = self.fit(z, target, terms)
        names = ["render", *out.norms, "score", "loss"]
        if fraction is not None:
            names.append("fit_fraction")
            values.append(fraction)
        if regularizer is not None:
            names.append("regularizer")
            values.append(regularizer.detach())
        host = {"step": k + 1, "phase": times.phase, "t": times.t, "timesteps": {"t": times.t, **out.timesteps},
                "weight": w, "lr": self.optimizer.param_groups[0]["lr"], "fit_steps": fit_steps}
        if camera is not None:
            host["camera"] = camera.as_dict()
        return StepRecord(host=host, names=names, values=torch.stack(values),
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
        if value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad:
            return value  # the usual case: a norm computed under no_grad
        return value.detach().float().reshape(())
    return torch.full((), float(value), device=device)
