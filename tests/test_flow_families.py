"""Flow-matching families: SD3, FLUX.1-dev, FLUX.1-schnell, and the one conversion to ε and ᾱ.

The conversion (``sdsctl.diffusion``) is checked as algebra, its σ table against the
scheduler's own shifting, and the priors against direct calls of the same diffusers
transformers on tiny random-weight pipelines (``tests/tiny_pipelines.py``). The bundled SDS
and robust NFSD recipes run end to end on each.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdsctl import diffusion
from sdsctl.models import Prior

CPU = torch.device("cpu")
FLOW = ["sd3", "flux-dev", "flux-schnell"]
FAMILY = {"sd3": "sd3", "flux-dev": "flux", "flux-schnell": "flux"}


@pytest.fixture(scope="session")
def tiny_flow(tmp_path_factory):
    """Tiny SD3, FLUX.1-dev and FLUX.1-schnell pipeline folders."""
    import os

    import tiny_pipelines

    os.environ["HF_HUB_OFFLINE"] = "1"
    return tiny_pipelines.build_all(tmp_path_factory.mktemp("flow"), tiny_pipelines.FLOW_BUILDERS)


@pytest.fixture(scope="module")
def priors(tiny_flow):
    out = {}
    for name in FLOW:
        prior = Prior.load(str(tiny_flow[name]), CPU, torch.float32)
        prior.set_image_size(64, 64)
        out[name] = prior
    return out


def _z(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the conversion

def test_the_conversion_is_exact_for_the_true_velocity():
    x0, eps = _z((4, 4, 8, 8), 1), _z((4, 4, 8, 8), 2)
    sigma = torch.tensor([0.05, 0.3, 0.7, 0.97])
    x = diffusion.flow_noise(x0, eps, sigma)
    v = eps - x0
    assert torch.allclose(diffusion.velocity_to_eps(v, x, sigma), eps, atol=1e-5)
    assert torch.allclose(diffusion.velocity_to_x0(v, x, sigma), x0, atol=1e-5)
    # x_σ / s(σ) is the VP sample at ᾱ(σ), with the same ε
    a = diffusion.flow_alpha_bar(sigma).reshape(-1, 1, 1, 1)
    z_t = diffusion.flow_to_vp(x, sigma)
    assert torch.allclose(z_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    assert torch.allclose(diffusion.vp_to_flow(z_t, sigma), x, atol=1e-5)
    assert torch.allclose(diffusion.sigma_from_alpha_bar(diffusion.flow_alpha_bar(sigma)), sigma, atol=1e-6)
    # for any v̂, the VP x̂₀ of ε̂ is the flow x̂₀, and SDS's ε residual is the velocity residual × (1 − σ)
    v_hat = _z((4, 4, 8, 8), 3)
    e_hat = diffusion.velocity_to_eps(v_hat, x, sigma)
    assert torch.allclose(diffusion.eps_to_x0(e_hat, z_t, a.flatten()), diffusion.velocity_to_x0(v_hat, x, sigma),
                          atol=1e-4)
    assert torch.allclose(e_hat - eps, (1 - sigma.reshape(-1, 1, 1, 1)) * (v_hat - (eps - x0)), atol=1e-5)


def test_sigma_table_is_the_schedulers_shifted_training_table(priors):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    n = 1000
    sd3 = priors["sd3"]  # static shift 3: the scheduler's own training table, least noisy first
    assert torch.allclose(sd3.sigmas, sd3.scheduler.sigmas.flip(0))
    u = torch.arange(1, n + 1) / n
    assert torch.allclose(sd3.sigmas, 3 * u / (1 + 2 * u), atol=1e-6)
    assert sd3.sigmas[-1] == 1 and sd3.alphas_cumprod[-1] == 0 and sd3.alphas_cumprod[0] > 0.99
    # FLUX.1-dev: μ from the packed sequence length, σ as the scheduler shifts a schedule with it
    dev = priors["flux-dev"]
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)  # 64 px: 8 x 8 latents, 4 x 4 patches
    assert dev.mu == pytest.approx(mu)
    ref = type(dev.scheduler).from_config(dev.scheduler.config)
    ref.set_timesteps(sigmas=u.flip(0).numpy(), mu=mu)
    assert torch.allclose(dev.sigmas, ref.sigmas[:-1].flip(0), atol=1e-6)
    at_64 = dev.sigmas
    dev.set_image_size(128, 128)  # a larger image shifts towards noise
    try:
        assert dev.mu == pytest.approx(calculate_shift(64, 256, 4096, 0.5, 1.15))
        assert (dev.sigmas[:-1] > at_64[:-1]).all()
        with pytest.raises(Exception, match="shifted for 16x16 latents"):
            dev.add_noise(_z((1, 4, 8, 8)), _z((1, 4, 8, 8)), 500)
    finally:
        dev.set_image_size(64, 64)
    schnell = priors["flux-schnell"]  # no shift at all
    assert schnell.mu is None and torch.allclose(schnell.sigmas, u)


# ----------------------------------------------------------------------------- against diffusers

def _flow_input(prior, t, seed=0):
    x0, eps = _z((1, 4, 8, 8), seed), _z((1, 4, 8, 8), seed + 1)
    z_t = prior.add_noise(x0, eps, t)
    return x0, eps, z_t


def test_sd3_eps_is_the_transformer_velocity_converted(tiny_flow, priors):
    from diffusers import StableDiffusion3Pipeline

    prior, t = priors["sd3"], 600
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_flow["sd3"]), local_files_only=True)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a red circle", None, None, device=CPU)
    x0, eps, z_t = _flow_input(prior, t)
    sigma = pipe.scheduler.sigmas[999 - t]  # the scheduler's training table, noisiest first
    x = (1 - sigma) * x0 + sigma * eps
    assert torch.allclose(z_t * ((1 - sigma) ** 2 + sigma**2).sqrt(), x, atol=1e-5)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=pipe.scheduler.timesteps[999 - t].expand(2),
                             encoder_hidden_states=torch.cat([uncond, cond]),
                             pooled_projections=torch.cat([uncond_pooled, pooled]), return_dict=False)[0]
    emb = torch.cat([prior.encode_prompts([""]), prior.encode_prompts(["a red circle"])])
    assert torch.allclose(prior.predict_noise(torch.cat([z_t, z_t]), t, emb), x + (1 - sigma) * v, atol=1e-5)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_flux_eps_is_the_packed_transformer_velocity_converted(name, tiny_flow, priors):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    prior, t, dev = priors[name], 400, name == "flux-dev"
    pipe = FluxPipeline.from_pretrained(str(tiny_flow[name]), local_files_only=True)
    hidden, pooled, text_ids = pipe.encode_prompt("a red circle", None, device=CPU,
                                                  max_sequence_length=512 if dev else 256)
    pipe.scheduler.set_timesteps(sigmas=np.array([(t + 1) / 1000]), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    sigma, timestep = pipe.scheduler.sigmas[0], pipe.scheduler.timesteps[:1]
    x0, eps, z_t = _flow_input(prior, t)
    x = (1 - sigma) * x0 + sigma * eps
    assert torch.allclose(z_t * ((1 - sigma) ** 2 + sigma**2).sqrt(), x, atol=1e-5)
    emb = prior.encode_prompts(["a red circle"])
    for g in ([3.5, None] if dev else [None]):
        with torch.no_grad():
            packed = pipe.transformer(
                hidden_states=pipe._pack_latents(x, 1, 4, 8, 8), timestep=timestep / 1000,
                guidance=torch.tensor([1.0 if g is None else g]) if dev else None,
                pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                img_ids=pipe._prepare_latent_image_ids(1, 4, 4, CPU, torch.float32), return_dict=False)[0]
        v = pipe._unpack_latents(packed, 64, 64, 8)
        assert torch.allclose(prior.predict_noise(z_t, t, emb, guidance=g), x + (1 - sigma) * v, atol=1e-5)
    if dev:  # the guidance input is used
        assert not torch.allclose(prior.predict_noise(z_t, t, emb, guidance=3.5), prior.predict_noise(z_t, t, emb),
                                  atol=1e-4)
    else:
        with pytest.raises(ValueError, match="takes no guidance scale"):
            prior.predict_noise(z_t, t, emb, guidance=3.5)


def test_flux_packing_round_trips_in_2x2_patches(priors):
    prior = priors["flux-dev"]
    x = _z((2, 4, 8, 6))
    packed = prior.pack_latents(x)
    assert packed.shape == (2, 4 * 3, 16)
    assert torch.equal(packed[:, 0], x[:, :, 0:2, 0:2].reshape(2, 16))  # one patch: channel-major, 2 x 2
    assert torch.equal(prior.unpack_latents(packed, 8, 6), x)
    ids = prior.image_ids(8, 6, torch.float32)
    assert ids.shape == (12, 3) and ids[4].tolist() == [0.0, 1.0, 1.0]  # (unused, row, column) of patch 4


@pytest.mark.parametrize("name", ["sd3", "flux-schnell"])
def test_sds_eps_residual_is_the_velocity_residual_weighted_and_rfds_undoes_the_weight(name, priors):
    from sdsctl_plugins.weightings import RFDSWeighting

    prior, t = priors[name], 700
    x0, eps, z_t = _flow_input(prior, t, seed=5)
    emb = prior.encode_prompts(["a red circle"])
    sigma = prior.sigmas[t]
    x = (1 - sigma) * x0 + sigma * eps
    with torch.no_grad():  # v̂ from the prior's own transformer call at x_σ
        v_hat = prior._velocity(x, sigma.reshape(1), emb, None)
    e_hat = prior.predict_noise(z_t, t, emb)
    assert torch.allclose(e_hat - eps, (1 - sigma) * (v_hat - (eps - x0)), atol=1e-5)
    w = RFDSWeighting(RFDSWeighting.Config(), SimpleNamespace(prior=prior))
    assert torch.allclose(w(t) * (e_hat - eps), v_hat - (eps - x0), atol=1e-4)
    with pytest.raises(Exception, match="pure noise"):
        w(999)


# ----------------------------------------------------------------------------- end to end

def _run(cli, tmp_path, recipe, model, *sets):
    out = tmp_path / "run"
    result = cli("run", recipe, "--set", f"model={model}", "--set", "device=cpu", "--no-live", "--out", out,
                 "--set", "parameterization.resolution=64", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads((out / "summary.json").read_text()), result.stderr


@pytest.mark.parametrize("name", FLOW)
def test_sds_and_robust_nfsd_run_on_each_flow_family(name, cli, tmp_path, tiny_flow):
    summary, stderr = _run(cli, tmp_path / "sds", "sds", tiny_flow[name], "steps=2")
    assert summary["status"] == "completed" and summary["steps_done"] == 2
    assert summary["model"]["family"] == FAMILY[name] and summary["model"]["prediction_type"] == "flow"
    if name == "flux-schnell":
        assert "guidance_scale 100 means nothing on FluxPipeline" in stderr
    elif name == "flux-dev":
        assert "guidance_scale 100 is fed to the guidance input" in stderr
    else:
        assert "guidance" not in stderr
    summary, stderr = _run(cli, tmp_path / "rnfsd", "robust_nfsd", tiny_flow[name], "steps=3",
                           "schedule.warmup_steps=1")
    assert summary["status"] == "completed" and summary["steps_done"] == 3
    assert summary["model"]["family"] == FAMILY[name] and summary["model"]["prediction_type"] == "flow"
    assert ("true classifier-free guidance" in stderr) == name.startswith("flux")


def test_sds_on_flux_dev_is_one_row_with_the_scale_as_input(cli, tmp_path, tiny_flow, monkeypatch):
    from sdsctl.models.flux import FluxPrior

    calls = []
    original = FluxPrior.predict_noise

    def spy(self, z_t, t, embeddings, guidance=None):
        calls.append((z_t.shape[0], guidance))
        return original(self, z_t, t, embeddings, guidance)

    monkeypatch.setattr(FluxPrior, "predict_noise", spy)
    _run(cli, tmp_path, "sds", tiny_flow["flux-dev"], "steps=2", "guidance.guidance_scale=4")
    assert calls == [(1, 4.0), (1, 4.0)]
    calls.clear()
    _run(cli, tmp_path / "nfsd", "nfsd", tiny_flow["flux-dev"], "steps=1", "schedule.t_min=300")
    assert calls == [(3, None)]  # true CFG rows: unconditional, conditional, negative


def test_bench_on_flux_dev_replays_the_guidance_scale_in_its_floor(cli, tiny_flow, monkeypatch):
    """``sdsctl bench`` records each model call to replay it alone (the floor); FLUX.1-dev's calls
    carry the guidance scale as an input, which the recording once dropped (found at full size:
    ``benchmarks/fullsize.py``, issue 42)."""
    from sdsctl.models.flux import FluxPrior

    scales = []
    original = FluxPrior.predict_noise

    def spy(self, z_t, t, embeddings, guidance=None):
        scales.append(guidance)
        return original(self, z_t, t, embeddings, guidance)

    monkeypatch.setattr(FluxPrior, "predict_noise", spy)
    result = cli("bench", "sds", "--model", str(tiny_flow["flux-dev"]), "--set", "parameterization.resolution=64",
                 "--set", "guidance.guidance_scale=4", "--steps", "2", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["unet_calls_per_step"] == 1 and report["floor_ratio"] > 0
    assert len(scales) > 4 and set(scales) == {4.0}  # the steps' calls and the floor's replays alike


def test_rfds_weighting_is_one_recipe_line_and_vsd_adapts_the_transformer(cli, tmp_path, tiny_flow, priors):
    """RFDS: every step's recorded weight is 1/(1 − σ_t) of its t (the residual it multiplies:
    ``test_sds_eps_residual_is_the_velocity_residual_weighted_and_rfds_undoes_the_weight``). VSD:
    the LoRA sits on the SD3 transformer's attention, starts at zero and moves with its updates."""
    out = tmp_path / "rfds" / "run"
    _run(cli, tmp_path / "rfds", "sds", tiny_flow["sd3"], "steps=3", "weighting.name=rfds",
         "guidance.guidance_scale=7")
    sigma = diffusion.sigma_from_alpha_bar(priors["sd3"].alphas_cumprod.double())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and len({r["t"] for r in records}) > 1
    for r in records:
        assert r["weight"] == pytest.approx(1 / (1 - float(sigma[r["t"]])), rel=1e-6)
        assert r["weight"] > 1

    from sdsctl.engine.loop import Optimization
    from sdsctl.engine.recipe import load_recipe
    from sdsctl_plugins.vsd import ADAPTER

    loaded = load_recipe("vsd", [f"model={tiny_flow['sd3']}", "device=cpu", "parameterization.resolution=64",
                                 "steps=2"])
    prior = priors["sd3"]
    opt = Optimization(loaded, prior, CPU, torch.float32)
    try:
        opt.initialize()
        transformer = prior.denoiser
        assert ADAPTER in transformer.peft_config
        lora = opt.guidance.lora
        assert lora and all(".attn." in n for n in lora)  # the transformer's attention projections
        assert all(float(p.detach().abs().max()) == 0 for n, p in lora.items() if "lora_B" in n)
        record = opt.step(0)
        norms = dict(zip(record.names, record.values.tolist()))
        assert norms["lora"] > 0 and norms["lora_loss"] > 0
        assert any(float(p.detach().abs().max()) > 0 for n, p in lora.items() if "lora_B" in n)  # the update moved B
    finally:
        opt.close()
    assert ADAPTER not in getattr(prior.denoiser, "peft_config", {})  # closed: the shared prior is clean


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
@pytest.mark.parametrize("term", ["ism", "csd", "sds_bridge", "sdi", "asd"])
def test_the_terms_after_the_study_run_on_flow_families(term, name, cli, tmp_path, tiny_flow):
    """Their bundled recipes a few steps on SD3 and FLUX.1-dev; on FLUX their ∅ and negative rows
    are true-CFG rows, which validation says."""
    sets = {"ism": ["guidance.inversion_steps=1"], "sdi": ["guidance.inversion_steps=2"],
            "sds_bridge": ["schedule.warmup_steps=1"]}.get(term, [])
    summary, stderr = _run(cli, tmp_path, term, tiny_flow[name], "steps=2", *sets)
    assert summary["status"] == "completed" and summary["steps_done"] == 2
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and all(np.isfinite(v) for v in r["norms"].values()) for r in records)
    assert ("true classifier-free guidance" in stderr) == name.startswith("flux")
    if name.startswith("flux"):
        assert f"{term.replace('_', '-')} on FluxPipeline" in stderr


