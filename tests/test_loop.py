"""The loop on the tiny prior: the run directory, determinism, faults, resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import sdsctl
from conftest import run_interrupted_after
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, Metric
from sdsctl.engine.loop import Optimization
from sdsctl.engine.panel import PlainLog
from sdsctl.engine.recipe import load_recipe
from sdsctl.engine.run import execute
from sdsctl.errors import RunFailed
from sdsctl.models import Prior
from sdsctl_plugins.sds import SDS

RUN_FILES = {"recipe.yaml", "metrics.jsonl", "final.png", "progress.png", "state.pt", "summary.json"}


def test_run_writes_every_file(cli, recipe_file, tmp_path):
    out = tmp_path / "run"
    result = cli("run", recipe_file(), "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    previews = ["step_000002.png", "step_000004.png", "step_000006.png"]
    assert sorted(p.name for p in (out / "previews").iterdir()) == [*previews, "view_512"]
    assert sorted(p.name for p in (out / "previews" / "view_512").iterdir()) == previews
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 6 and summary["device"] == "cpu"
    assert {"seconds", "steps_per_second", "versions", "metrics"} <= set(summary)
    assert {"torch", "diffusers", "transformers", "sdsctl"} <= set(summary["versions"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    first = lines[0]
    assert {"step", "t", "phase", "timesteps", "loss", "norms", "seconds", "lr", "weight"} <= set(first)
    assert first["phase"] == "main" and 20 <= first["t"] <= 980 and first["timesteps"]["t"] == first["t"]
    assert {"score", "classifier", "denoise"} <= set(first["norms"])
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 6 and set(state["param"]) == {"latents"}
    recipe = (out / "recipe.yaml").read_text()
    assert "guidance_scale: 100.0" in recipe and "steps: 6" in recipe
    assert "step 6/6" in result.stdout and "done: 6 steps" in result.stdout


def test_same_recipe_and_seed_give_byte_identical_image(cli, recipe_file, tmp_path):
    path = recipe_file()
    images = []
    for name in ("a", "b"):
        assert cli("run", path, "--out", tmp_path / name, "--no-live").exit_code == 0
        images.append((tmp_path / name / "final.png").read_bytes())
    assert images[0] == images[1]
    assert cli("run", path, "--out", tmp_path / "c", "--seed", "1", "--no-live").exit_code == 0
    assert (tmp_path / "c" / "final.png").read_bytes() != images[0]


def test_out_refuses_an_existing_run_unless_overwrite(cli, recipe_file, tmp_path):
    out = tmp_path / "run"
    path = recipe_file()
    assert cli("run", path, "--out", out, "--no-live").exit_code == 0
    result = cli("run", path, "--out", out, "--no-live")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    (out / "previews" / "step_000099.png").write_bytes(b"stale")
    assert cli("run", path, "--out", out, "--no-live", "--overwrite").exit_code == 0
    assert not (out / "previews" / "step_000099.png").exists()


def test_default_run_dir_is_named_after_the_recipe(cli, recipe_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = recipe_file(name="my-recipe.yaml")
    assert cli("run", path, "--no-live", "--steps", "2").exit_code == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("my-recipe-") and (run / "final.png").is_file()


def test_text_embeddings_are_computed_once_per_run(recipe_file, tmp_path, monkeypatch):
    calls = []
    original = Prior.encode_prompts

    def counting(self, prompts):
        calls.append(tuple(prompts))
        return original(self, prompts)

    monkeypatch.setattr(Prior, "encode_prompts", counting)
    execute(load_recipe(recipe_file()), tmp_path / "run", PlainLog(100))
    assert sorted(calls) == [("",), ("a red circle on a blue background",)]


def test_one_batched_unet_call_per_step(recipe_file, tmp_path, monkeypatch):
    batches = []
    original = Prior.predict_noise

    def recording(self, z_t, t, embeddings):
        batches.append(z_t.shape[0])
        return original(self, z_t, t, embeddings)

    monkeypatch.setattr(Prior, "predict_noise", recording)
    execute(load_recipe(recipe_file()), tmp_path / "run", PlainLog(100))
    assert batches == [2] * 6


def _started(recipe_file, tiny_prior, content: dict) -> Optimization:
    """An initialized Optimization of a recipe on the tiny prior, on the CPU."""
    loaded = load_recipe(recipe_file(content))
    prior = Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)
    opt = Optimization(loaded, prior, torch.device("cpu"), torch.float32)
    opt.initialize()
    return opt


def test_gradient_of_the_surrogate_loss_is_the_weighted_score(recipe_file, tiny_prior):
    opt = _started(recipe_file, tiny_prior, {"optimizer": {"score_scale": 2.0}})
    seen = {}
    original_fit = opt.adam_step

    def fit(z, target, *terms):
        assert target.image is None  # latent-pixels: the latent loss only
        loss = 0.5 * (z - target.latent).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, z, retain_graph=True)
        seen["grad"], seen["g"] = grad, (z - target.latent).detach()
        return original_fit(z, target, *terms)

    opt.adam_step = fit
    record = opt.step(0).fetched()
    assert torch.allclose(seen["grad"], seen["g"])
    assert seen["g"].norm().item() == pytest.approx(record["norms"]["score"], rel=1e-5)


def test_inner_steps_refit_to_the_same_target(recipe_file, tmp_path, monkeypatch):
    renders = []
    original = Optimization.render

    def counting(self, *args, **kwargs):
        renders.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Optimization, "render", counting)
    execute(load_recipe(recipe_file({"steps": 2, "optimizer": {"inner_steps": 3}})), tmp_path / "run", PlainLog(100))
    assert len(renders) == 2 * (3 + 1)  # the first fit of each step reuses the rendered z; +1 measures fit_fraction


def test_negative_prompt_is_the_unconditional_row(recipe_file, tiny_prior):
    loaded = load_recipe(recipe_file({"negative_prompt": "blurry, low quality"}))
    prior = Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)
    opt = Optimization(loaded, prior, torch.device("cpu"), torch.float32)
    expected = prior.encode_prompts(["blurry, low quality", "a red circle on a blue background"])
    assert torch.equal(opt.guidance.embeddings, expected)


# ----------------------------------------------------------------------------- faults


class NaNAtStep3(Guidance):
    """Behaves like SDS, then returns a NaN score at the third call."""

    class Config(ComponentConfig):
        name: str = "nan-at-3"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.sds = SDS(SDS.Config(guidance_scale=10), ctx)
        self.calls = 0

    def score(self, z, times):
        self.calls += 1
        out = self.sds.score(z, times)
        if self.calls == 3:
            score = out.score.clone()
            score[0, 0, 0, 0] = float("nan")
            return GuidanceOutput(score, {"classifier": out.norms["classifier"], "correction": score.norm()},
                                  out.timesteps)
        return GuidanceOutput(out.score, {"classifier": out.norms["classifier"], "correction": torch.tensor(1.0)},
                              out.timesteps)


class Crashes(Guidance):
    class Config(ComponentConfig):
        name: str = "crashes"

    def score(self, z, times):
        raise ZeroDivisionError("boom")


class CrashesAtStart(Guidance):
    class Config(ComponentConfig):
        name: str = "crashes-at-start"

    def __init__(self, config, ctx):
        raise KeyError("no such embedding")


class FaultyGuidances:
    @sdsctl.hookimpl
    def register_guidances(self, register):
        register("nan-at-3", NaNAtStep3)
        register("crashes", Crashes)
        register("crashes-at-start", CrashesAtStart)


@pytest.fixture
def faulty_guidances(register_plugin):
    register_plugin(FaultyGuidances(), "test-faulty-guidances")


def test_non_finite_score_stops_and_keeps_the_last_good_state(cli, recipe_file, tmp_path, faulty_guidances):
    out = tmp_path / "run"
    result = cli("run", recipe_file({"guidance": "nan-at-3"}), "--out", out, "--no-live")
    assert result.exit_code == 1
    assert "non-finite value at step 3" in result.stderr and "'correction'" in result.stderr
    assert "Traceback" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps_done"] == 2
    assert summary["failed_step"] == 3 and summary["failed_term"] == "correction"
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2 and torch.isfinite(state["param"]["latents"]).all()
    assert (out / "final.png").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_failed_run_resumes(cli, recipe_file, tmp_path, faulty_guidances):
    out = tmp_path / "run"
    cli("run", recipe_file({"guidance": "nan-at-3"}), "--out", out, "--no-live")
    # Each process's guidance fails at its own third call: resumed at step 2 it fails at
    # step 5, resumed at step 4 it has only two steps left.
    result = cli("resume", out, "--no-live")
    assert result.exit_code == 1 and "non-finite value at step 5" in result.stderr
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 4
    result = cli("resume", out, "--no-live")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_exception_in_a_plugin_names_plugin_and_component(cli, recipe_file, tmp_path, faulty_guidances):
    out = tmp_path / "run"
    result = cli("run", recipe_file({"guidance": "crashes"}), "--out", out, "--no-live")
    assert result.exit_code == 1
    assert "guidance 'crashes' (plugin 'test-faulty-guidances')" in result.stderr
    assert "ZeroDivisionError: boom" in result.stderr and "Traceback" not in result.stderr
    assert "ZeroDivisionError" in (out / "error.log").read_text()
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_exception_while_a_plugin_starts_fails_the_run_cleanly(cli, recipe_file, tmp_path, faulty_guidances):
    out = tmp_path / "run"
    result = cli("run", recipe_file({"guidance": "crashes-at-start"}), "--out", out, "--no-live")
    assert result.exit_code == 1
    assert "guidance 'crashes-at-start' (plugin 'test-faulty-guidances') failed while starting" in result.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert "KeyError" in (out / "error.log").read_text()


def test_out_of_memory_message_lists_the_remedies(recipe_file, tmp_path, faulty_guidances, monkeypatch):
    from sdsctl.engine import loop

    def oom(self, z, times):
        raise loop.OOM("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Crashes, "score", oom)
    with pytest.raises(RunFailed) as err:
        execute(load_recipe(recipe_file({"guidance": "crashes"})), tmp_path / "run", PlainLog(100))
    assert "out of memory at step 1" in str(err.value) and "dtype=float16" in str(err.value)


def test_resume_of_a_completed_run_is_refused(cli, recipe_file, tmp_path):
    out = tmp_path / "run"
    cli("run", recipe_file(), "--out", out, "--no-live")
    result = cli("resume", out, "--no-live")
    assert result.exit_code == 2 and "completed run" in result.stderr


def test_resume_needs_a_run_directory(cli, tmp_path):
    result = cli("resume", tmp_path, "--no-live")
    assert result.exit_code == 2 and "not a run directory" in result.stderr
    assert cli("resume", tmp_path / "nope").exit_code == 2


def test_sigint_in_process_then_resume_matches_an_uninterrupted_run(cli, recipe_file, tmp_path, monkeypatch):
    path = recipe_file({"steps": 6})
    assert cli("run", path, "--out", tmp_path / "full", "--no-live").exit_code == 0
    result = run_interrupted_after(path, tmp_path / "part", 3, monkeypatch)
    assert (result.status, result.steps_done) == ("interrupted", 3)
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("interrupted", 3)
    assert torch.load(tmp_path / "part" / "state.pt", weights_only=True)["step"] == 3
    assert cli("resume", tmp_path / "part", "--no-live").exit_code == 0
    assert (tmp_path / "part" / "final.png").read_bytes() == (tmp_path / "full" / "final.png").read_bytes()
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["t"], r["loss"]) for r in part] == [(r["step"], r["t"], r["loss"]) for r in full]


# ----------------------------------------------------------------------------- metrics


class Brightness(Metric):
    class Config(ComponentConfig):
        name: str = "brightness"

    def __call__(self, image, prompt):
        return {"mean": float(image.mean()), "prompt": prompt}


class NeverApplies(Metric):
    class Config(ComponentConfig):
        name: str = "never"

    @classmethod
    def applies_to(cls, prior):
        return False

    def __call__(self, image, prompt):
        raise AssertionError("not applicable")


class Metrics:
    @sdsctl.hookimpl
    def register_metrics(self, register):
        register("brightness", Brightness)
        register("never", NeverApplies)


def test_metrics_that_apply_go_into_the_summary(cli, recipe_file, tmp_path, register_plugin):
    register_plugin(Metrics(), "test-metrics")
    out = tmp_path / "run"
    assert cli("run", recipe_file(), "--out", out, "--no-live").exit_code == 0
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert "brightness" in metrics and "never" not in metrics
    assert 0 <= metrics["brightness"]["mean"] <= 1 and metrics["brightness"]["prompt"].startswith("a red circle")


# ----------------------------------------------------------------------------- run directory


def test_a_run_directory_is_claimed_once(tmp_path):
    from sdsctl.engine.rundir import RunDir
    from sdsctl.errors import SdsctlError

    RunDir.create(tmp_path / "run", overwrite=False)
    with pytest.raises(SdsctlError):
        RunDir.create(tmp_path / "run", overwrite=False)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"status": "starting"}
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []


def test_ctrl_c_while_the_model_loads_writes_nothing(cli, recipe_file, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Prior, "load", classmethod(interrupted))
    result = cli("run", recipe_file(), "--out", tmp_path / "run", "--no-live")
    assert result.exit_code == 130 and "nothing written" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_completed_run_continues_when_its_steps_are_raised(cli, recipe_file, tmp_path):
    out, longer = tmp_path / "run", tmp_path / "longer"
    path = recipe_file({"steps": 3})
    assert cli("run", path, "--out", out, "--no-live").exit_code == 0
    assert cli("run", path, "--out", longer, "--no-live", "--steps", "6").exit_code == 0
    recipe = out / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("steps: 3", "steps: 6"))
    assert cli("resume", out, "--no-live").exit_code == 0
    # The schedule and the guidance draw from the generator independently of `steps`.
    assert (out / "final.png").read_bytes() == (longer / "final.png").read_bytes()


def test_image_fit_fits_the_rgb_to_the_decoded_target(recipe_file, tiny_prior):
    """fit_space: image with image_target: decoded-target fits x (not z) to D(z − g)."""
    opt = _started(recipe_file, tiny_prior, {"parameterization": {"name": "rgb-pixels"},
                                             "optimizer": {"fit_space": "image", "image_target": "decoded-target"}})
    prior = opt.prior
    seen = {}
    original_fit, original_score = opt.adam_step, opt.guidance.score

    def score(z, times):
        out = original_score(z, times)
        seen["z"], seen["score"], seen["t"] = z.clone(), out.score.clone(), times.t
        return out

    def fit(z, target, *terms):
        seen["target"], seen["z_grad"] = target, z.requires_grad
        seen["loss"] = float(opt.fit_loss(z, target).detach())
        seen["x"] = opt.last_rgb.detach().clone()
        return original_fit(z, target, *terms)

    opt.guidance.score, opt.adam_step = score, fit
    opt.step(0)
    assert seen["target"].latent is None and not seen["z_grad"]  # no encoder graph
    g = float(opt.weighting(seen["t"])) * seen["score"]
    torch.testing.assert_close(seen["target"].image, prior.decode_latents(seen["z"] - g))
    assert seen["loss"] == pytest.approx(float(0.5 * (seen["x"] - seen["target"].image).pow(2).sum()), rel=1e-5)


def test_fit_space_both_adds_the_weighted_image_loss_to_the_latent_loss(recipe_file, tiny_prior):
    """fit_space: both = 0.5‖z − z*‖² + image_weight · 0.5‖x − D(z*)‖², gradients through the encoder."""
    opt = _started(recipe_file, tiny_prior, {"parameterization": {"name": "rgb-pixels"},
                                             "optimizer": {"fit_space": "both", "image_weight": 0.25,
                                                           "image_target": "decoded-target"}})
    prior = opt.prior
    seen = {}
    original_fit = opt.adam_step

    def fit(z, target, *terms):
        x = opt.last_rgb
        seen["z_grad"] = z.requires_grad
        latent = 0.5 * (z - target.latent).pow(2).sum()
        image = 0.5 * (x - target.image).pow(2).sum()
        torch.testing.assert_close(target.image, prior.decode_latents(target.latent))
        seen["expected"] = float((latent + 0.25 * image).detach())
        seen["loss"] = float(opt.fit_loss(z, target).detach())
        return original_fit(z, target, *terms)

    opt.adam_step = fit
    before = opt.param.image().detach().clone()
    opt.step(0)
    assert seen["z_grad"]
    assert seen["loss"] == pytest.approx(seen["expected"], rel=1e-5)
    assert not torch.equal(before, opt.param.image())


@pytest.mark.parametrize("fit_space, image_weight, image_target", [
    ("latent", 0.1, "decoded-target"), ("image", 0.1, "decoded-target"), ("both", 0.25, "decoded-target"),
    ("both", 0.1, "hifa"), ("both", 1.0, "hifa")])
def test_direct_back_propagation_is_autograd_through_the_written_out_loss(recipe_file, tiny_prior, fit_space,
                                                                         image_weight, image_target):
    """``adam_step`` back-propagates each term's residual from its rendering; θ's gradient must be
    autograd's through [latent] 0.5‖z − z*‖² + [image] w·0.5‖x − x*‖² (w = image_weight with
    ``both``, 1 with ``image``) -- a dropped or misplaced image_weight fails here."""
    opt = _started(recipe_file, tiny_prior, {
        "parameterization": {"name": "rgb-hashgrid"},
        "optimizer": {"fit_space": fit_space, "image_weight": image_weight, "image_target": image_target}})
    seen = {}
    original_fit, original_step = opt.adam_step, opt.optimizer.step

    def fit(z, target, *terms):
        loss = 0.0
        if fit_space != "image":
            loss = loss + 0.5 * (z - target.latent).pow(2).sum()
        if fit_space != "latent":
            weight = image_weight if fit_space == "both" else 1.0
            loss = loss + weight * 0.5 * (opt.last_rgb - target.image).pow(2).sum()
        seen["expected"] = torch.autograd.grad(loss, opt.theta, retain_graph=True)
        return original_fit(z, target, *terms)

    def step(*args, **kwargs):
        seen["got"] = [p.grad.detach().clone() for p in opt.theta]
        return original_step(*args, **kwargs)

    opt.adam_step, opt.optimizer.step = fit, step
    opt.step(0)
    assert len(seen["got"]) == len(seen["expected"]) > 0
    for got, expected in zip(seen["got"], seen["expected"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in seen["got"])


@pytest.mark.parametrize("space", ["image", "both"])
def test_image_fit_needs_an_rgb_parameterization(recipe_file, space):
    from sdsctl.errors import RecipeError

    with pytest.raises(RecipeError, match="fit_space"):
        load_recipe(recipe_file({"optimizer": {"fit_space": space}}))


@pytest.mark.parametrize("optimizer, computed", [
    ({}, 0),
    ({"fit_space": "image", "image_target": "decoded-target"}, 0),
    ({"fit_space": "image", "image_target": "hifa"}, 1),
    ({"fit_space": "both", "image_target": "hifa"}, 1),
], ids=["latent", "decoded-target", "hifa-image", "hifa-both"])
def test_the_denoised_estimate_is_computed_only_for_hifa_s_image_target(recipe_file, tiny_prior, optimizer, computed):
    """A guidance may give ẑ₀ as a function: the loop calls it once on steps whose fit decodes
    it, and never on the others; the estimate it decodes is the function's."""
    space = {"parameterization": {"name": "rgb-pixels"}} if optimizer else {}
    opt = _started(recipe_file, tiny_prior, {**space, "optimizer": optimizer})
    calls, decoded = [], []
    original_score, original_decode = opt.guidance.score, opt.prior.decode_latents

    def score(z, times):
        out = original_score(z, times)
        function = out.denoised
        assert callable(function)  # the bundled guidances defer it

        def counting():
            calls.append(function())
            return calls[-1]
        out.denoised = counting
        return out

    def decode(z):
        decoded.append(z)
        return original_decode(z)

    opt.guidance.score, opt.prior.decode_latents = score, decode
    opt.step(0)
    opt.step(1)
    assert len(calls) == 2 * computed
    if computed:
        assert all(torch.equal(a, b) for a, b in zip(calls, decoded))


