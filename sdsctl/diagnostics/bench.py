"""``sdsctl bench``: how fast a recipe's step runs, where its time goes, and how far it is from
the floor set by the model evaluations it cannot avoid.

Three measurements, in one process, on the same model and inputs:

1. **The steps** -- ``steps`` steps of the recipe's own loop (the step, and fetching its numbers
   every ``output.log_every`` steps, as a run does; no run directory, no previews), after
   ``warmup`` untimed steps. Nothing is instrumented here, so the time is the loop's own:
   ``ms_per_step``, ``steps_per_second``; ``unet_calls_per_step`` is counted on one extra step.
2. **The breakdown** -- a separate pass of the same number of steps with every phase wrapped
   in a timer (``render``, ``encode``, ``unet``, ``decode``, ``guidance`` without its UNet calls,
   ``backward``, ``optimizer``; ``other`` is the rest). CUDA events time it on a GPU,
   ``time.perf_counter`` on the CPU; being a separate pass, the timers cannot slow the steps
   of (1).
3. **The floor** -- the bare time of the model evaluations one step needs: every UNet call of
   a step replayed on the step's real inputs (with its backward when it ran with gradients,
   as VSD's LoRA update does), plus the VAE encoder's forward and backward for
   parameterizations that render RGB through it, plus the VAE decoder's forward where the fit
   needs an image target (``fit_space: image | both``). It is measured after every step of
   (1) on the CPU (after every ``output.log_every`` steps on a GPU, where the steps in between
   overlap host and device as in a run), so that the steps and their floor see the same
   machine load; ``floor_ratio`` = the steps' total time ÷ the floors' total time: 1.0 would
   mean the step is nothing but its model evaluations.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from sdsctl.devices import peak_memory_mb
from sdsctl.engine.loop import Optimization, load_prior, placement, threads_for
from sdsctl.engine.recipe import LoadedRecipe
from sdsctl.engine.records import PendingRecords

PHASES = ("render", "encode", "unet", "decode", "guidance", "backward", "optimizer", "other")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Timestamps: CUDA events on a GPU (device time, no sync when taken), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000


class PhaseTimer:
    """Exclusive time per phase: a phase nested in another (the UNet inside the guidance) is
    not counted twice."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.spans: list[tuple[str, Any, Any, list]] = []  # (phase, start, end, children spans)
        self._stack: list[list] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        children: list = []
        self._stack.append(children)
        start = self.clock.mark()
        try:
            yield
        finally:
            end = self.clock.mark()
            self._stack.pop()
            span = (name, start, end, children)
            (self._stack[-1] if self._stack else self.spans).append(span)

    def totals(self) -> dict[str, float]:
        out = dict.fromkeys(PHASES[:-1], 0.0)

        def visit(span) -> float:
            name, start, end, children = span
            inclusive = self.clock.ms(start, end)
            out[name] = out.get(name, 0.0) + inclusive - sum(visit(c) for c in children)
            return inclusive

        for span in self.spans:
            visit(span)
        return out


