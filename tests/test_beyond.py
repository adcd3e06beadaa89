"""Guidance terms from after the study: ISM, CSD, SDS-Bridge, SDI, ASD.

Each score is checked exactly against its formula on fixed predictions (the KnownUNet of
``test_guidances``: ε(z_t; y, t) = B[y] + z_t / 2 + t / 1000), with its model calls counted.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_interrupted_after
from sdsctl.components import Ramp, StepTimes
from sdsctl.diffusion import ddim_step, strided_path
from sdsctl.engine.loop import Optimization
from sdsctl.engine.recipe import load_recipe
from sdsctl_plugins.asd import ASD
from sdsctl_plugins.csd import CSD
from sdsctl_plugins.ism import ISM
from sdsctl_plugins.nfsd import NFSD_NEGATIVE_PROMPT
from sdsctl_plugins.sdi import SDI
from sdsctl_plugins.sds_bridge import SOURCE_TEXT, TARGET_TEXT, SDSBridge
from test_guidances import PROMPT, KnownUNet, clone_generator, latent, make_ctx, prior  # noqa: F401 (fixture)

NEG = NFSD_NEGATIVE_PROMPT


@pytest.fixture
def plain(recipe_file):
    return load_recipe(recipe_file()).recipe


@pytest.fixture
def negative(recipe_file):
    return load_recipe(recipe_file({"negative_prompt": NEG})).recipe


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- DDIM


def test_ddim_step_is_diffusers_inverse_scheduler_step(prior):
    from diffusers import DDIMInverseScheduler

    sched = DDIMInverseScheduler.from_config(prior.scheduler.config, clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(50)  # stride 20
    z, eps = latent(prior, 1), latent(prior, 2)
    a = prior.alphas_cumprod.cpu()
    for target in (20, 400, 980):
        expected = sched.step(eps, target, z).prev_sample
        close(ddim_step(eps, z, a[target - 20], a[target]), expected)


def test_ddim_step_there_and_back_is_the_identity(prior):
    z, eps = latent(prior, 1), latent(prior, 2)
    a = prior.alphas_cumprod
    close(ddim_step(eps, ddim_step(eps, z, a[100], a[700]), a[700], a[100]), z)


# ----------------------------------------------------------------------------- ISM


def test_ism_inverts_from_the_noised_start_in_strides_then_to_t(prior, negative):
    """x_0 noised to timestep 0 with offset noise, inverted with ∅ in strides of 200 to s, then one
    step to t; CFG's ∅ row is the negative prompt (tests/test_references.py: against LucidDreamer)."""
    fake = KnownUNet(prior, ["", PROMPT, NEG])
    ctx = make_ctx(fake, negative)
    ism = ISM(ISM.Config(guidance_scale=5.0, interval=150), ctx)
    z, t = latent(prior), 600
    g = clone_generator(ctx.generator)
    noise = torch.randn(z.shape, generator=g) + 0.1 * torch.randn((1, z.shape[1], 1, 1), generator=g)
    out = ism.score(z, StepTimes(t=t))
    s, a = 450, prior.alphas_cumprod
    x = prior.add_noise(z, noise, 0)
    for src, dst in ((0, 200), (200, 400), (400, 450)):  # strides of 200, the last shorter
        x = ddim_step(fake.eps("", x, src), x, a[src], a[dst])
    e_s = fake.eps("", x, s)
    x_t = ddim_step(e_s, x, a[s], a[t])
    uncond, cond = fake.eps(NEG, x_t, t), fake.eps(PROMPT, x_t, t)
    close(out.score, uncond + 5.0 * (cond - uncond) - e_s)
    assert out.timesteps == {"t": t, "s": s}
    assert [c["t"] for c in fake.calls] == [[0], [200], [400], [450], [t, t]]  # path steps + 2 calls
    assert [c["prompts"] for c in fake.calls[:4]] == [[""]] * 4 and fake.calls[4]["prompts"] == [NEG, PROMPT]
    close(out.denoised_estimate(), (x_t - (1 - a[t]).sqrt() * (uncond + 5.0 * (cond - uncond))) / a[t].sqrt())


