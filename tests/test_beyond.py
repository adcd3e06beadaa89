"""Guidance terms from after the study: ISM, CSD, SDS-Bridge, SDI, ASD.

Each score is checked exactly against its formula on fixed predictions (the KnownUNet of
``test_guidances``: ε(z_t; y, t) = B[y] + z_t / 2 + t / 1000), with its model calls counted.
"""

from __future__ import annotations

import json

import pytest
import torch

from sdsctl.components import StepTimes
from sdsctl.diffusion import ddim_invert, ddim_step, even_path
from sdsctl.recipe import load_recipe
from sdsctl_plugins.asd import ASD
from sdsctl_plugins.csd import CSD, Ramp
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


def test_even_path():
    assert even_path(0, 300, 3) == [0, 100, 200, 300]
    assert even_path(0, 2, 4) == [0, 1, 2]  # repeats dropped
    with pytest.raises(ValueError):
        even_path(0, 10, 0)


# ----------------------------------------------------------------------------- ISM


def test_ism_with_zero_inversion_steps_is_the_documented_special_case(prior, plain):
    """x_s = x_0 at s = 0; x_t one DDIM step from it; score = ε_CFG(x_t, t; y) − ε(x_0, 0; ∅)."""
    fake = KnownUNet(prior, ["", PROMPT])
    ism = ISM(ISM.Config(guidance_scale=7.5, interval=50, inversion_steps=0), make_ctx(fake, plain))
    z, t = latent(prior), 600
    out = ism.score(z, StepTimes(t=t))
    a = prior.alphas_cumprod
    e0 = fake.eps("", z, 0)
    x_t = a[t].sqrt() * (z - (1 - a[0]).sqrt() * e0) / a[0].sqrt() + (1 - a[t]).sqrt() * e0
    guided = fake.eps("", x_t, t) + 7.5 * (fake.eps(PROMPT, x_t, t) - fake.eps("", x_t, t))
    close(out.score, guided - e0)
    assert out.timesteps == {"t": t, "s": 0}
    assert [c["t"] for c in fake.calls] == [[0], [t, t]]  # 2 model calls, the pair batched
    assert fake.calls[1]["prompts"] == ["", PROMPT]
    close(out.denoised_estimate(), (x_t - (1 - a[t]).sqrt() * guided) / a[t].sqrt())


def test_ism_inverts_to_s_then_to_t(prior, negative):
    fake = KnownUNet(prior, ["", PROMPT, NEG])
    ism = ISM(ISM.Config(guidance_scale=5.0, interval=100, inversion_steps=2), make_ctx(fake, negative))
    z, t = latent(prior), 700
    out = ism.score(z, StepTimes(t=t))
    s, a = 600, prior.alphas_cumprod
    x = z
    for src, dst in ((0, 300), (300, 600)):  # the inversion uses the empty prompt
        x = ddim_step(fake.eps("", x, src), x, a[src], a[dst])
    e_s = fake.eps("", x, s)
    x_t = ddim_step(e_s, x, a[s], a[t])
    uncond, cond = fake.eps(NEG, x_t, t), fake.eps(PROMPT, x_t, t)  # CFG's ∅ row: negative_prompt
    close(out.score, uncond + 5.0 * (cond - uncond) - e_s)
    assert out.timesteps == {"t": t, "s": s}
    assert [c["t"] for c in fake.calls] == [[0], [300], [600], [t, t]]  # inversion_steps + 2 calls
    assert [c["prompts"] for c in fake.calls[:3]] == [[""]] * 3 and fake.calls[3]["prompts"] == [NEG, PROMPT]


# ----------------------------------------------------------------------------- CSD


def test_csd_u0_n_minus1_is_w_times_the_classifier_direction(prior, negative):
    fake = KnownUNet(prior, ["", PROMPT, NEG])
    ctx = make_ctx(fake, negative)
    csd = CSD(CSD.Config(guidance_scale=7.5, u=0, n=-1), ctx)
    z, t = latent(prior), 500
    g = clone_generator(ctx.generator)
    z_t = prior.add_noise(z, torch.randn(z.shape, generator=g), t)
    out = csd.score(z, StepTimes(t=t))
    close(out.score, 7.5 * (fake.eps(PROMPT, z_t, t) - fake.eps("", z_t, t)))  # no noise term
    (call,) = fake.calls  # one call of three rows
    assert call["prompts"] == ["", PROMPT, NEG] and call["t"] == [t] * 3


