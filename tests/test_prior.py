"""The prior's conventions: scheduler noise, v -> ε in one place, VAE scaling, CFG."""

from __future__ import annotations

import pytest
import torch

from sdsctl.diffusion import cfg, v_to_eps, x0_to_eps
from sdsctl.models import Prior, describe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return Prior.load(str(tiny_prior), CPU, torch.float32)


def test_cfg_is_the_diffusers_form():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert cfg(u, c, 7.5).item() == 1 + 7.5 * 2
    assert cfg(u, c, 1.0).item() == 3.0 and cfg(u, c, 0.0).item() == 1.0


def test_v_and_x0_conversions_recover_eps(prior):
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    z_t = prior.add_noise(z0, eps, t)
    v = prior.scheduler.get_velocity(z0, eps, t)
    alpha_bar = prior.alphas_cumprod[t]
    assert torch.allclose(v_to_eps(v, z_t, alpha_bar), eps, atol=1e-4)
    assert torch.allclose(x0_to_eps(z0, z_t, alpha_bar), eps, atol=1e-3)


def test_add_noise_is_the_scheduler_formula(prior):
    z0, eps = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    a = prior.alphas_cumprod[700]
    assert torch.allclose(prior.add_noise(z0, eps, 700), a.sqrt() * z0)
    assert prior.alphas_cumprod.dtype == torch.float32 and prior.alphas_cumprod.shape == (1000,)


def test_v_prediction_model_returns_eps(tiny_v_prior, tiny_prior):
    v_model = Prior.load(str(tiny_v_prior), CPU, torch.float32)
    eps_model = Prior.load(str(tiny_prior), CPU, torch.float32)
    assert v_model.prediction_type == "v_prediction"
    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    emb = eps_model.encode_prompts(["", "a red circle"])
    t = torch.tensor([100, 800])
    raw = eps_model.predict_noise(z_t, t, emb)  # same weights: the raw UNet output, read as v
    assert torch.allclose(v_model.predict_noise(z_t, t, emb), v_to_eps(raw, z_t, eps_model.alphas_cumprod[t]),
                          atol=1e-5)


def test_predict_noise_batches_rows_with_their_own_timesteps(prior):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    emb = prior.encode_prompts(["a", "a"])
    both = prior.predict_noise(z, torch.tensor([100, 900]), emb)
    one = prior.predict_noise(z[1:], 900, emb[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_encode_is_differentiable_and_scaled(prior):
    rgb = torch.rand(1, 3, 64, 64, requires_grad=True)
    z = prior.encode_images(rgb)
    assert z.shape == (1, 4, 8, 8)
    z.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    raw = prior.vae.encode(rgb.detach() * 2 - 1).latent_dist.mean
    assert torch.allclose(prior.encode_images(rgb.detach()), raw * prior.vae.config.scaling_factor)
    image = prior.decode_latents(z.detach())
    assert image.shape == (1, 3, 64, 64) and 0 <= image.min() and image.max() <= 1


def test_frozen_and_embeddings_shape(prior):
    assert not any(p.requires_grad for p in prior.unet.parameters())
    assert prior.encode_prompts(["a red circle"]).shape == (1, 32, 32)
    assert (prior.image_size, prior.vae_scale_factor, prior.latent_size) == (64, 8, 8)


def test_describe_reads_configs_without_weights(tiny_prior):
    info = describe(str(tiny_prior))
    assert (info.num_train_timesteps, info.vae_scale_factor, info.latent_size, info.image_size) == (1000, 8, 8, 64)
    assert info.latent_multiple == 2 and info.prediction_type == "epsilon"
    assert info.unknown_words("a red circle on a blue background") == []
    assert info.unknown_words("a red dragon") == ["dragon"]