def test_ism_clean_start_and_interval_ramp(prior, plain):
    """``noised_start: false`` inverts x_0 itself (no draw); δ_T follows its ramp; s = 0 needs no path."""
    fake = KnownUNet(prior, ["", PROMPT])
    ctx = make_ctx(fake, plain)
    ism = ISM(ISM.Config(interval={"start": 100, "end": 80, "until": 0.5}, noised_start=False), ctx)
    z, a = latent(prior), prior.alphas_cumprod
    state = ctx.generator.get_state()
    out = ism.score(z, StepTimes(t=60, progress=0.25))  # δ_T = 90 > t: s = 0
    assert torch.equal(ctx.generator.get_state(), state)  # nothing drawn
    e0 = fake.eps("", z, 0)
    x_t = ddim_step(e0, z, a[0], a[60])
    close(out.score, fake.eps("", x_t, 60) + 7.5 * (fake.eps(PROMPT, x_t, 60) - fake.eps("", x_t, 60)) - e0)
    assert out.timesteps == {"t": 60, "s": 0} and [c["t"] for c in fake.calls] == [[0], [60, 60]]
    assert ism.score(z, StepTimes(t=700, progress=0.6)).timesteps["s"] == 620  # δ_T reached its end, 80


def test_strided_path():
    assert strided_path(0, 450, 200) == [0, 200, 400, 450]
    assert strided_path(0, 400, 200) == [0, 200, 400]
    assert strided_path(0, 0, 200) == [0]
    with pytest.raises(ValueError):
        strided_path(0, 10, 0)


# ----------------------------------------------------------------------------- CSD


def test_csd_u0_n_minus1_is_w_times_the_classifier_direction(prior, negative):
    fake = KnownUNet(prior, ["", PROMPT, NEG])
    ctx = make_ctx(fake, negative)
    csd = CSD(CSD.Config(guidance_scale=7.5, u=0, n=-1, normalize=False), ctx)
    z, t = latent(prior), 500
    g = clone_generator(ctx.generator)
    z_t = prior.add_noise(z, torch.randn(z.shape, generator=g), t)
    out = csd.score(z, StepTimes(t=t))
    close(out.score, 7.5 * (fake.eps(PROMPT, z_t, t) - fake.eps("", z_t, t)))  # no noise term
    (call,) = fake.calls  # one call of three rows
    assert call["prompts"] == ["", PROMPT, NEG] and call["t"] == [t] * 3


def test_csd_ramps_follow_the_run_and_normalize(prior, negative):
    fake = KnownUNet(prior, ["", PROMPT, NEG])
    ctx = make_ctx(fake, negative)
    config = CSD.Config(guidance_scale=2.0, u={"start": 0, "end": -1, "until": 0.5},
                        n={"start": -1, "end": 0, "until": 0.5})
    assert config.normalize  # the authors' default
    csd = CSD(config, ctx)
    z, t = latent(prior), 300
    seen = []
    for progress in (0.0, 0.2, 0.5, 0.9):
        g = clone_generator(ctx.generator)
        z_t = prior.add_noise(z, torch.randn(z.shape, generator=g), t)
        out = csd.score(z, StepTimes(t=t, progress=progress))
        u, n = float(out.norms["u"]), float(out.norms["n"])
        raw = 2.0 * (fake.eps(PROMPT, z_t, t) + u * fake.eps(NEG, z_t, t) + n * fake.eps("", z_t, t))
        close(out.score, raw / (raw.norm() + 1e-8))
        seen.append((u, n))
    assert seen == [(0.0, -1.0), pytest.approx((-0.4, -0.6)), (-1.0, 0.0), (-1.0, 0.0)]
    assert csd.state_dict() == {}  # the ramps read the loop's progress: nothing to save


