"""Guidances: NFSD's two regimes, robust NFSD's rescaled correction, VSD's LoRA, SDS's CFG.

Most tests replace the UNet by a known function of (row's prompt, z_t, t) so that every
score can be checked exactly against its formula, together with the one batched
``predict_noise`` call (its rows, prompts, timesteps and noised latents).
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from sdsctl.components import RunContext, StepTimes
from sdsctl.diffusion import cfg
from sdsctl.engine.recipe import load_recipe
from sdsctl.models import Prior
from sdsctl_plugins import sds as sds_module
from sdsctl_plugins.nfsd import NFSD, NFSD_NEGATIVE_PROMPT
from sdsctl_plugins.robust_nfsd import RobustNFSD
from sdsctl_plugins.sds import SDS
from sdsctl_plugins.vsd import VSD

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)


@pytest.fixture
def recipe(recipe_file):
    """The recipe the guidances see: NFSD's negative prompt as its y_neg (SDS/VSD: CFG's ∅ row)."""
    return load_recipe(recipe_file({"negative_prompt": NFSD_NEGATIVE_PROMPT})).recipe


@pytest.fixture
def plain(recipe_file):
    """A recipe with an empty negative prompt: CFG's unconditional row is the empty prompt."""
    return load_recipe(recipe_file()).recipe


def make_ctx(prior, recipe, seed: int = 0) -> RunContext:
    return RunContext(prior=prior, recipe=recipe, device=torch.device("cpu"), dtype=torch.float32,
                      generator=torch.Generator().manual_seed(seed), steps=10)


class KnownUNet:
    """The tiny prior with ``predict_noise`` replaced by ε(z_t; y, t) = B[y] + z_t / 2 + t / 1000.

    B[y] is a fixed random tensor per prompt; rows are identified by their embeddings. Every
    call is recorded: its prompts, per-row timesteps and the noised latents it was given.
    """

    def __init__(self, prior: Prior, prompts: list[str]):
        self._prior = prior
        self.calls: list[dict] = []
        self.prompts = prompts
        self.embeddings = {p: prior.encode_prompts([p]) for p in prompts}
        g = torch.Generator().manual_seed(1234)
        shape = (1, prior.latent_channels, prior.latent_size, prior.latent_size)
        self.base = {p: torch.randn(shape, generator=g) for p in prompts}

    def __getattr__(self, name):  # everything but predict_noise is the real prior
        return getattr(self._prior, name)

    def eps(self, prompt: str, z_t: torch.Tensor, t: int) -> torch.Tensor:
        return self.base[prompt] + 0.5 * z_t + t / 1000

    def predict_noise(self, z_t, t, embeddings):
        n = z_t.shape[0]
        t = torch.as_tensor(t)
        ts = [int(v) for v in (t.expand(n) if t.dim() == 0 else t)]
        assert embeddings.shape[0] == n, "one embedding row per latent row"
        names = []
        for row in embeddings:
            (name,) = [p for p, e in self.embeddings.items() if torch.equal(e[0], row)]
            names.append(name)
        self.calls.append({"prompts": names, "t": ts, "z": z_t.clone()})
        return torch.cat([self.eps(p, z_t[i : i + 1], ts[i]) for i, p in enumerate(names)])


def latent(prior, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, prior.latent_channels, prior.latent_size, prior.latent_size), generator=g)


def clone_generator(g: torch.Generator) -> torch.Generator:
    copy = torch.Generator()
    copy.set_state(g.get_state())
    return copy


# ----------------------------------------------------------------------------- NFSD


