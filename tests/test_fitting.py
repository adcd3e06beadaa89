"""How θ follows each step's target (``optimizer.fit``), amplification, HiFA's image target and
the weightings' formulas: the study's methods as it states them (issue 23)."""

from __future__ import annotations

import json

import pytest
import torch

from sdsctl.diffusion import eps_to_x0
from sdsctl.engine.loop import Optimization
from sdsctl.engine.recipe import load_recipe
from sdsctl.errors import RecipeError
from sdsctl.models import Prior


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)


def started(recipe_file, prior, content: dict) -> Optimization:
    opt = Optimization(load_recipe(recipe_file(content)), prior, torch.device("cpu"), torch.float32)
    opt.initialize()
    return opt


def render(opt: Optimization) -> torch.Tensor:
    with torch.no_grad():
        return opt.render().detach().clone()


def one_step(opt: Optimization):
    """(z before, the step's target z*, the record, z after) of step 0."""
    seen = {}
    original = opt.target

    def target(z, step, out):
        found = original(z, step, out)
        seen["target"] = found
        return found

    opt.target = target
    z0 = render(opt)
    record = opt.step(0).fetched()
    return z0, seen["target"].latent, record, render(opt)


def test_full_fit_assigns_latent_pixels_to_the_target(recipe_file, prior):
    opt = started(recipe_file, prior, {"optimizer": {"fit": "full"}})
    z0, target, record, z1 = one_step(opt)
    assert torch.equal(z1, target)  # θ ← z − g, exactly
    assert record["fit_fraction"] == 1.0 and record["fit_steps"] == 0
    assert not torch.equal(z0, z1)


def test_adam_fit_covers_a_small_fraction_and_reports_it(recipe_file, prior):
    opt = started(recipe_file, prior, {"optimizer": {"fit": "adam"}})
    z0, target, record, z1 = one_step(opt)
    expected = 1 - float((z1 - target).norm() / (z0 - target).norm())
    assert record["fit_fraction"] == pytest.approx(expected, abs=1e-6)
    assert 0 < record["fit_fraction"] < 0.5


@pytest.mark.parametrize("tolerance, cap", [(0.6, 200), (1e-6, 7)])
def test_full_fit_of_a_hash_grid_stops_at_the_tolerance_or_the_cap(recipe_file, prior, tolerance, cap):
    opt = started(recipe_file, prior, {
        "parameterization": {"name": "latent-hashgrid", "init_steps": 10},
        "optimizer": {"fit": "full", "lr": 0.01, "fit_tolerance": tolerance, "max_fit_steps": cap}})
    z0, target, record, z1 = one_step(opt)
    reached = 1 - float((z1 - target).norm() / (z0 - target).norm())
    assert record["fit_fraction"] == pytest.approx(reached, abs=1e-5)
    if cap == 7:
        assert record["fit_steps"] == 7 and reached < 1 - tolerance
    else:
        assert 1 <= record["fit_steps"] < cap and reached >= 1 - tolerance


def test_amplification_scales_the_step_in_full_fit(recipe_file, prior):
    """The target is z − k·g: with the same seed, k = 3 moves latent pixels three times as far."""
    moves = {}
    for k in (1.0, 3.0):
        opt = started(recipe_file, prior, {"optimizer": {"fit": "full", "score_scale": k}})
        z0, _, _, z1 = one_step(opt)
        moves[k] = z1 - z0
    torch.testing.assert_close(moves[3.0], 3 * moves[1.0], rtol=1e-5, atol=1e-6)


def test_amplification_changes_a_full_fit_run(cli, recipe_file, tmp_path):
    finals = []
    for k in ("1", "4"):
        out = tmp_path / k
        path = recipe_file({"steps": 4, "optimizer": {"fit": "full", "score_scale": float(k)}}, name=f"k{k}.yaml")
        assert cli("run", path, "--out", out, "--no-live").exit_code == 0
        finals.append((out / "final.png").read_bytes())
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["fit_fraction"] == 1.0 for r in records)
    assert finals[0] != finals[1]