@pytest.mark.parametrize("weighting", ["uniform", "one-minus-alpha-bar"])
def test_csd_normalization_with_a_weighting(recipe_file, tiny_prior, weighting, cli):
    """The step is w(t)·score: norm 1 with ``uniform`` (the authors' order: weight, then
    normalize), w(t) with another weighting -- which validation warns about."""
    path = recipe_file({"steps": 3, "negative_prompt": NEG, "guidance": {"name": "csd"}, "weighting": weighting})
    warned = "normalize divides the score by its norm" in cli("validate", path).stderr
    assert warned == (weighting != "uniform")
    loaded = load_recipe(path)
    prior_ = loaded.components["model"].obj(loaded.recipe.model).load(torch.device("cpu"), torch.float32)
    opt = Optimization(loaded, prior_, torch.device("cpu"), torch.float32)
    opt.initialize()
    for k in range(3):
        record = opt.step(k)
        values = dict(zip(record.names, record.values.tolist()))
        assert values["score"] == pytest.approx(record.host["weight"], rel=1e-5)
        assert record.host["weight"] == (1.0 if weighting == "uniform" else
                                         pytest.approx(1 - float(prior_.alphas_cumprod[record.host["t"]])))


def test_ramp():
    assert Ramp.model_validate(-0.5) == Ramp(start=-0.5, end=-0.5)
    assert Ramp(start=0, end=-1).at(0.25) == -0.25
    late = Ramp(start=980, end=500, begin=0.5, until=0.5)  # a switch at half the run
    assert [late.at(p) for p in (0.0, 0.499, 0.5, 0.9)] == [980, 980, 500, 500]
    early = Ramp(start=100, end=80, until=0.3)
    assert [early.at(p) for p in (0.0, 0.15, 0.3, 1.0)] == [100, pytest.approx(90), 80, 80]
    with pytest.raises(ValueError, match="until"):
        Ramp(start=0, end=1, begin=0.6, until=0.4)


# ----------------------------------------------------------------------------- SDS-Bridge


def test_sds_bridge_is_sds_in_warmup_then_the_bridge(prior, plain):
    src, tgt = f"{PROMPT}, {SOURCE_TEXT}", f"{PROMPT}, {TARGET_TEXT}"
    fake = KnownUNet(prior, ["", PROMPT, src, tgt])
    ctx = make_ctx(fake, plain)
    bridge = SDSBridge(SDSBridge.Config(guidance_scale=40), ctx)
    z, t = latent(prior), 400
    a = prior.alphas_cumprod
    for phase in ("warmup", "main"):
        g = clone_generator(ctx.generator)
        eps = torch.randn(z.shape, generator=g)
        z_t = prior.add_noise(z, eps, t)
        out = bridge.score(z, StepTimes(t=t, phase=phase))
        if phase == "warmup":
            uncond, cond = fake.eps("", z_t, t), fake.eps(PROMPT, z_t, t)
            close(out.score, uncond + 40 * (cond - uncond) - eps)
            assert fake.calls[-1]["prompts"] == ["", PROMPT]
        else:
            e_src, e_tgt = fake.eps(src, z_t, t), fake.eps(tgt, z_t, t)
            close(out.score, 40 * (e_tgt - e_src))
            assert fake.calls[-1]["prompts"] == [src, tgt]
            close(out.denoised_estimate(), (z_t - (1 - a[t]).sqrt() * (e_src + 40 * (e_tgt - e_src))) / a[t].sqrt())
    assert len(fake.calls) == 2  # one call a step


def test_sds_bridge_default_texts_are_the_papers():
    assert SDSBridge.Config().source.startswith("oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry")
    assert SDSBridge.Config().target == "detailed high resolution, high quality, sharp"


# ----------------------------------------------------------------------------- SDI