@pytest.mark.parametrize("t, large", [(0, False), (150, False), (199, False), (200, True), (201, True), (700, True)])
def test_nfsd_score_in_both_regimes(prior, recipe, t, large):
    fake = KnownUNet(prior, ["", PROMPT, NFSD_NEGATIVE_PROMPT])
    ctx = make_ctx(fake, recipe)
    nfsd = NFSD(NFSD.Config(guidance_scale=7.5, correction_scale=0.1), ctx)
    z = latent(prior)
    g = clone_generator(ctx.generator)
    z_t = prior.add_noise(z, torch.randn(z.shape, generator=g), t)

    out = nfsd.score(z, StepTimes(t=t))

    assert len(fake.calls) == 1  # one batched UNet call per step
    (call,) = fake.calls
    rows = ["", PROMPT, NFSD_NEGATIVE_PROMPT] if large else ["", PROMPT]
    assert call["prompts"] == rows
    assert call["t"] == [t] * len(rows)
    for i in range(len(rows)):
        assert torch.equal(call["z"][i : i + 1], z_t)  # every row sees the same noised latent
    e = {p: fake.eps(p, z_t, t) for p in rows}
    classifier = e[PROMPT] - e[""]
    correction = e[""] - e[NFSD_NEGATIVE_PROMPT] if large else e[""]
    expected = 7.5 * classifier + 0.1 * correction  # and no sampled noise subtracted
    assert out.score.shape == z.shape
    torch.testing.assert_close(out.score, expected, rtol=1e-6, atol=1e-6)
    assert float(out.norms["classifier"]) == pytest.approx(float((7.5 * classifier).norm()), rel=1e-6)
    assert float(out.norms["correction"]) == pytest.approx(float((0.1 * correction).norm()), rel=1e-6)
    assert out.timesteps == {"t": t}
    # HiFA's image target: the CFG prediction's one-step denoised estimate
    a = prior.alphas_cumprod[t]
    guided = e[""] + 7.5 * classifier
    torch.testing.assert_close(out.denoised_estimate(),
                               (z_t - (1 - a).sqrt() * guided) / a.sqrt(), rtol=1e-5, atol=1e-5)


def test_nfsd_y_neg_is_the_recipes_negative_prompt(prior, recipe_file):
    """One meaning for negative_prompt: NFSD's y_neg is the recipe's, not an option of its own."""
    other = "dull, dark"
    fake = KnownUNet(prior, ["", PROMPT, other])
    nfsd = NFSD(NFSD.Config(), make_ctx(fake, load_recipe(recipe_file({"negative_prompt": other})).recipe))
    nfsd.score(latent(prior), StepTimes(t=700))
    assert fake.calls[0]["prompts"] == ["", PROMPT, other]
    assert "negative_prompt" not in NFSD.Config.model_fields


@pytest.mark.parametrize("guidance", ["nfsd", "robust-nfsd"])
def test_nfsd_with_an_empty_negative_prompt_is_a_validation_error(recipe_file, guidance):
    from sdsctl.errors import RecipeError

    with pytest.raises(RecipeError, match="negative_prompt is empty"):
        load_recipe(recipe_file({"guidance": guidance}))
    load_recipe(recipe_file({"guidance": {"name": guidance, "threshold": 1000}}))  # ε(∅) at every t: fine