def test_under_adam_a_constant_scale_cancels_and_validation_says_so(recipe_file, prior):
    """Why amplification needs fit: full -- Adam normalises a constant gradient scale away."""
    moves = {}
    for k in (1.0, 1000.0):
        opt = started(recipe_file, prior, {"optimizer": {"score_scale": k}})
        z0, _, _, z1 = one_step(opt)
        moves[k] = z1 - z0
    torch.testing.assert_close(moves[1000.0], moves[1.0], rtol=1e-4, atol=1e-6)
    loaded = load_recipe(recipe_file({"optimizer": {"score_scale": 4.0}}))
    assert any("score_scale" in w and "fit: full" in w for w in loaded.warnings)
    assert not load_recipe(recipe_file({"optimizer": {"fit": "full", "score_scale": 4.0}})).warnings


def test_inner_steps_belong_to_the_adam_fit(recipe_file):
    with pytest.raises(RecipeError, match="inner_steps is for fit: adam"):
        load_recipe(recipe_file({"optimizer": {"fit": "full", "inner_steps": 5}}))


def test_hifa_image_target_is_the_decoded_denoised_estimate(recipe_file, prior):
    """image_target: hifa fits x to D(ẑ₀), ẑ₀ = (z_t − √(1−ᾱ_t)·ε̂_CFG)/√ᾱ_t, by hand from the
    step's own UNet call and noise."""
    opt = started(recipe_file, prior, {"parameterization": {"name": "rgb-pixels"},
                                       "guidance": {"name": "sds", "guidance_scale": 20},
                                       "optimizer": {"fit_space": "image", "image_target": "hifa"}})
    seen = {}
    original_score, original_target = opt.guidance.score, opt.target

    def score(z, times):  # the generator as the guidance finds it: replay its noise draw
        seen["generator"] = opt.generator.get_state()
        return original_score(z, times)

    def target(z, step, out):
        seen["z"] = z.detach().clone()
        seen["found"] = original_target(z, step, out)
        return seen["found"]

    opt.guidance.score, opt.target = score, target
    t = opt.step(0).fetched()["t"]
    replay = torch.Generator()
    replay.set_state(seen["generator"])
    eps = torch.randn(seen["z"].shape, generator=replay)
    z_t = prior.add_noise(seen["z"], eps, t)
    with torch.no_grad():
        rows = torch.cat([prior.encode_prompts([""]), prior.encode_prompts([opt.recipe.prompt])])
        uncond, cond = prior.predict_noise(torch.cat([z_t, z_t]), t, rows).chunk(2)
        a = prior.alphas_cumprod[t]
        x0 = (z_t - (1 - a).sqrt() * (uncond + 20 * (cond - uncond))) / a.sqrt()
        expected = prior.decode_latents(x0)
    assert seen["found"].latent is None
    torch.testing.assert_close(seen["found"].image, expected, rtol=1e-4, atol=1e-5)


def test_eps_to_x0_inverts_the_noising(prior):
    z0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(2))
    for t in (10, 500, 990):
        z_t = prior.add_noise(z0, eps, t)
        torch.testing.assert_close(eps_to_x0(eps, z_t, prior.alphas_cumprod[t]), z0, rtol=1e-4, atol=1e-4)


def test_hifa_target_needs_a_guidance_that_gives_a_denoised_estimate(recipe_file, monkeypatch):
    from sdsctl_plugins.sds import SDS

    monkeypatch.setattr(SDS, "gives_denoised", False)
    with pytest.raises(RecipeError, match="denoised estimate"):
        load_recipe(recipe_file({"parameterization": "rgb-pixels", "optimizer": {"fit_space": "both"}}))
    load_recipe(recipe_file({"parameterization": "rgb-pixels",
                             "optimizer": {"fit_space": "both", "image_target": "decoded-target"}}))


@pytest.mark.parametrize("name, formula", [
    ("one-minus-alpha-bar", lambda a: 1 - a),
    ("uniform", lambda a: 1.0),
    ("fantasia3d", lambda a: a ** 0.5 * (1 - a)),
])
def test_each_weighting_is_its_formula(recipe_file, prior, name, formula):
    opt = started(recipe_file, prior, {"weighting": name})
    alpha_bar = prior.alphas_cumprod.double()
    values = [opt.weighting(t) for t in (0, 20, 250, 500, 980, 999)]
    expected = [float(formula(float(alpha_bar[t]))) for t in (0, 20, 250, 500, 980, 999)]
    assert values == pytest.approx(expected, rel=1e-9)
    assert len(set(values)) == (1 if name == "uniform" else 6)
