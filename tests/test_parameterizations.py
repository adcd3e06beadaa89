"""Parameterizations: output shapes and spaces, initialization (Gaussian, pre-fits, zeros),
determinism, and the loop's inner fitting steps."""

from __future__ import annotations

import pytest
import torch

from sdsctl import plugins
from sdsctl.components import RunContext
from sdsctl.engine.loop import Optimization
from sdsctl.engine.recipe import load_recipe
from sdsctl.hashgrid import fit_to
from sdsctl.models import Prior

# name -> (space, channels, pixels per side at the tiny prior's native size)
EXPECTED = {
    "latent-pixels": ("latent", 4, 8),
    "rgb-pixels": ("rgb", 3, 64),
    "latent-hashgrid": ("latent", 4, 8),
    "rgb-hashgrid": ("rgb", 3, 64),
}
HASHGRIDS = ("latent-hashgrid", "rgb-hashgrid")


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)


def make_ctx(prior, seed: int = 0) -> RunContext:
    return RunContext(prior=prior, recipe=None, device=torch.device("cpu"), dtype=torch.float32,
                      generator=torch.Generator().manual_seed(seed), steps=10)


def build(name: str, prior, seed: int = 0, **options):
    cls = plugins.components("parameterizations")[name].obj
    return cls(cls.Config(name=name, **options), make_ctx(prior, seed))


def render(param) -> torch.Tensor:
    with torch.no_grad():
        return param().detach().clone()


def _fast(name: str) -> dict:
    return {"init_steps": 20} if name in HASHGRIDS else {}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_output_shape_and_space(prior, name):
    space, channels, size = EXPECTED[name]
    param = build(name, prior, **_fast(name))
    param.initialize()
    x = param()
    assert param.space == space
    assert x.shape == (1, channels, size, size) and x.dtype == torch.float32
    assert x.requires_grad  # θ receives the loop's gradient
    if space == "rgb":
        assert 0 <= float(x.detach().min()) and float(x.detach().max()) <= 1
    image = param.image()
    assert image.shape == (3, 64, 64) and 0 <= float(image.min()) and float(image.max()) <= 1


@pytest.mark.parametrize("name", list(EXPECTED))
def test_resolution_option(prior, name):
    space, channels, _ = EXPECTED[name]
    param = build(name, prior, resolution=128, **_fast(name))
    param.initialize()
    size = 16 if space == "latent" else 128
    assert render(param).shape == (1, channels, size, size)
    assert param.image().shape == (3, 128, 128)


def test_latent_pixels_gaussian_init_is_the_generators_normal_sample(prior):
    param = build("latent-pixels", prior, seed=5)
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    param.initialize()
    assert torch.equal(render(param), expected)


def test_rgb_pixels_start_from_the_decoded_gaussian_latent(prior):
    param = build("rgb-pixels", prior, seed=5)
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    param.initialize()
    with torch.no_grad():
        expected = prior.decode_latents(latent).clamp(1e-3, 1 - 1e-3)  # logits: kept inside (0, 1)
    torch.testing.assert_close(render(param), expected, rtol=0, atol=1e-6)


def _target_and_fit(param):
    """The parameterization's own initial target (drawn from a copy of its generator), then its pre-fit."""
    g = param.ctx.generator
    state = g.get_state()
    target = param.initial_target()
    g.set_state(state)
    before = render(param)
    param.initialize()
    return target, before, render(param)


def test_latent_hashgrid_prefits_the_gaussian_latent(prior):
    param = build("latent-hashgrid", prior, seed=2)
    g = torch.Generator()
    g.set_state(param.ctx.generator.get_state())
    gaussian = torch.randn((1, 4, 8, 8), generator=g)  # the generator's next N(0, I) latent
    target, before, after = _target_and_fit(param)
    assert torch.equal(target, gaussian)
    assert float((before - target).pow(2).mean()) > 0.5  # the random field starts far from it
    assert float((after - target).pow(2).mean()) < 1e-4


def test_rgb_hashgrid_prefits_the_decoded_gaussian_latent(prior):
    param = build("rgb-hashgrid", prior, seed=2)
    target, before, after = _target_and_fit(param)
    assert target.shape == (1, 3, 64, 64) and 0 <= float(target.min()) and float(target.max()) <= 1
    error = float((after - target).pow(2).mean())
    assert float((before - target).pow(2).mean()) > 10 * error
    assert error < 0.01 * float(target.var())