def test_nfsd_regimes_differ_on_the_real_prior(prior, recipe):
    """On the real UNet the correction below and above the threshold are different terms."""
    nfsd = NFSD(NFSD.Config(guidance_scale=0.0, correction_scale=1.0, threshold=500), make_ctx(prior, recipe))
    z = latent(prior)
    _, small, small_corr = nfsd.terms(z, 499)
    _, large, large_corr = nfsd.terms(z, 500)
    uncond = prior.predict_noise(z, 499, prior.encode_prompts([""]))
    torch.testing.assert_close(small_corr, uncond, rtol=1e-5, atol=1e-6)
    negative = prior.predict_noise(torch.cat([z, z]), 500, prior.encode_prompts(["", NFSD_NEGATIVE_PROMPT]))
    torch.testing.assert_close(large_corr, negative[:1] - negative[1:], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- robust NFSD


def test_robust_nfsd_one_call_of_three_rows_and_its_formula(prior, recipe):
    fake = KnownUNet(prior, ["", PROMPT, NFSD_NEGATIVE_PROMPT])
    ctx = make_ctx(fake, recipe)
    robust = RobustNFSD(RobustNFSD.Config(guidance_scale=7.5, ratio=2.0), ctx)
    z, t = latent(prior), 800
    g = clone_generator(ctx.generator)  # the guidance draws s, then the noise of z_t, then of z_s
    s = int(torch.randint(20, 200, (1,), generator=g))
    z_t = prior.add_noise(z, torch.randn(z.shape, generator=g), t)
    z_s = prior.add_noise(z, torch.randn(z.shape, generator=g), s)

    out = robust.score(z, StepTimes(t=t))

    assert len(fake.calls) == 1
    (call,) = fake.calls
    assert call["prompts"] == ["", PROMPT, ""]
    assert call["t"] == [t, t, s]
    assert torch.equal(call["z"][0:1], z_t) and torch.equal(call["z"][1:2], z_t)
    assert torch.equal(call["z"][2:3], z_s)
    assert out.timesteps == {"t": t, "t_correction": s}
    classifier = 7.5 * (fake.eps(PROMPT, z_t, t) - fake.eps("", z_t, t))
    raw = fake.eps("", z_s, s)
    expected = classifier + 2.0 * classifier.norm() / raw.norm() * raw
    torch.testing.assert_close(out.score, expected, rtol=1e-5, atol=1e-6)
    correction = out.score - classifier
    assert float(correction.norm() / classifier.norm()) == pytest.approx(2.0, abs=1e-5)
    a = prior.alphas_cumprod[t]
    guided = fake.eps("", z_t, t) + classifier
    torch.testing.assert_close(out.denoised_estimate(),
                               (z_t - (1 - a).sqrt() * guided) / a.sqrt(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.5, 2.0, 3.0])
def test_robust_nfsd_norm_ratio_on_the_real_prior(prior, recipe, ratio):
    robust = RobustNFSD(RobustNFSD.Config(ratio=ratio), make_ctx(prior, recipe, seed=3))
    z = latent(prior)
    for t in (300, 600, 950):
        out = robust.score(z, StepTimes(t=t))
        ratio_seen = float(out.norms["correction"]) / float(out.norms["classifier"])
        assert ratio_seen == pytest.approx(ratio, abs=1e-5)
        assert torch.isfinite(out.score).all() and out.score.shape == z.shape


def test_robust_nfsd_correction_timestep_range(prior, recipe):
    fake = KnownUNet(prior, ["", PROMPT, NFSD_NEGATIVE_PROMPT])
    robust = RobustNFSD(RobustNFSD.Config(correction_t_min=100, correction_t_max=104), make_ctx(fake, recipe))
    z = latent(prior)
    seen = set()
    for _ in range(60):
        out = robust.score(z, StepTimes(t=900))
        s = out.timesteps["t_correction"]
        assert fake.calls[-1]["t"] == [900, 900, s]
        seen.add(s)
    assert seen == {100, 101, 102, 103}  # [min, max): the upper bound is never drawn
    assert len(fake.calls) == 60


def test_robust_nfsd_default_correction_timesteps_are_small(prior, recipe):
    robust = RobustNFSD(RobustNFSD.Config(), make_ctx(prior, recipe))
    z = latent(prior)
    draws = [robust.score(z, StepTimes(t=900)).timesteps["t_correction"] for _ in range(20)]
    assert all(20 <= s < 200 for s in draws) and len(set(draws)) > 5


def test_robust_nfsd_correction_range_is_validated(recipe_file):
    with pytest.raises(ValueError, match="correction_t_min"):
        RobustNFSD.Config(correction_t_min=200, correction_t_max=200)
    from sdsctl.errors import RecipeError

    with pytest.raises(RecipeError, match="correction_t_max"):
        load_recipe(recipe_file({"negative_prompt": "dull",
                                 "guidance": {"name": "robust-nfsd", "correction_t_max": 1001}}))


def test_robust_nfsd_warmup_defaults_to_nfsds_own_correction():
    """The study: "for the first 300 iterations ... optimize the NFSD" -- its correction included."""
    assert RobustNFSD.Config().warmup_correction_scale == NFSD.Config().correction_scale == 1.0


@pytest.mark.parametrize("t, warm_scale", [(700, 0.0), (700, 0.3), (700, 1.0), (150, 0.3)])
def test_robust_nfsd_warmup_is_nfsd(prior, recipe, t, warm_scale):
    fake = KnownUNet(prior, ["", PROMPT, NFSD_NEGATIVE_PROMPT])
    ctx = make_ctx(fake, recipe)
    robust = RobustNFSD(RobustNFSD.Config(guidance_scale=5.0, warmup_correction_scale=warm_scale), ctx)
    z = latent(prior)
    g = clone_generator(ctx.generator)
    z_t = prior.add_noise(z, torch.randn(z.shape, generator=g), t)

    out = robust.score(z, StepTimes(t=t, phase="warmup"))

    large = t >= 200
    (call,) = fake.calls
    assert call["prompts"] == (["", PROMPT, NFSD_NEGATIVE_PROMPT] if large else ["", PROMPT])
    assert call["t"] == [t] * len(call["prompts"])  # no small correction timestep in warm-up
    assert out.timesteps == {"t": t}
    e = {p: fake.eps(p, z_t, t) for p in call["prompts"]}
    correction = e[""] - e[NFSD_NEGATIVE_PROMPT] if large else e[""]
    expected = 5.0 * (e[PROMPT] - e[""]) + warm_scale * correction
    torch.testing.assert_close(out.score, expected, rtol=1e-6, atol=1e-6)


def test_robust_nfsd_with_the_warmup_schedule_in_a_run(cli, recipe_file, tmp_path):
    path = recipe_file({"steps": 4, "guidance": "robust-nfsd", "negative_prompt": "dull",
                        "schedule": {"name": "warmup", "warmup_steps": 2, "t_min": 500, "t_max": 900}})
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warmup", "warmup", "main", "main"]
    assert all("t_correction" not in r["timesteps"] for r in records[:2])
    for r in records[2:]:
        assert 20 <= r["timesteps"]["t_correction"] < 200
        assert r["norms"]["correction"] / r["norms"]["classifier"] == pytest.approx(2.0, rel=1e-4)


# ----------------------------------------------------------------------------- SDS


def test_sds_score_is_diffusers_cfg_minus_the_sampled_noise(prior, plain, monkeypatch):
    fake = KnownUNet(prior, ["", PROMPT])
    ctx = make_ctx(fake, plain)
    used = []

    def recording_cfg(uncond, cond, scale):
        used.append(scale)
        return cfg(uncond, cond, scale)

    monkeypatch.setattr(sds_module, "cfg", recording_cfg)
    sds = SDS(SDS.Config(guidance_scale=30.0), ctx)
    z, t = latent(prior), 600
    g = clone_generator(ctx.generator)
    eps = torch.randn(z.shape, generator=g)
    z_t = prior.add_noise(z, eps, t)

    out = sds.score(z, StepTimes(t=t))

    (call,) = fake.calls
    assert call["prompts"] == ["", PROMPT] and call["t"] == [t, t]
    assert used == [30.0]  # through the one CFG function
    uncond, cond = fake.eps("", z_t, t), fake.eps(PROMPT, z_t, t)
    diffusers_form = uncond + 30.0 * (cond - uncond)
    torch.testing.assert_close(out.score, diffusers_form - eps, rtol=1e-6, atol=1e-5)
    threestudio_form = cond + 30.0 * (cond - uncond)
    assert not torch.allclose(out.score, threestudio_form - eps, atol=1e-3)
    a = prior.alphas_cumprod[t]  # HiFA's x̂₀, by hand
    torch.testing.assert_close(out.denoised_estimate(),
                               (z_t - (1 - a).sqrt() * diffusers_form) / a.sqrt(), rtol=1e-5, atol=1e-5)


def test_cfg_formula():
    uncond, cond = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    torch.testing.assert_close(cfg(uncond, cond, 7.5), torch.tensor([1.0 + 7.5 * 2.0, -2.0 + 7.5 * 2.5]))
    torch.testing.assert_close(cfg(uncond, cond, 1.0), cond)
    torch.testing.assert_close(cfg(uncond, cond, 0.0), uncond)


# ----------------------------------------------------------------------------- VSD


def _lora(vsd: VSD) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in vsd.lora.items()}