def test_a_guidance_may_give_the_denoised_estimate_as_a_tensor(recipe_file, tiny_prior):
    """Third-party guidances written before the deferred form keep working."""
    opt = _started(recipe_file, tiny_prior, {"parameterization": {"name": "rgb-pixels"},
                                             "optimizer": {"fit_space": "image", "image_target": "hifa"}})
    original_score, original_decode = opt.guidance.score, opt.prior.decode_latents
    seen = {}

    def score(z, times):
        out = original_score(z, times)
        out.denoised = seen["given"] = out.denoised_estimate()
        return out

    def decode(z):
        seen["decoded"] = z
        return original_decode(z)

    opt.guidance.score, opt.prior.decode_latents = score, decode
    opt.step(0)
    assert torch.equal(seen["given"], seen["decoded"])


@pytest.mark.parametrize("space, encodes", [("image", 1), ("both", 3)])
def test_refits_encode_only_when_the_latent_loss_needs_it(recipe_file, tiny_prior, space, encodes):
    """With inner_steps 3 the image loss alone refits the RGB without encoding it again; the
    latent loss (fit_space both) needs the encoder on every refit."""
    opt = _started(recipe_file, tiny_prior, {"parameterization": {"name": "rgb-pixels"},
                                             "optimizer": {"fit_space": space, "inner_steps": 3}})
    calls = []
    original = opt.prior.encode_images

    def counting(x):
        calls.append(1)
        return original(x)

    opt.prior.encode_images = counting
    opt.step(0)
    assert len(calls) == encodes