def test_rgb_hashgrid_target_is_decoded_not_rgb_noise(prior):
    param = build("rgb-hashgrid", prior, seed=4)
    g = param.ctx.generator
    state = g.get_state()
    latent = torch.randn((1, 4, 8, 8), generator=g)
    g.set_state(state)
    with torch.no_grad():
        expected = prior.decode_latents(latent)
    torch.testing.assert_close(param.initial_target(), expected, rtol=0, atol=1e-6)


def test_zeros_init_is_exactly_zero(prior):
    param = build("latent-pixels", prior, init="zeros")
    param.initialize()
    assert not render(param).any()


def test_rgb_pixels_zeros_init_is_black(prior):
    param = build("rgb-pixels", prior, init="zeros")
    param.initialize()
    assert float(render(param).max()) <= 1e-3  # sigmoid's logits: as black as a finite θ gets


@pytest.mark.parametrize("name, options", [
    ("rgb-pixels", {}),
    ("rgb-hashgrid", {"init_steps": 0, "output_activation": "sigmoid"}),
    ("rgb-hashgrid", {"init_steps": 0, "output_activation": "tanh"}),
])
def test_a_pixel_driven_out_of_range_comes_back(prior, name, options):
    """RGB renders through a smooth map onto [0, 1]: a pixel pushed past 1 keeps a gradient and
    returns when pulled back (a clamp would strand it at 1 with no gradient)."""
    param = build(name, prior, **options)
    param.initialize()
    lr = 0.05 if name == "rgb-pixels" else 0.005

    def pull(value: float, steps: int) -> float:
        opt = torch.optim.Adam(param.parameters(), lr=lr)
        for _ in range(steps):
            x = param()
            loss = (x[0, :, 5, 7] - value).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(render(param)[0, :, 5, 7].mean())

    high = pull(1.5, 100)
    x = render(param)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert high > 0.9
    assert pull(0.2, 100) < high - 0.2


@pytest.mark.parametrize("name, tolerance", [("latent-hashgrid", 1e-4), ("rgb-hashgrid", 1e-2)])
def test_hashgrid_zeros_init_fits_zero(prior, name, tolerance):
    param = build(name, prior, init="zeros")
    before = render(param)
    param.initialize()
    after = render(param)
    assert float(after.abs().max()) < tolerance < float(before.abs().max())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_same_seed_same_start_other_seed_other_start(prior, name):
    a, b, c = (build(name, prior, seed=s, **_fast(name)) for s in (11, 11, 12))
    for p in (a, b, c):
        p.initialize()
    assert torch.equal(render(a), render(b))
    assert not torch.equal(render(a), render(c))


def test_fit_to_reduces_the_error_and_returns_it(prior):
    param = build("latent-hashgrid", prior, init_steps=0)
    target = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    start = float((render(param) - target).pow(2).mean())
    err = fit_to(param.field, target, steps=30, lr=1e-2)
    assert err == pytest.approx(float((render(param) - target).pow(2).mean()), rel=1e-6)
    assert err < 0.5 * start
    assert fit_to(param.field, target, steps=30, lr=1e-2) < err


# ----------------------------------------------------------------------------- inner steps


def _fit_error_after_one_step(recipe_file, prior, parameterization: dict, inner_steps: int):
    loaded = load_recipe(recipe_file({"steps": 1, "parameterization": parameterization,
                                      "optimizer": {"inner_steps": inner_steps}}))
    opt = Optimization(loaded, prior, torch.device("cpu"), torch.float32)
    opt.initialize()
    with torch.no_grad():
        z0 = opt.render().detach().clone()
    targets = []
    original = opt.adam_step

    def fit(z, target, *terms):
        targets.append(target.latent)
        return original(z, target, *terms)

    opt.adam_step = fit
    opt.step(0)
    with torch.no_grad():
        z = opt.render().detach()
    return targets, float((z0 - targets[0]).norm()), float((z - targets[0]).norm())


@pytest.mark.parametrize("parameterization", [
    {"name": "latent-pixels"},
    {"name": "latent-hashgrid", "init_steps": 20},
    {"name": "rgb-pixels"},
    {"name": "rgb-hashgrid", "init_steps": 20},
])
def test_inner_steps_reduce_the_fit_error_more(recipe_file, prior, parameterization):
    errors = {}
    targets_of = {}
    for k in (1, 2, 4):
        targets, start, errors[k] = _fit_error_after_one_step(recipe_file, prior, parameterization, k)
        assert len(targets) == k and all(t is targets[0] for t in targets)  # the same target every fit
        targets_of[k] = targets[0]
    assert torch.equal(targets_of[1], targets_of[4])  # same seed: the same first target
    assert errors[4] < errors[2] < errors[1] < start