def test_vsd_trains_its_lora_and_nothing_else(tiny_prior, recipe):
    prior = Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)  # VSD adds an adapter: own copy
    base = {n: p.detach().clone() for n, p in prior.unet.named_parameters()}
    vsd = VSD(VSD.Config(lora_rank=2, lora_lr=1e-2), make_ctx(prior, recipe))
    start = _lora(vsd)
    assert start and all(not p.any() for n, p in start.items() if "lora_B" in n)  # LoRA starts as identity
    z = latent(prior)
    with torch.no_grad():  # as the loop calls it
        outs = [vsd.score(z, StepTimes(t=t)) for t in (900, 500, 100)]
    for out in outs:
        assert out.score.shape == z.shape and torch.isfinite(out.score).all()
        assert {"pretrained", "lora", "lora_loss"} <= set(out.norms)
    after = _lora(vsd)
    assert any(after[n].abs().max() > 0 for n in after if "lora_B" in n)
    assert any(not torch.equal(after[n], start[n]) for n in after if "lora_A" in n)
    for n, p in prior.unet.named_parameters():  # the pretrained weights stay frozen
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, base[key]), n


def test_vsd_state_round_trip_continues_identically(tiny_prior, recipe):
    prior = Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)
    ctx = make_ctx(prior, recipe)
    vsd = VSD(VSD.Config(lora_rank=2, lora_lr=1e-2), ctx)
    z = latent(prior)
    with torch.no_grad():
        vsd.score(z, StepTimes(t=700))
        buf = io.BytesIO()  # as state.pt stores it
        torch.save(vsd.state_dict(), buf)
        generator_state = ctx.generator.get_state()
        first = vsd.score(z, StepTimes(t=400))
        first_lora = _lora(vsd)
        vsd.score(z, StepTimes(t=300))  # move on, then go back

        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        other = VSD(VSD.Config(lora_rank=2, lora_lr=1e-2), make_ctx(prior, recipe, seed=99))
        other.load_state_dict(state)
        other.ctx.generator.set_state(generator_state)
        again = other.score(z, StepTimes(t=400))
    assert torch.equal(again.score, first.score)
    assert all(torch.equal(_lora(other)[n], first_lora[n]) for n in first_lora)