def test_csd_ramps_anneal_over_the_run_and_normalize(prior, negative):
    fake = KnownUNet(prior, ["", PROMPT, NEG])
    ctx = make_ctx(fake, negative)  # ctx.steps = 10
    csd = CSD(CSD.Config(guidance_scale=2.0, u={"start": 0, "end": -1}, n={"start": -1, "end": 0}, normalize=True), ctx)
    z, t = latent(prior), 300
    seen = []
    for _ in range(10):
        g = clone_generator(ctx.generator)
        z_t = prior.add_noise(z, torch.randn(z.shape, generator=g), t)
        out = csd.score(z, StepTimes(t=t))
        u, n = float(out.norms["u"]), float(out.norms["n"])
        raw = 2.0 * (fake.eps(PROMPT, z_t, t) + u * fake.eps(NEG, z_t, t) + n * fake.eps("", z_t, t))
        close(out.score, raw / raw.norm())
        seen.append((u, n))
    assert seen[0] == (0.0, -1.0) and seen[-1] == (-1.0, 0.0)
    assert seen[4] == pytest.approx((-4 / 9, -5 / 9))
    assert csd.state_dict() == {"steps_done": 10}


def test_csd_ramp_accepts_a_constant():
    assert Ramp.model_validate(-0.5) == Ramp(start=-0.5, end=-0.5)
    assert Ramp(start=0, end=-1).at(0.25) == -0.25


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


def test_sdi_noise_comes_from_ddim_inversion(prior, plain):
    fake = KnownUNet(prior, ["", PROMPT])
    sdi = SDI(SDI.Config(guidance_scale=7.5, inversion_steps=3, inversion_guidance_scale=-2.0), make_ctx(fake, plain))
    z, t = latent(prior), 600
    out = sdi.score(z, StepTimes(t=t))
    a = prior.alphas_cumprod

    def inv_eps(x, tau):
        u, c = fake.eps("", x, tau), fake.eps(PROMPT, x, tau)
        return u - 2.0 * (c - u)

    x_t, _ = ddim_invert(inv_eps, z, [0, 200, 400, 600], a)
    noise = (x_t - a[t].sqrt() * z) / (1 - a[t]).sqrt()
    uncond, cond = fake.eps("", x_t, t), fake.eps(PROMPT, x_t, t)
    close(out.score, uncond + 7.5 * (cond - uncond) - noise)
    assert [c["t"] for c in fake.calls] == [[0, 0], [200, 200], [400, 400], [t, t]]  # inversion_steps + 1
    close(prior.add_noise(z, noise, t), x_t)  # the noise that makes x_t


# ----------------------------------------------------------------------------- ASD


@pytest.mark.parametrize("random", [False, True])
def test_asd_one_call_of_three_rows_same_noise(prior, plain, random):
    fake = KnownUNet(prior, ["", PROMPT])
    ctx = make_ctx(fake, plain)
    asd = ASD(ASD.Config(guidance_scale=7.5, ratio=0.1, random=random, shift_t_min=20), ctx)
    z, t = latent(prior), 820
    g = clone_generator(ctx.generator)
    delta = 80.0 * (float(torch.rand((), generator=g)) if random else 1.0)
    t2 = t + int(delta)
    eps = torch.randn(z.shape, generator=g)
    z_t, z_t2 = prior.add_noise(z, eps, t), prior.add_noise(z, eps, t2)
    out = asd.score(z, StepTimes(t=t))
    (call,) = fake.calls
    assert call["prompts"] == ["", PROMPT, PROMPT] and call["t"] == [t, t, t2]
    assert out.timesteps == {"t": t, "t_shifted": t2} and (t2 == 900) != random
    uncond, cond = fake.eps("", z_t, t), fake.eps(PROMPT, z_t, t)
    close(out.score, uncond + 7.5 * (cond - uncond) - fake.eps(PROMPT, z_t2, t2))


def test_asd_shift_grows_with_t_and_stays_in_range(prior, plain):
    asd = ASD(ASD.Config(ratio=0.5, random=False), make_ctx(prior, plain))
    shifts = [asd.shifted(t) - t for t in (20, 100, 500, 900, 999)]
    assert shifts == [0, 40, 240, 99, 0]  # clipped at the last timestep


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("guidance", ["ism", "csd", "sds-bridge", "sdi", "asd"])
def test_each_term_runs_and_resumes_its_state(cli, recipe_file, tmp_path, guidance):
    extra = {"ism": {"inversion_steps": 1}, "sdi": {"inversion_steps": 2}}.get(guidance, {})
    path = recipe_file({"steps": 3, "negative_prompt": "dull", "guidance": {"name": guidance, **extra}})
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["norms"] for r in records)


@pytest.mark.parametrize("name", ["ism", "csd", "sds_bridge", "sdi", "asd"])
def test_bundled_recipes_validate(name):
    loaded = load_recipe(name)
    assert loaded.recipe.guidance.name == name.replace("_", "-")