def test_sdi_path_and_score_without_noise(prior, plain):
    """Leading timesteps below t after a step from offset − T/n; no overshoot and η = 0: the
    score is ε_CFG(x_t) − ε̃ with ε̃ the noise that makes x_t (tests/test_references.py: against
    threestudio with both)."""
    fake = KnownUNet(prior, ["", PROMPT])
    sdi = SDI(SDI.Config(guidance_scale=7.5, inversion_steps=4, inversion_guidance_scale=-2.0, inversion_eta=0,
                         overshoot=False), make_ctx(fake, plain))
    assert sdi.offset == 1  # the tiny prior's scheduler: steps_offset 1, as SD's
    z, t = latent(prior), 600
    out = sdi.score(z, StepTimes(t=t))
    a = prior.alphas_cumprod
    path = [-249, 1, 251, 501, 600]

    def inv_eps(x, tau):
        u, c = fake.eps("", x, tau), fake.eps(PROMPT, x, tau)
        return u - 2.0 * (c - u)

    x_t = z
    for src, dst in zip(path, path[1:]):
        x_t = ddim_step(inv_eps(x_t, max(src, 0)), x_t, a[max(src, 0)], a[dst])
    noise = (x_t - a[t].sqrt() * z) / (1 - a[t]).sqrt()
    uncond, cond = fake.eps("", x_t, t), fake.eps(PROMPT, x_t, t)
    close(out.score, uncond + 7.5 * (cond - uncond) - noise)
    assert [c["t"] for c in fake.calls] == [[0, 0], [1, 1], [251, 251], [501, 501], [t, t]]  # path steps + 1
    assert out.timesteps == {"t": t, "t_inverted": t}
    close(prior.add_noise(z, noise, t), x_t)  # the noise that makes x_t


def test_sdi_overshoot_stays_below_the_last_timestep(prior, plain):
    sdi = SDI(SDI.Config(), make_ctx(prior, plain))
    ends = [sdi.path(950)[-1] for _ in range(30)] + [sdi.path(300)[-1] for _ in range(30)]
    assert all(950 <= e <= 999 for e in ends[:30]) and max(ends[:30]) == 999
    assert all(300 <= e < 400 for e in ends[30:]) and len(set(ends[30:])) > 10


# ----------------------------------------------------------------------------- ASD


@pytest.mark.parametrize("random", [False, True])
def test_asd_one_call_of_three_rows_same_noise(prior, plain, random):
    fake = KnownUNet(prior, ["", PROMPT])
    ctx = make_ctx(fake, plain)
    asd = ASD(ASD.Config(guidance_scale=7.5, ratio=0.1, random=random), ctx)
    z, t = latent(prior), 820
    g = clone_generator(ctx.generator)
    delta = 80.0 * (float(torch.rand((), generator=g)) if random else 1.0)
    t2 = t + int(delta)
    eps = torch.randn(z.shape, generator=g)
    z_t, z_t2 = prior.add_noise(z, eps, t), prior.add_noise(z, eps, t2)
    out = asd.score(z, StepTimes(t=t, t_min=20))  # Δt measured from the schedule's t_min
    (call,) = fake.calls
    assert call["prompts"] == ["", PROMPT, PROMPT] and call["t"] == [t, t, t2]
    assert out.timesteps == {"t": t, "t_shifted": t2} and (t2 == 900) != random
    uncond, cond = fake.eps("", z_t, t), fake.eps(PROMPT, z_t, t)
    close(out.score, uncond + 7.5 * (cond - uncond) - fake.eps(PROMPT, z_t2, t2))