def test_vsd_run_saves_trained_lora_in_state(cli, recipe_file, tmp_path):
    out = tmp_path / "run"
    result = cli("run", recipe_file({"steps": 3, "guidance": {"name": "vsd", "lora_rank": 2}}), "--out", out,
                 "--no-live")
    assert result.exit_code == 0, result.output
    state = torch.load(out / "state.pt", weights_only=True)
    lora = state["guidance"]["lora"]
    assert lora and any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"pretrained", "lora", "lora_loss"} <= set(record["norms"])


def test_vsd_score_is_the_pretrained_cfg_minus_the_lora_estimate(tiny_prior, plain):
    """score = ε_pretrained,CFG(z_t) − ε_LoRA(z_t; y), on fixed noise, with a LoRA that changes
    the UNet's output: computing the pretrained rows with the adapter enabled (or the LoRA's with
    it disabled) fails this test."""
    prior = Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)
    ctx = make_ctx(prior, plain)
    vsd = VSD(VSD.Config(guidance_scale=4.0, lora_rank=2, lora_updates=0), ctx)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in vsd.lora.items():  # a LoRA far from the identity
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    z, t = latent(prior), 500
    replay = clone_generator(ctx.generator)
    eps = torch.randn(z.shape, generator=replay)
    z_t = prior.add_noise(z, eps, t)
    with torch.no_grad():
        out = vsd.score(z, StepTimes(t=t))
        embeddings = torch.cat([prior.encode_prompts([""]), prior.encode_prompts([PROMPT])])
        lora = prior.predict_noise(z_t, t, embeddings[1:])
        prior.unet.disable_adapters()
        uncond, cond = prior.predict_noise(torch.cat([z_t, z_t]), t, embeddings).chunk(2)
        prior.unet.enable_adapters()
    assert (lora - cond).abs().max() > 1e-3  # the LoRA matters here
    pretrained = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out.score, pretrained - lora, rtol=1e-5, atol=1e-5)
    a = prior.alphas_cumprod[t]
    torch.testing.assert_close(out.denoised_estimate(),
                               (z_t - (1 - a).sqrt() * pretrained) / a.sqrt(), rtol=1e-5, atol=1e-5)


def test_vsd_leaves_the_shared_unet_as_it_found_it(tiny_prior, plain):
    prior = Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)
    z, t = latent(prior), 400
    embeddings = prior.encode_prompts([PROMPT])
    with torch.no_grad():
        before = prior.predict_noise(z, t, embeddings)
    vsd = VSD(VSD.Config(lora_rank=2, lora_lr=1e-1), make_ctx(prior, plain))
    with torch.no_grad():
        for step in range(3):
            vsd.score(z, StepTimes(t=900 - 100 * step))
        assert not torch.allclose(prior.predict_noise(z, t, embeddings), before)  # the trained LoRA acts
    vsd.close()
    assert not any("lora_" in n for n, _ in prior.unet.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(prior.predict_noise(z, t, embeddings), before, rtol=0, atol=0)


def test_a_vsd_run_detaches_its_lora_when_it_ends(tiny_prior, recipe_file, tmp_path, monkeypatch):
    from sdsctl.engine import run
    from sdsctl.engine.panel import PlainLog

    seen = []
    original = VSD.close

    def recording(self):
        original(self)
        seen.append(any("lora_" in n for n, _ in self.unet.named_parameters()))

    monkeypatch.setattr(VSD, "close", recording)
    run.execute(load_recipe(recipe_file({"steps": 2, "guidance": {"name": "vsd", "lora_rank": 2}})),
                tmp_path / "run", PlainLog(100))
    assert seen == [False]