@pytest.mark.parametrize("name", FLOW)
def test_model_command_reports_flow(name, cli, tiny_flow, monkeypatch):
    monkeypatch.setattr(Prior, "load", classmethod(lambda *a, **k: pytest.fail("sdsctl model loaded weights")))
    result = cli("model", tiny_flow[name], "--json")
    assert result.exit_code == 0, result.output + result.stderr
    info = json.loads(result.stdout)
    assert info["prediction_type"] == "flow" and info["family"] == FAMILY[name]
    assert info["guidance_distilled"] == name.startswith("flux") and info["guidance_embedded"] == (name == "flux-dev")
    assert info["default_resolution"] == (64 if name == "sd3" else 1024)  # SD3: sample_size x 8; FLUX: the pipeline's
    assert "transformer" in info["parameters"] and info["downscale_factor"] == 8
    tokens = {e["name"]: e["max_tokens"] for e in info["text_encoders"]}
    assert tokens == ({"text_encoder": 32, "text_encoder_2": 32, "text_encoder_3": 256} if name == "sd3" else
                      {"text_encoder": 32, "text_encoder_2": 512 if name == "flux-dev" else 256})
    if name == "flux-dev":
        assert "guidance embedding" in cli("model", tiny_flow[name]).stdout


def test_sd3_without_t5(cli, tmp_path, tiny_flow):
    info = json.loads(cli("model", tiny_flow["sd3"], "--json", "--without", "text_encoder_3").stdout)
    assert [e["name"] for e in info["text_encoders"]] == ["text_encoder", "text_encoder_2"]
    prior = Prior.load(str(tiny_flow["sd3"]), CPU, torch.float32, without=("text_encoder_3",))
    assert prior.pipe.text_encoder_3 is None and len(prior.text_encoders) == 2
    hidden, _ = prior.unpack(prior.encode_prompts(["a red circle"]))
    assert not hidden[:, 32:].any() and hidden[:, :32].any()  # 32 CLIP tokens, then T5's 256 as zeros
    out = tmp_path / "run"
    result = cli("run", "sds", "--set", f"model.path={tiny_flow['sd3']}", "--set", "model.without=[text_encoder_3]",
                 "--set", "steps=1", "--set", "device=cpu", "--no-live", "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    result = cli("validate", "sds", "--set", f"model.path={tiny_flow['flux-dev']}", "--set",
                 "model.without=[text_encoder_2]")
    assert result.exit_code == 2
    assert "cannot do without text_encoder_2" in result.stderr and "model.without" in result.stderr