def test_a_second_signal_mid_step_goes_back_to_the_last_checked_step(cli, recipe_file, tmp_path, monkeypatch):
    """Two signals inside step 7 (logging every 4 steps): the step is abandoned, θ goes back to
    step 4, and state.pt, final.png, metrics.jsonl and summary.json all describe step 4."""
    path = recipe_file({"steps": 12, "output": {"preview_every": 4, "log_every": 4, "checkpoint_every": 100}})
    assert cli("run", path, "--out", tmp_path / "full", "--no-live").exit_code == 0
    original = Optimization.step

    def two_signals_in_step_7(self, k):
        if k == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, then save
            os.kill(os.getpid(), signal.SIGTERM)  # the second, mid-step: stop it now
        return original(self, k)

    monkeypatch.setattr(Optimization, "step", two_signals_in_step_7)
    result = execute(load_recipe(path), tmp_path / "part", PlainLog(100))
    monkeypatch.undo()
    assert (result.status, result.steps_done, result.signal) == ("interrupted", 4, "SIGINT")
    assert "went back to step 4" in result.note
    part = tmp_path / "part"
    summary = json.loads((part / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("interrupted", 4)
    assert torch.load(part / "state.pt", weights_only=True)["step"] == 4
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (part / "final.png").read_bytes() == (part / "previews" / "step_000004.png").read_bytes()
    assert cli("resume", part, "--no-live").exit_code == 0
    assert (part / "final.png").read_bytes() == (tmp_path / "full" / "final.png").read_bytes()


def test_resume_set_steps_extends_a_completed_run(cli, recipe_file, tmp_path):
    out, longer = tmp_path / "run", tmp_path / "longer"
    path = recipe_file({"steps": 3})
    assert cli("run", path, "--out", out, "--no-live").exit_code == 0
    refused = cli("resume", out, "--no-live")
    assert refused.exit_code == 2 and f"sdsctl resume {out} --set steps=N" in refused.stderr
    assert cli("run", path, "--out", longer, "--no-live", "--steps", "6").exit_code == 0
    result = cli("resume", out, "--no-live", "-s", "steps=6")
    assert result.exit_code == 0, result.output
    assert (out / "final.png").read_bytes() == (longer / "final.png").read_bytes()
    recipe = (out / "recipe.yaml").read_text()
    assert "steps: 6" in recipe and "# resumed with" in recipe and recipe.startswith("# resolved by sdsctl from")
    other = cli("resume", out, "--set", "prompt=a blue square on a red background")
    assert other.exit_code == 2 and "keeps its recipe" in other.stderr


def test_resume_on_another_device_continues_and_says_what_carried_over(cli, recipe_file, tmp_path):
    """A state written on CUDA (its generator state is CUDA's seed and offset) resumed on the CPU."""
    out = tmp_path / "run"
    path = recipe_file({"steps": 6, "output": {"preview_every": 2, "checkpoint_every": 3}})
    assert cli("run", path, "--out", out, "--no-live", "--steps", "3").exit_code == 0
    state = torch.load(out / "state.pt", weights_only=True)
    state["host_generator"] = state["generator"]  # on CUDA the timesteps come from a CPU stream of their own
    state["generator"], state["generator_device"] = torch.zeros(16, dtype=torch.uint8), "cuda"
    torch.save(state, out / "state.pt")
    result = cli("resume", out, "--no-live", "--set", "steps=6")
    assert result.exit_code == 0, result.output
    assert "written on cuda, this run continues on cpu" in result.output and "Traceback" not in result.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]


def test_run_directories_work_without_hard_links(cli, recipe_file, tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "run"
    result = cli("run", recipe_file(), "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert cli("run", recipe_file(), "--out", out, "--no-live").exit_code == 2


def test_final_image_has_an_enlarged_copy_and_progress_is_labelled(cli, recipe_file, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    assert cli("run", recipe_file(), "--out", out, "--no-live").exit_code == 0
    native, view = Image.open(out / "final.png"), Image.open(out / "final_512.png")
    assert native.size == (64, 64) and view.size == (512, 512)
    assert view.resize((64, 64), Image.Resampling.NEAREST).tobytes() == native.convert("RGB").tobytes()
    assert Image.open(out / "progress.png").size[1] > 128  # a row of 128-pixel previews and their step labels
    assert cli("run", recipe_file(), "--out", tmp_path / "none", "--no-live", "--set",
               "output.view_size=0").exit_code == 0
    assert not list((tmp_path / "none").glob("final_*.png"))


def test_previews_have_enlarged_copies_and_view_size_sets_every_copy(cli, recipe_file, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    assert cli("run", recipe_file(), "--out", out, "--no-live", "--view-size", "256").exit_code == 0
    natives = sorted((out / "previews").glob("step_*.png"))
    views = sorted((out / "previews" / "view_256").glob("step_*.png"))
    assert natives and [p.name for p in views] == [p.name for p in natives]
    for native, view in zip(natives, views):
        assert Image.open(view).size == (256, 256)
        assert (Image.open(view).resize((64, 64), Image.Resampling.NEAREST).tobytes()
                == Image.open(native).convert("RGB").tobytes())
    assert (out / "final_256.png").exists() and not (out / "final_512.png").exists()
    progress_rows = Image.open(out / "progress.png").size
    assert cli("run", recipe_file(), "--out", tmp_path / "none", "--no-live", "--view-size", "0").exit_code == 0
    assert not (tmp_path / "none" / "previews" / "view_0").exists()
    assert Image.open(tmp_path / "none" / "progress.png").size == progress_rows  # the sheet shows natives only


def test_going_back_to_a_step_drops_later_previews_and_their_copies(tmp_path):
    from sdsctl.engine.rundir import RunDir

    run = RunDir.create(tmp_path / "run", overwrite=False)
    for step in (10, 20):
        run.preview_path(step).write_bytes(b"png")
        run.preview_view_path(step, 512).write_bytes(b"png")
    run.drop_previews_after(10)
    assert [p.name for p in run.preview_paths()] == ["step_000010.png"]
    assert [p.name for p in (run.previews / "view_512").iterdir()] == ["step_000010.png"]


def test_threads_is_applied_recorded_and_shown(cli, recipe_file, tmp_path, monkeypatch):
    """``--threads N`` sets torch's CPU threads while the run steps, and puts the process's back
    after it (compare runs several recipes in one process); summary.json, the log's first line
    and recipe.yaml say it; unset, recipe.yaml has no ``threads`` (older run folders stay reusable)."""
    torch.set_num_threads(2)
    try:
        seen = []
        original = Optimization.step

        def step(self, k):
            seen.append(torch.get_num_threads())
            return original(self, k)

        monkeypatch.setattr(Optimization, "step", step)
        out = tmp_path / "one"
        result = cli("run", recipe_file({"steps": 2}), "--threads", "1", "--out", out, "--no-live")
        assert result.exit_code == 0, result.output
        assert seen == [1, 1] and torch.get_num_threads() == 2
        assert json.loads((out / "summary.json").read_text())["threads"] == 1
        assert "on cpu, 1 thread ->" in result.stdout and "threads: 1" in (out / "recipe.yaml").read_text()
        plain = tmp_path / "default"
        assert cli("run", recipe_file({"steps": 2}), "--out", plain, "--no-live").exit_code == 0
        assert "\nthreads:" not in (plain / "recipe.yaml").read_text() and seen[2:] == [2, 2]
        assert json.loads((plain / "summary.json").read_text())["threads"] == 2
    finally:
        torch.set_num_threads(1)  # the test session's (conftest)
    bad = cli("validate", recipe_file(), "--threads", "0")
    assert bad.exit_code == 2 and "--threads" in bad.stderr and "greater than or equal to 1" in bad.stderr