def _wrap(obj, attr: str, wrapper: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Replace ``obj.attr`` by ``wrapper(original)``; returns the undo."""
    original = getattr(obj, attr)
    had_own = attr in vars(obj)
    setattr(obj, attr, wrapper(original))

    def undo():
        if had_own:
            setattr(obj, attr, original)
        else:
            delattr(obj, attr)

    return undo


def _timed(timer: PhaseTimer, name: str):
    def wrapper(fn):
        def timed(*args, **kwargs):
            with timer.phase(name):
                return fn(*args, **kwargs)
        return timed
    return wrapper


@contextlib.contextmanager
def _instrumented(opt: Optimization, timer: PhaseTimer | None, calls: list | None):
    """Wrap the step's phases in ``timer`` and/or record every UNet call's inputs in ``calls``."""
    undo = []
    prior = opt.prior
    if calls is not None:
        def recording(fn):
            def predict(z_t, t, embeddings, **options):  # options: FLUX.1-dev's guidance scale
                calls.append(("unet", (z_t.detach(), t, embeddings.detach()), torch.is_grad_enabled(), options))
                return fn(z_t, t, embeddings, **options)
            return predict

        def recording_encode(fn):
            def encode(rgb):
                calls.append(("encode", (rgb.detach(),), torch.is_grad_enabled() and rgb.requires_grad, {}))
                return fn(rgb)
            return encode

        def recording_decode(fn):
            def decode(z):
                calls.append(("decode", (z.detach(),), False, {}))
                return fn(z)
            return decode

        undo += [_wrap(prior, "predict_noise", recording), _wrap(prior, "encode_images", recording_encode),
                 _wrap(prior, "decode_latents", recording_decode)]
    if timer is not None:
        undo += [
            _wrap(prior, "predict_noise", _timed(timer, "unet")),
            _wrap(prior, "encode_images", _timed(timer, "encode")),
            _wrap(prior, "decode_latents", _timed(timer, "decode")),
            _wrap(opt.param, "forward", _timed(timer, "render")),
            _wrap(opt.guidance, "score", _timed(timer, "guidance")),
            _wrap(opt.optimizer, "step", _timed(timer, "optimizer")),
            _wrap(torch.autograd, "backward", _timed(timer, "backward")),
        ]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def _run_steps(opt: Optimization, first: int, count: int, log_every: int,
               pending: PendingRecords | None = None) -> None:
    """Steps ``first`` .. ``first + count - 1`` of the recipe (wrapping past its last step),
    fetching their numbers on logging steps as a run does. With ``pending`` (records carried
    over between calls) the last step's numbers wait for the next logging step; without, they
    are fetched at the end."""
    own = pending is None
    if own:
        pending = PendingRecords()
    for k in range(first, first + count):
        pending.add(opt.step(k % opt.recipe.steps))
        if (k + 1) % log_every == 0:
            pending.flush()
    if own:
        pending.flush()


def _floor_ms(prior, calls: list, device: torch.device, repeats: int) -> float:
    """The bare time of one step's model evaluations, replayed ``repeats`` times on its real
    inputs (mean)."""

    def once():
        for kind, args, grad, options in calls:
            with torch.set_grad_enabled(grad):
                if kind == "unet":
                    out = prior.predict_noise(*args, **options)
                    if grad:
                        torch.autograd.backward(out.sum())
                elif kind == "decode":
                    prior.decode_latents(*args)
                else:
                    rgb = args[0].clone().requires_grad_(grad)
                    out = prior.encode_images(rgb)
                    if grad:
                        torch.autograd.backward(out.sum())

    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / repeats


def _timed_against_floor(opt: Optimization, prior, calls: list, device: torch.device, warmup: int,
                         steps: int) -> tuple[float, float]:
    """ms per step and ms of its floor (the same model evaluations alone), over ``steps`` steps."""
    log_every = opt.recipe.output.log_every
    # The steps in chunks, each followed by the floor's model evaluations, so that the two
    # see the same machine load. On the CPU a chunk is one step: a shared machine's load
    # changes from one tenth of a second to the next. On a GPU it is ``log_every`` steps: a
    # run synchronizes only on logging steps, so the host queues a step while the device
    # still computes the previous one, and a synchronize after every step would hide that.
    chunk = 1 if device.type == "cpu" else max(1, min(log_every, steps))
    step_ms, floor_ms = 0.0, 0.0
    pending = PendingRecords()
    for first in range(warmup + 1, warmup + 1 + steps, chunk):
        n = min(chunk, warmup + 1 + steps - first)
        synchronize(device)
        start = time.perf_counter()
        _run_steps(opt, first, n, log_every, pending)
        synchronize(device)
        step_ms += (time.perf_counter() - start) * 1000
        floor_ms += _floor_ms(prior, calls, device, repeats=n) * n
    pending.flush()
    return step_ms / steps, floor_ms / steps


def bench(loaded: LoadedRecipe, *, steps: int = 50, warmup: int = 5, prior=None) -> dict[str, Any]:
    """Measure ``loaded``'s step (see the module docstring) with the recipe's CPU threads;
    returns the report's fields."""
    with threads_for(loaded.recipe) as threads:
        return {**_bench(loaded, steps, warmup, prior), "threads": threads}


def _bench(loaded: LoadedRecipe, steps: int, warmup: int, prior) -> dict[str, Any]:
    recipe = loaded.recipe
    device, dtype, _ = placement(recipe)
    if prior is None:
        prior = load_prior(loaded, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opt = Optimization(loaded, prior, device, dtype)
    try:
        opt.initialize()
        log_every = recipe.output.log_every
        _run_steps(opt, 0, warmup, log_every)

        calls: list = []
        with _instrumented(opt, None, calls):  # one step's model evaluations, on its real inputs
            _run_steps(opt, warmup, 1, 1)
        unet_calls = sum(1 for kind, *_ in calls if kind == "unet")
        ms_per_step, floor = _timed_against_floor(opt, prior, calls, device, warmup, steps)

        timer = PhaseTimer(Clock(device))
        synchronize(device)
        pass_start = time.perf_counter()
        with _instrumented(opt, timer, None):
            _run_steps(opt, warmup + 1 + steps, steps, log_every)
        synchronize(device)
        pass_ms = (time.perf_counter() - pass_start) * 1000 / steps
        breakdown = {k: v / steps for k, v in timer.totals().items()}
        breakdown["other"] = max(0.0, pass_ms - sum(breakdown.values()))
        renderer = _renderer_ms(opt, device, steps) if opt.scene else None
    finally:
        opt.close()
    return {
        "recipe": loaded.name,
        "steps": steps,
        "warmup": warmup,
        "steps_per_second": round(1000 / ms_per_step, 3),
        "ms_per_step": round(ms_per_step, 3),
        "unet_calls_per_step": unet_calls,
        "breakdown_ms": {k: round(breakdown.get(k, 0.0), 3) for k in PHASES},
        "floor_ms": round(floor, 3),
        "floor_ratio": round(ms_per_step / floor, 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        **({"renderer_ms": renderer} if renderer else {}),
    }


def _renderer_ms(opt: Optimization, device: torch.device, repeats: int) -> dict[str, float]:
    """A 3D parameterization's own cost, apart from the model: rendering a training view from a
    fresh camera (forward) and back-propagating a gradient of ones into θ (backward), in ms."""
    clock, forward, backward = Clock(device), 0.0, 0.0
    for k in range(repeats):
        opt.param.camera = opt.cameras.sample(k)
        start = clock.mark()
        image = opt.param()
        middle = clock.mark()
        image.backward(torch.ones_like(image))
        end = clock.mark()
        synchronize(device)  # the events are read now
        forward, backward = forward + clock.ms(start, middle), backward + clock.ms(middle, end)
    for p in opt.theta:
        p.grad = None
    return {"forward": round(forward / repeats, 3), "backward": round(backward / repeats, 3)}