def test_asd_shift_grows_with_t_and_stays_in_range(prior, plain):
    asd = ASD(ASD.Config(ratio=0.5, random=False), make_ctx(prior, plain))
    shifts = [asd.shifted(t, 20) - t for t in (20, 100, 500, 900, 999)]
    assert shifts == [0, 40, 240, 99, 0]  # clipped at the last timestep
    assert asd.shifted(600, 500) - 600 == 50  # from the schedule's current t_min
    fixed = ASD(ASD.Config(ratio=0.5, random=False, shift_t_min=100), make_ctx(prior, plain))
    assert fixed.shifted(600, 500) - 600 == 250  # shift_t_min wins over the schedule's


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("guidance", ["ism", "csd", "sds-bridge", "sdi", "asd"])
def test_each_term_interrupted_and_resumed_matches_an_uninterrupted_run(cli, recipe_file, tmp_path, monkeypatch,
                                                                         guidance):
    """SIGINT after step 3 of 6, ``sdsctl resume``: every record and final.png as in one run --
    the terms' ramps (CSD's u and n, ISM's δ_T), draws (SDI's overshoot and η, ASD's shift) and the
    schedules' annealing continue exactly."""
    bundled = load_recipe(guidance.replace("-", "_")).recipe
    extra = {"ism": {"inversion_steps": 2}, "sdi": {"inversion_steps": 3}}.get(guidance, {})
    path = recipe_file({"steps": 6, "negative_prompt": "dull", "guidance": {**bundled.guidance.model_dump(), **extra},
                        "schedule": bundled.schedule.model_dump(), "weighting": bundled.weighting.model_dump()})
    assert cli("run", path, "--out", tmp_path / "full", "--no-live").exit_code == 0
    result = run_interrupted_after(path, tmp_path / "part", 3, monkeypatch)
    assert (result.status, result.steps_done) == ("interrupted", 3)
    assert cli("resume", tmp_path / "part", "--no-live").exit_code == 0

    def records(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def comparable(r):
        return {k: v for k, v in r.items() if k != "seconds"}

    full, part = records("full"), records("part")
    assert [r["step"] for r in part] == list(range(1, 7))
    assert [comparable(r) for r in part] == [comparable(r) for r in full]
    assert len({r["t"] for r in full}) > 1 and all(r["norms"] for r in full)
    assert (tmp_path / "part" / "final.png").read_bytes() == (tmp_path / "full" / "final.png").read_bytes()


#: the published settings each bundled recipe runs (the references: tests/test_references.py)
PUBLISHED = {
    "ism": ({"guidance_scale": 7.5, "interval": {"start": 100, "end": 80, "begin": 0.0, "until": 0.3},
             "inversion_stride": 200, "inversion_steps": 5, "noised_start": True, "offset_noise": 0.1},
            "anneal", "sigma-over-alpha"),
    "csd": ({"guidance_scale": 1.0, "normalize": True, "u": {"start": 0.0, "end": -1.0, "begin": 0.0, "until": 0.5},
             "n": {"start": -1.0, "end": 0.0, "begin": 0.0, "until": 0.5}}, "anneal", "uniform"),
    "sdi": ({"guidance_scale": 8.5, "inversion_guidance_scale": -6.5, "inversion_steps": 10, "inversion_eta": 0.3,
             "overshoot": True}, "linear", "sigma-over-alpha"),
    "asd": ({"guidance_scale": 7.5, "ratio": 0.1, "random": True, "shift_t_min": None}, "anneal",
            "one-minus-alpha-bar"),
    "sds_bridge": ({"guidance_scale": 40.0}, "warmup", "one-minus-alpha-bar"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_recipes_run_the_published_configuration(name):
    recipe = load_recipe(name).recipe
    guidance, schedule, weighting = PUBLISHED[name]
    assert recipe.guidance.name == name.replace("_", "-")
    assert {k: v for k, v in recipe.guidance.model_dump().items() if k in guidance} == guidance
    assert (recipe.schedule.name, recipe.weighting.name) == (schedule, weighting)
    assert recipe.optimizer.score_scale == 1.0


def test_sds_bridge_stage_two_starts_at_half_the_run():
    recipe = load_recipe("sds_bridge").recipe
    assert recipe.schedule.warmup_steps * 2 == recipe.steps
