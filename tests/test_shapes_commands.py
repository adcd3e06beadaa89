"""Commands of the shapes prior (``train-shapes``, ``sample``) and the ``shapes-judge`` metric."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sdsctl.cli import create_app
from sdsctl.shapes import world
from sdsctl.shapes.train import Trainer, TrainConfig

PROMPT = "a red circle on a blue background"
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


def invoke(*args):
    return CliRunner().invoke(create_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One ``train-shapes --smoke`` run from scratch: its work folder and the CLI result."""
    work = tmp_path_factory.mktemp("shapes") / "work"
    result = invoke("train-shapes", "--smoke", "--out", work, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return SimpleNamespace(work=work, prior=work / "prior", result=result)


# ----------------------------------------------------------------------------- train-shapes


def test_train_shapes_smoke_writes_a_pipeline_folder(trained):
    folder = trained.prior
    assert f"prior written to {folder}" in trained.result.stdout
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    for name in ("vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / name).stat().st_size > 0
    for path in WEIGHTS:
        assert (folder / path).is_file(), path
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    state = torch.load(trained.work / "checkpoint.pt", map_location="cpu", weights_only=False)
    smoke = TrainConfig.smoke()
    assert (state["stage"], state["step"]) == ("done", smoke.prior_steps)
    # the VAE's scaling factor comes from the encoded world, not the 1.0 it is built with
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(state["scaling_factor"]) and vae["scaling_factor"] != 1.0


def test_text_encoder_weights_use_the_classic_text_model_keys(trained):
    from safetensors import safe_open

    with safe_open(str(trained.prior / "text_encoder" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys
    assert [k for k in keys if not k.startswith("text_model.")] == []


def test_trained_folder_loads_with_diffusers_offline(trained, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(str(trained.prior), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == world.IMAGE_SIZE
    vocab = pipe.tokenizer.get_vocab()
    assert all(w + "</w>" in vocab for w in world.vocabulary() if w.isalpha())
    with torch.no_grad():
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids)[0]
    assert emb.shape == (1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    # the loaded text encoder holds the trained weights (not a fresh random init): the EMA of them
    state = torch.load(trained.work / "checkpoint.pt", map_location="cpu", weights_only=False)
    text_params = list(pipe.text_encoder.parameters())
    shadow = state["ema"]["shadow_params"][-len(text_params):]
    assert all(torch.equal(p, q) for p, q in zip(text_params, shadow))
    raw = dict(pipe.text_encoder.named_parameters())
    assert any(not torch.equal(raw[k], v) for k, v in state["text"].items() if k in raw), "EMA weights, not the last step's"


def test_second_run_resumes_without_retraining(trained, monkeypatch):
    checkpoint = (trained.work / "checkpoint.pt").read_bytes()

    def must_not_run(self, state):
        raise AssertionError("a completed training must not train again")

    for stage in ("train_vae", "tune_decoder", "train_adversarial", "make_latents", "train_prior"):
        monkeypatch.setattr(Trainer, stage, must_not_run)
    weights = {p: (trained.prior / p).read_bytes() for p in WEIGHTS}
    result = invoke("train-shapes", "--smoke", "--out", trained.work, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (trained.work / "checkpoint.pt").read_bytes() == checkpoint  # step unchanged, not rewritten
    assert {p: (trained.prior / p).read_bytes() for p in WEIGHTS} == weights


def test_interrupted_training_resumes_where_it_stopped(trained, tmp_path, monkeypatch):
    work = tmp_path / "work"

    class Stop(Exception):
        pass

    def stop_at_vae_step_3(stage, step, total, logs):
        if stage == "vae" and step == 3:
            raise Stop

    with pytest.raises(Stop):
        Trainer(work, TrainConfig.smoke(device="cpu"), stop_at_vae_step_3).run()
    state = torch.load(work / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (state["stage"], state["step"]) == ("vae", 2)  # smoke checkpoints every 2 steps

    starts = []
    original = Trainer.train_vae

    def recording(self, state):
        starts.append(state["step"])
        return original(self, state)

    monkeypatch.setattr(Trainer, "train_vae", recording)
    result = invoke("train-shapes", "--smoke", "--out", work, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert starts == [2]
    # resuming on the CPU gives exactly the uninterrupted run's prior
    for path in WEIGHTS:
        assert (work / "prior" / path).read_bytes() == (trained.prior / path).read_bytes(), path


def test_train_shapes_vae_from_needs_a_folder_with_a_vae(tmp_path):
    (tmp_path / "not-a-prior").mkdir()
    for source in (tmp_path / "not-a-prior", tmp_path / "missing"):
        result = invoke("train-shapes", "--out", tmp_path / "w", "--vae-from", source)
        assert result.exit_code == 2 and "--vae-from" in result.stderr and "vae/config.json" in result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "w").exists()


def test_train_shapes_rejects_bad_step_counts(tmp_path):
    result = invoke("train-shapes", "--out", tmp_path / "w", "--vae-steps", "0")
    assert result.exit_code == 2 and "must be positive" in result.stderr
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- sample


def _sample(tiny_prior, out, *extra):
    return invoke("sample", "--prompt", PROMPT, "--out", out, "--model", tiny_prior, "--steps", "2",
                  "--device", "cpu", *extra)


def test_sample_writes_a_png_of_the_native_size(tiny_prior, tmp_path):
    from PIL import Image

    out = tmp_path / "sub" / "a.png"
    result = _sample(tiny_prior, out)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def test_sample_is_deterministic_for_a_seed(tiny_prior, tmp_path):
    paths = {name: tmp_path / f"{name}.png" for name in ("a", "b", "c")}
    assert _sample(tiny_prior, paths["a"], "--seed", "3").exit_code == 0
    assert _sample(tiny_prior, paths["b"], "--seed", "3").exit_code == 0
    assert _sample(tiny_prior, paths["c"], "--seed", "4").exit_code == 0
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert paths["a"].read_bytes() != paths["c"].read_bytes()


def test_sample_refuses_to_overwrite(tiny_prior, tmp_path):
    out = tmp_path / "a.png"
    out.write_bytes(b"keep me")
    result = _sample(tiny_prior, out)
    assert result.exit_code == 2
    assert "exists" in result.stderr and "--overwrite" in result.stderr and "Traceback" not in result.output
    assert out.read_bytes() == b"keep me"
    result = _sample(tiny_prior, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary file


def test_sample_needs_a_png_name(tiny_prior, tmp_path):
    result = _sample(tiny_prior, tmp_path / "a.jpg")
    assert result.exit_code == 2 and ".png" in result.stderr
    assert not (tmp_path / "a.jpg").exists()


def test_sample_warns_about_unknown_words(tiny_prior, tmp_path):
    result = invoke("sample", "--prompt", "a red zebra", "--out", tmp_path / "z.png", "--model", tiny_prior,
                    "--steps", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "zebra" in result.stderr and "warning" in result.stderr


def test_sample_from_an_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    out = tmp_path / "x.png"
    result = invoke("sample", "--prompt", PROMPT, "--out", out, "--model", "some/hubid", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "'some/hubid'" in result.stderr and "Hugging Face Hub" in result.stderr
    assert "--model DIR" in result.stderr  # says what to do instead
    assert "Traceback" not in result.output
    assert not out.exists()


def test_sample_from_a_missing_folder_is_a_clear_error(tmp_path):
    result = invoke("sample", "--prompt", PROMPT, "--out", tmp_path / "x.png", "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "not found" in result.stderr and "Traceback" not in result.output


# ----------------------------------------------------------------------------- shapes-judge metric


def test_shapes_judge_metric_in_a_runs_summary(cli, recipe_file, tmp_path):
    out = tmp_path / "run"
    result = cli("run", recipe_file({"steps": 2}), "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    metric = summary["metrics"]["shapes-judge"]
    assert "error" not in metric
    assert metric["background"] in world.COLORS
    assert {"color", "shape", "shape_iou", "palette_error", "sharpness", "noise", "saturation", "contrast",
            "brightness", "match", "match_color", "match_shape", "match_background"} <= set(metric)
    assert metric["match"] == (metric["match_color"] and metric["match_shape"] and metric["match_background"])
    assert 0 <= metric["brightness"] <= 1 and metric["palette_error"] >= 0


def test_shapes_judge_applies_only_to_shapes_priors(tiny_prior):
    from transformers import CLIPTokenizer

    from sdsctl_plugins.shapes_judge import ShapesJudge

    tok = CLIPTokenizer.from_pretrained(str(tiny_prior / "tokenizer"))
    assert ShapesJudge.applies_to(SimpleNamespace(tokenizer=tok, image_size=64))
    assert not ShapesJudge.applies_to(SimpleNamespace(tokenizer=tok, image_size=512))
    vocab = {k: v for k, v in tok.get_vocab().items() if k != "triangle</w>"}
    assert not ShapesJudge.applies_to(SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: vocab), image_size=64))


def test_shapes_judge_scores_a_render_exactly(tiny_prior):
    from sdsctl_plugins.shapes_judge import ShapesJudge

    images, scenes = world.sample_batch(11, 1, degradation=False)
    image = torch.from_numpy(images[0]).permute(2, 0, 1)
    metric = ShapesJudge(ShapesJudge.Config(name="shapes-judge"), ctx=None)
    result = metric(image, scenes[0].plain_caption)
    assert result["match"] is True
    assert (result["color"], result["shape"], result["background"]) == (scenes[0].color, scenes[0].shape, scenes[0].background)
    wrong = f"a {scenes[0].color} {'square' if scenes[0].shape != 'square' else 'circle'} on a {scenes[0].background} background"
    assert metric(image, wrong)["match_shape"] is False



# ----------------------------------------------------------------------------- VAE training losses


def _tiny_vae():
    from sdsctl.shapes.train import TrainConfig, build_vae

    torch.manual_seed(0)
    return build_vae(TrainConfig(vae_channels=(16, 16, 16, 16)))


def test_fine_perturbations_are_zero_mean_and_bounded():
    from sdsctl.shapes.train import _fine_perturbation

    x = torch.zeros(64, 3, 64, 64)
    d = _fine_perturbation(x, torch.Generator().manual_seed(0))
    assert d.shape == x.shape
    assert abs(float(d.mean())) < 2e-3
    per_image = d.flatten(1).std(dim=1)
    assert float(per_image.min()) > 0.01 and float(per_image.max()) < 0.25


def test_fine_perturbations_are_per_pixel_unless_blocks_are_asked_for():
    """The shipped regularizer penalizes per-pixel noise only; 2x2 blocks (the experiment's)
    reach down to frequencies that blur changes too."""
    from sdsctl.shapes.train import _fine_perturbation

    x = torch.zeros(64, 3, 64, 64)
    equal_neighbours = lambda d: float((d[..., ::2, ::2] == d[..., 1::2, ::2]).float().mean())
    assert equal_neighbours(_fine_perturbation(x, torch.Generator().manual_seed(0))) == 0.0
    assert equal_neighbours(_fine_perturbation(x, torch.Generator().manual_seed(0), blocks=True)) > 0.3


def test_highpass_perturbations_spare_the_frequencies_blur_changes():
    """``jacobian_highpass`` noise keeps the white noise's variance but moves its energy up:
    almost none below 0.1 cycles/px (where a 1.2-2.8 px blur changes an edge), most of it
    near the checkerboard."""
    from sdsctl.shapes.train import _fine_perturbation

    x = torch.zeros(64, 3, 64, 64)
    white = _fine_perturbation(x, torch.Generator().manual_seed(0))
    high = _fine_perturbation(x, torch.Generator().manual_seed(0), highpass=True)
    assert float(high.pow(2).mean()) == pytest.approx(float(white.pow(2).mean()), rel=0.05)

    def band_energy(d, lo, hi):
        power = torch.fft.fft2(d).abs().pow(2).mean((0, 1))
        f = torch.fft.fftfreq(64).abs()
        radius = torch.maximum(f[:, None], f[None, :])
        return float(power[(radius >= lo) & (radius < hi)].mean())

    assert band_energy(high, 0.0, 0.1) < 0.05 * band_energy(white, 0.0, 0.1)
    assert band_energy(high, 0.4, 0.51) > 1.5 * band_energy(white, 0.4, 0.51)


def test_vae_batches_carry_every_degradation_and_reconstruct_them_as_they_are(tmp_path, monkeypatch):
    from sdsctl.shapes import train

    asked = []
    sample_batch = world.sample_batch
    monkeypatch.setattr(train.world, "sample_batch", lambda seed, n, **kw: asked.append(kw.get("degradation")) or sample_batch(seed, n, **kw))
    cfg = TrainConfig.candidate(vae_steps=1, vae_batch=16, vae_channels=(16, 16, 16, 16), checkpoint_every=1)
    trainer = Trainer(tmp_path / "w", cfg)
    x, extra, _ = trainer._topped_up_batch(0, cfg.vae_degraded_extra)
    assert (x.shape[0], extra.shape[0]) == (16 - cfg.vae_degraded_extra, cfg.vae_degraded_extra)
    assert sorted(k for k in asked if k) == sorted(world.DEGRADATION_WORDS)

    seen = {}
    real_loss = train._vae_loss

    def spy(vae, x_in, target, g, *args):
        seen.update(x_in=x_in, target=target)
        return real_loss(vae, x_in, target, g, *args)

    monkeypatch.setattr(train, "_vae_loss", spy)
    trainer.train_vae(trainer._load())
    n = cfg.vae_degraded_extra
    assert torch.equal(seen["x_in"][-n:], extra) and torch.equal(seen["target"][-n:], extra)
    assert not torch.equal(seen["x_in"][:-n], x)  # the world images do get shifted and blended


@pytest.mark.parametrize("topup", [False, True])
def test_the_decoder_stage_gets_the_degraded_topup_only_when_asked(tmp_path, monkeypatch, topup):
    """With ``decoder_topup`` the decoder is tuned on the same forced-degraded images as the
    VAE, so its edge loss does not teach it to sharpen blurred latents; without, it sees
    world images only (the shipped first-release prior)."""
    from sdsctl.shapes import train

    asked = []
    sample_batch = world.sample_batch
    monkeypatch.setattr(train.world, "sample_batch", lambda seed, n, **kw: asked.append((n, kw.get("degradation"))) or sample_batch(seed, n, **kw))
    cfg = TrainConfig.candidate(vae_batch=16, vae_channels=(16, 16, 16, 16), decoder_steps=1, decoder_topup=topup)
    trainer = Trainer(tmp_path / "w", cfg)
    state = {"stage": "decoder", "step": 0, "vae": train.build_vae(cfg).state_dict()}
    assert trainer.tune_decoder(state)["stage"] == "adversarial"
    kinds = sorted(k for _, k in asked if k)
    if topup:
        assert kinds == sorted(world.DEGRADATION_WORDS)
        assert sum(n for n, _ in asked) == cfg.vae_batch
    else:
        assert kinds == [] and asked == [(cfg.vae_batch, None)]


def test_jacobian_penalty_is_added_and_ignores_the_latent_scale():
    """The penalty is the encoder's sensitivity *relative to its latents' spread*: scaling the
    latents (the encoder's last layer) must not change it, or training could shrink it for free."""
    from sdsctl.shapes import world
    from sdsctl.shapes.train import _to_tensor, _vae_loss

    vae = _tiny_vae()
    x = _to_tensor(world.sample_batch(0, 8)[0])
    with torch.no_grad():
        plain, _, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1))
        total, logs, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1), jacobian_weight=5.0)
        assert logs["jac"] > 0
        assert float(total) == pytest.approx(float(plain) + 5.0 * logs["jac"], rel=1e-5)
        vae.quant_conv.weight[:4] *= 10  # the mean channels only
        vae.quant_conv.bias[:4] *= 10
        _, scaled, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1), jacobian_weight=5.0)
    assert scaled["jac"] == pytest.approx(logs["jac"], rel=1e-3)


def test_the_jacobian_experiment_trains_its_vae(tmp_path):
    """The experiment's regularizer runs through the VAE stage and logs its penalty."""
    logs = []
    cfg = TrainConfig.jacobian_experiment(vae_steps=2, vae_batch=8, vae_channels=(16, 16, 16, 16), checkpoint_every=2)
    assert (cfg.vae_regularizer, cfg.decoder_steps) == ("jacobian", 600)
    trainer = Trainer(tmp_path / "w", cfg, lambda stage, step, total, l: logs.append(l))
    state = trainer.train_vae(trainer._load())
    assert state["stage"] == "decoder" and len(logs) == 2
    assert all(l["jac"] > 0 for l in logs)


def test_the_default_training_is_the_shipped_priors():
    """`sdsctl train-shapes` with no options reproduces the shipped prior's configuration."""
    from sdsctl.prior import SHAPES_PRIOR

    cfg = TrainConfig()
    vae = json.loads((SHAPES_PRIOR / "vae" / "config.json").read_text())
    unet = json.loads((SHAPES_PRIOR / "unet" / "config.json").read_text())
    assert tuple(vae["block_out_channels"]) == cfg.vae_channels and tuple(unet["block_out_channels"]) == cfg.unet_channels
    assert (cfg.vae_regularizer, cfg.jacobian_weight, cfg.jacobian_highpass, cfg.jacobian_blocks) == ("jacobian", 5.0, True, False)
    assert (cfg.vae_steps, cfg.decoder_steps, cfg.prior_steps) == (2000, 600, 10_000)
    assert (cfg.vae_degraded_extra, cfg.decoder_topup, cfg.caption_dropout, cfg.ema_decay) == (6, True, 0.3, 0.999)
    assert cfg.vae_edge_weight == 0.0 and cfg.vae_probe_weight == 0.0
    assert cfg.invert_kinds == ()
    assert (SHAPES_PRIOR / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 0


def test_the_earlier_priors_configurations_are_kept():
    """The configurations measured in docs/shapes-prior.md ("How the prior got here") stay reproducible."""
    first = TrainConfig.first_release()
    assert (first.vae_regularizer, first.vae_channels, first.decoder_steps, first.prior_steps) == ("denoise", (16, 32, 64, 64), 800, 8000)
    assert (first.vae_degraded_extra, first.decoder_topup, first.caption_dropout, first.ema_decay) == (0, False, 0.1, 0.0)
    cand = TrainConfig.candidate()
    assert (cand.jacobian_weight, cand.jacobian_highpass, cand.decoder_topup, cand.prior_steps, cand.caption_dropout) == (2.0, False, False, 8000, 0.15)
    exp = TrainConfig.jacobian_experiment()
    assert (exp.vae_steps, exp.jacobian_weight, exp.jacobian_blocks, exp.jacobian_highpass, exp.vae_degraded_extra) == (2500, 5.0, True, False, 0)
    assert (exp.caption_dropout, exp.ema_decay, exp.prior_steps) == (0.1, 0.0, 8000)


def test_edge_loss_grows_with_blur_and_vanishes_on_a_perfect_reconstruction():
    """The VAE's edge term must tell a blurred reconstruction from a sharp one, and more blur
    must cost more: that is what makes the latents carry blur."""
    import dataclasses

    from sdsctl.shapes.train import _edge_loss, _to_tensor

    rng = np.random.default_rng(4)
    scenes = [world.sample_scene(rng, degradation=False) for _ in range(8)]

    def batch(strength=None):
        return _to_tensor(np.stack([world.render(dataclasses.replace(s, degradation=strength and "blur", strength=strength or 0.0))
                                    for s in scenes]))

    sharp = batch()
    assert float(_edge_loss(sharp, sharp)) == 0.0
    mild, strong = float(_edge_loss(batch(0.01), sharp)), float(_edge_loss(batch(1.0), sharp))
    assert 0 < mild < strong


def test_vae_loss_adds_the_weighted_edge_term():
    from sdsctl.shapes.train import _edge_loss, _to_tensor, _vae_loss

    vae = _tiny_vae()
    x = _to_tensor(world.sample_batch(0, 8)[0])
    with torch.no_grad():
        plain, _, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1))
        total, _, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1), edge_weight=2.0)
        posterior = vae.encode(x).latent_dist  # the same draw as inside the loss
        g = torch.Generator().manual_seed(1)
        rec = vae.decode(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)).sample
        assert float(total) == pytest.approx(float(plain) + 2.0 * float(_edge_loss(rec, x)), rel=1e-5)


def test_the_vae_stage_uses_the_configured_edge_weight(tmp_path, monkeypatch):
    import inspect

    from sdsctl.shapes import train

    weights = []
    real_loss = train._vae_loss

    def spy(*args):
        weights.append(inspect.signature(real_loss).bind(*args).arguments["edge_weight"])
        return real_loss(*args)

    monkeypatch.setattr(train, "_vae_loss", spy)
    cfg = TrainConfig(vae_steps=1, vae_batch=16, vae_channels=(16, 16, 16, 16), checkpoint_every=1, vae_edge_weight=0.5)
    trainer = Trainer(tmp_path / "w", cfg)
    trainer.train_vae(trainer._load())
    assert weights == [0.5]


def test_vae_batches_label_each_image_with_its_degradation(tmp_path):
    """The probe's labels follow the images: world images by their scene, then the top-up kinds in turn."""
    from sdsctl.shapes import train

    cfg = TrainConfig(vae_batch=16, vae_channels=(16, 16, 16, 16))
    trainer = Trainer(tmp_path / "w", cfg)
    x, extra, labels = trainer._topped_up_batch(5, cfg.vae_degraded_extra)
    _, scenes = world.sample_batch(5, 16 - cfg.vae_degraded_extra)
    assert labels.tolist()[: x.shape[0]] == [train.probe_label(s.degradation) for s in scenes]
    assert labels.tolist()[x.shape[0]:] == [train.PROBE_CLASSES.index(k) for k in world.DEGRADATION_WORDS]
    assert train.probe_label(None) == 0


def test_vae_loss_adds_the_weighted_probe_term_and_skips_unlabelled_images():
    from sdsctl.shapes.train import DegradationProbe, _to_tensor, _vae_loss

    vae, probe = _tiny_vae(), DegradationProbe()
    x = _to_tensor(world.sample_batch(0, 8)[0])
    labels = torch.tensor([0, 1, 2, 3, -100, -100, 5, 6])
    with torch.no_grad():
        plain, _, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1))
        total, logs, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1), probe=probe, labels=labels, probe_weight=0.5)
        posterior = vae.encode(x).latent_dist  # the same draw as inside the loss
        g = torch.Generator().manual_seed(1)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        keep = labels >= 0
        ce = float(torch.nn.functional.cross_entropy(probe(z[keep]), labels[keep]))
    assert logs["probe"] == pytest.approx(ce, rel=1e-5)
    assert float(total) == pytest.approx(float(plain) + 0.5 * ce, rel=1e-5)


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_the_vae_stage_trains_the_probe_only_when_weighted(tmp_path, weight):
    """The probe is trained and checkpointed with the VAE (a resumed run picks it up); with
    weight 0 there is none, so the earlier priors' configurations train exactly as they did."""

    class Stop(Exception):
        pass

    logs = []

    def stop_at_step_two(stage, step, total, l):
        logs.append(l)
        if step == 2:
            raise Stop

    cfg = TrainConfig(vae_steps=3, vae_batch=16, vae_channels=(16, 16, 16, 16), checkpoint_every=1, vae_probe_weight=weight)
    with pytest.raises(Stop):
        Trainer(tmp_path / "w", cfg, stop_at_step_two).run()
    saved = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 1 and ("probe" in saved) == bool(weight)
    assert all(("probe" in l) == bool(weight) for l in logs)
    trainer = Trainer(tmp_path / "w", cfg)
    state = trainer.train_vae(trainer._load())
    assert state["stage"] == "decoder" and ("probe" in state) == bool(weight)
    for preset in (TrainConfig.first_release(), TrainConfig.candidate(), TrainConfig.jacobian_experiment()):
        assert preset.vae_probe_weight == 0.0


def test_blur_pairs_are_the_same_scenes_blurred():
    from sdsctl.shapes import judge
    from sdsctl.shapes.train import _blur_pairs

    sharp, blurred = _blur_pairs(3, 4)
    assert sharp.shape == blurred.shape == (4, 3, 64, 64)
    to_image = lambda t: ((t.permute(1, 2, 0).numpy() + 1) / 2)
    for a, b in zip(sharp, blurred):
        ja, jb = judge.judge(to_image(a)), judge.judge(to_image(b))
        assert (ja.shape, ja.color, ja.background) == (jb.shape, jb.color, jb.background)
        assert jb.sharpness < 0.6 * ja.sharpness


def test_blur_margin_hinge_vanishes_beyond_the_margin_and_trains_with_the_vae_stage(tmp_path):
    from sdsctl.shapes.train import _blur_margin_loss, _blur_pairs

    vae = _tiny_vae()
    sharp, blurred = _blur_pairs(3, 4)
    with torch.no_grad():
        hinge, displacement, rec = _blur_margin_loss(vae, sharp, blurred, 10.0, torch.Generator().manual_seed(0))
        assert float(hinge) == pytest.approx(10.0 - float(displacement), rel=1e-4) and float(rec) > 0
        hinge, _, _ = _blur_margin_loss(vae, sharp, blurred, float(displacement) / 10, torch.Generator().manual_seed(0))
        assert float(hinge) == 0.0
    logs = []
    cfg = TrainConfig(vae_steps=2, vae_batch=8, vae_degraded_extra=2, vae_channels=(16, 16, 16, 16), vae_blur_margin=0.3,
                      vae_blur_pairs=2, checkpoint_every=2)
    Trainer(tmp_path / "w", cfg, lambda stage, step, total, l: logs.append(l)).train_vae({"stage": "vae", "step": 0})
    assert len(logs) == 2 and all(l["blur_displacement"] > 0 and l["blurred_rec"] > 0 for l in logs)
    for preset in (TrainConfig(), TrainConfig.first_release(), TrainConfig.candidate(), TrainConfig.jacobian_experiment()):
        assert preset.vae_blur_margin == 0.0


def test_adversarial_losses_and_adaptive_weight():
    """Hinge losses are zero once the discriminator separates real from reconstructed by the
    margin, and the adaptive weight makes both terms' gradients equally strong at the layer."""
    from sdsctl.shapes import adversarial

    real, fake = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    assert float(adversarial.discriminator_loss(real, fake)) == 0.0
    assert float(adversarial.discriminator_loss(fake, real)) == pytest.approx(6.0)
    assert float(adversarial.generator_loss(fake)) == pytest.approx(2.0)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, gen = (w * torch.tensor([3.0, 4.0])).sum(), (w * torch.tensor([0.6, 0.8])).sum()  # gradient norms 5 and 1
    assert float(adversarial.adaptive_weight(rec, gen, w, scale=0.5)) == pytest.approx(0.5 * 5 / (1 + 1e-4))
    logits = adversarial.PatchDiscriminator()(torch.zeros(3, 3, 64, 64))
    assert logits.shape == (3, 1, 16, 16)


def _adversarial_config(**kw):
    return TrainConfig(vae_batch=8, vae_degraded_extra=2, vae_channels=(16, 16, 16, 16), checkpoint_every=1, **kw)


def test_the_adversarial_stage_warms_up_the_discriminator_then_tunes_the_vae(tmp_path):
    """During the warm-up only the discriminator learns; then encoder and decoder move; the
    stage checkpoints the discriminator, resumes from it and hands over to the latents."""
    from sdsctl.shapes import train

    class Stop(Exception):
        pass

    cfg = _adversarial_config(adversarial_steps=3, adversarial_warmup=2)
    vae0 = train.build_vae(cfg).state_dict()
    logs = []

    def stop_after_warmup(stage, step, total, l):
        logs.append(l)
        if step == 2:
            raise Stop

    trainer = Trainer(tmp_path / "w", cfg, stop_after_warmup)
    with pytest.raises(Stop):
        trainer.train_adversarial({"stage": "adversarial", "step": 0, "vae": vae0})
    saved = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    assert (saved["stage"], saved["step"]) == ("adversarial", 1) and "disc" in saved
    assert all(torch.equal(saved["vae"][k], vae0[k]) for k in vae0)  # warm-up: the VAE is untouched
    assert all("gen" not in l and "disc" in l for l in logs)
    state = Trainer(tmp_path / "w", cfg).train_adversarial(saved)
    assert (state["stage"], state["step"]) == ("grain", 0)
    assert not torch.equal(state["vae"]["encoder.conv_in.weight"], vae0["encoder.conv_in.weight"])
    assert not torch.equal(state["vae"]["decoder.conv_out.weight"], vae0["decoder.conv_out.weight"])
    assert not torch.equal(state["disc"]["net.0.weight"], saved["disc"]["net.0.weight"])


def test_without_adversarial_steps_the_stage_passes_the_vae_on_unchanged(tmp_path):
    from sdsctl.shapes import train

    cfg = _adversarial_config()
    vae0 = train.build_vae(cfg).state_dict()
    state = Trainer(tmp_path / "w", cfg).train_adversarial({"stage": "adversarial", "step": 0, "vae": vae0})
    assert (state["stage"], state["step"]) == ("grain", 0) and state["vae"] is vae0 and "disc" not in state
    for preset in (TrainConfig.first_release(), TrainConfig.candidate(), TrainConfig.jacobian_experiment()):
        assert preset.adversarial_steps == 0


def test_train_shapes_option_defaults_are_the_training_defaults():
    import inspect

    from sdsctl_plugins.shapes_commands import train_shapes

    params = inspect.signature(train_shapes).parameters
    for name in ("seed", "vae_steps", "decoder_steps", "prior_steps"):
        assert params[name].default == getattr(TrainConfig, name), name


def test_encoder_robustness_reads_fine_sensitivity_and_ignores_the_latent_scale():
    """The figure is latent change per unit of input change in *scaled* latents: scaling the
    encoder's output must not change it; an encoder that blurs its input first must move
    much less under high-pass noise and a checkerboard, relative to a colour shift (which a
    blur leaves alone)."""
    import torch.nn.functional as F

    from sdsctl.shapes.evaluate import encoder_robustness

    vae = _tiny_vae().eval()
    base = encoder_robustness(vae, n=16)
    assert set(base) == {"latent_scale", "pixel_noise", "colour_shift", "checkerboard", "highpass_noise"}
    assert all(v > 0 and np.isfinite(v) for v in base.values())

    with torch.no_grad():
        vae.quant_conv.weight[:4] *= 10
        vae.quant_conv.bias[:4] *= 10
    scaled = encoder_robustness(vae, n=16)
    for k in ("pixel_noise", "colour_shift", "checkerboard", "highpass_noise"):
        assert scaled[k] == pytest.approx(base[k], rel=1e-3), k

    k1 = torch.tensor([0.25, 0.5, 0.25])
    blur = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)
    blurring = SimpleNamespace(encode=lambda x: vae.encode(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=3)))
    blurred = encoder_robustness(blurring, n=16)
    for k in ("highpass_noise", "checkerboard"):
        assert blurred[k] / blurred["colour_shift"] < 0.5 * scaled[k] / scaled["colour_shift"], k


def test_vae_round_trip_tells_a_vae_that_keeps_blur_from_one_that_does_not():
    """An identity "VAE" gives back every figure as it went in; one that draws every image
    soft returns blurred and clean renders at about the same sharpness."""
    import torch.nn.functional as F

    from sdsctl.shapes.evaluate import ROUND_TRIP_FIGURES, vae_round_trip

    def identity_vae(decode):
        return SimpleNamespace(encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
                               decode=lambda z: SimpleNamespace(sample=decode(z)))

    kept = vae_round_trip(identity_vae(lambda z: z), n=8)
    assert set(kept) == set(ROUND_TRIP_FIGURES)
    for row in kept.values():
        assert row["clean_out"] == pytest.approx(row["clean_in"], abs=0.02)
        assert row["degraded_out"] == pytest.approx(row["degraded_in"], abs=0.02)
    assert kept["blur"]["degraded_in"] < 0.6 * kept["blur"]["clean_in"]

    k = torch.exp(-0.5 * (torch.arange(-6, 7) / 3.0) ** 2)
    kernel = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 13, 13)
    soft = vae_round_trip(identity_vae(lambda z: F.conv2d(F.pad(z, (6,) * 4, mode="replicate"), kernel, groups=3)), n=8)
    blur = soft["blur"]
    assert blur["clean_out"] < 0.6 * blur["clean_in"]
    assert blur["degraded_out"] > 0.8 * blur["clean_out"]  # the blur no longer shows


def test_evaluate_prior_quick_reports_every_section(cli, tiny_prior, tmp_path):
    result = cli("evaluate-prior", "--model", tiny_prior, "--quick", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report) == {"fidelity", "unconditional", "quality_words", "encoder_robustness", "vae_round_trip", "grain_codes"}
    assert report["fidelity"]["pairs"] == 24 and set(report["vae_round_trip"]["blur"]) >= {"clean_in", "degraded_out"}
    assert set(report["grain_codes"]) == {"0", "1", "4", "8"}
    assert set(report["grain_codes"]["1"]) == {"noise", "scene_right", "palette_error"}
    assert (tmp_path / "eval" / "fidelity.png").is_file()


# ----------------------------------------------------------------------------- decoder inversion


def test_inverting_the_shipped_decoder_finds_latents_it_draws_blurred(tmp_path):
    """The smooth encoder maps a blurred render to nearly sharp latents; inverting the decoder
    must find latents that it draws blurrier and closer to the render."""
    from diffusers import AutoencoderKL

    from sdsctl.prior import SHAPES_PRIOR
    from sdsctl.shapes import judge
    from sdsctl.shapes.train import _to_tensor

    vae = AutoencoderKL.from_pretrained(SHAPES_PRIOR, subfolder="vae").eval().requires_grad_(False)
    images, _ = world.sample_batch(5, 4, degradation="blur")
    x = _to_tensor(images)
    trainer = Trainer(tmp_path / "w", TrainConfig(invert_steps=30))
    with torch.no_grad():
        encoded = vae.encode(x).latent_dist.mean
    inverted = trainer._invert(vae, x, encoded)

    def drawn(z):
        with torch.no_grad():
            rec = vae.decode(z).sample
        error = float((rec - x).abs().mean())
        sharpness = np.median([judge.judge(im).sharpness for im in ((rec + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()])
        return error, sharpness

    (enc_error, enc_sharp), (inv_error, inv_sharp) = drawn(encoded), drawn(inverted)
    assert inv_error < 0.9 * enc_error
    assert inv_sharp < enc_sharp - 0.05


def _invert_state(cfg, n=12):
    """A state at the start of the invert stage: ``n`` zero latents, every third one blurred."""
    from sdsctl.shapes import train

    vae = train.build_vae(cfg).state_dict()
    kinds = ["blur" if i % 3 == 0 else None for i in range(n)]
    return {"stage": "invert", "step": 0, "vae": vae, "scaling_factor": 0.5, "latents": torch.zeros(n, 4, 8, 8),
            "input_ids": torch.zeros(n, 32, dtype=torch.long), "degradations": kinds}


def test_the_invert_stage_stands_inverted_latents_in_for_the_worlds_images_of_that_kind(tmp_path, monkeypatch):
    cfg = TrainConfig(vae_channels=(16, 16, 16, 16), invert_kinds=("blur",), invert_images=3, invert_batch=2, invert_steps=1)
    trainer = Trainer(tmp_path / "w", cfg)
    calls = []
    monkeypatch.setattr(Trainer, "_invert", lambda self, vae, x, z0: calls.append(len(x)) or torch.ones(len(x), 4, 8, 8))
    state = trainer.invert_degraded(_invert_state(cfg))
    assert calls == [2, 1]  # invert_images per kind, in batches
    assert (state["stage"], state["step"]) == ("prior", 0) and "degradations" not in state and "inverted" not in state
    latents, ids = state["latents"], state["input_ids"]
    assert latents.shape == (12, 4, 8, 8) and ids.shape == (12, 32)
    blurred = torch.arange(12) % 3 == 0
    assert torch.all(latents[blurred] == 0.5) and torch.all(latents[~blurred] == 0)  # scaled by the scaling factor
    assert torch.all(ids[~blurred] == 0)
    for caption in trainer.tokenizer.batch_decode(ids[blurred], skip_special_tokens=True):
        assert any(word in caption for word in world.DEGRADATION_WORDS["blur"]), caption


def test_an_interrupted_invert_stage_resumes_with_the_next_batch(tmp_path, monkeypatch):
    cfg = TrainConfig(vae_channels=(16, 16, 16, 16), invert_kinds=("blur",), invert_images=5, invert_batch=2, invert_steps=1)
    calls = []
    monkeypatch.setattr(Trainer, "_invert", lambda self, vae, x, z0: calls.append(len(x)) or torch.ones(len(x), 4, 8, 8))

    def stop_after_two(stage, step, total, logs):
        if stage == "invert" and step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tmp_path / "w", cfg, stop_after_two).invert_degraded(_invert_state(cfg))
    trainer = Trainer(tmp_path / "w", cfg)
    state = trainer._load()
    assert state["stage"] == "invert" and len(state["inverted"]) == 2
    state = trainer.invert_degraded(state)
    assert calls == [2, 2, 1] and state["stage"] == "prior"


def test_invert_kinds_must_be_degradations_of_the_world():
    with pytest.raises(ValueError, match="invert_kinds"):
        TrainConfig(invert_kinds=("sepia",))
    for preset in (TrainConfig.first_release(), TrainConfig.candidate(), TrainConfig.jacobian_experiment()):
        assert preset.invert_kinds == ()


def test_the_smoothness_penalty_makes_the_inversions_displacement_smoother(tmp_path):
    from diffusers import AutoencoderKL

    from sdsctl.prior import SHAPES_PRIOR
    from sdsctl.shapes.train import _to_tensor

    vae = AutoencoderKL.from_pretrained(SHAPES_PRIOR, subfolder="vae").eval().requires_grad_(False)
    x = _to_tensor(world.sample_batch(6, 2, degradation="blur")[0])
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mean

    def roughness(tv):
        d = Trainer(tmp_path / f"w{tv}", TrainConfig(invert_steps=15, invert_tv=tv))._invert(vae, x, z0) - z0
        return float((d.diff(dim=2).pow(2).mean() + d.diff(dim=3).pow(2).mean()) / d.pow(2).mean())

    assert roughness(1.0) < 0.8 * roughness(0.0)


def test_a_latent_operator_learns_a_displacement_that_the_latents_decide():
    """Fitted by MSE to noisy targets, the operator recovers the part of the displacement that
    the latents and the strength decide (here: a strength-scaled local smoothing)."""
    from sdsctl.shapes.train import fit_latent_operator

    g = torch.Generator().manual_seed(0)
    z = torch.randn(384, 4, 8, 8, generator=g)
    strength = torch.rand(384, generator=g)
    decided = strength.view(-1, 1, 1, 1) * (torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False) - z)
    noisy_target = decided + 0.3 * decided.std() * torch.randn(decided.shape, generator=g)
    logs = []
    op = fit_latent_operator(z, strength, noisy_target, steps=400, lr=2e-3, progress=lambda *a: logs.append(a))
    assert logs[-1][:2] == (400, 400) and logs[-1][2]["held-out explained"] > 0.7
    with torch.no_grad():
        error = (op(z, strength) - decided).pow(2).mean() / decided.pow(2).mean()
    assert error < 0.2


def test_with_the_operator_every_image_of_the_kind_gets_its_own_displaced_latents(tmp_path, monkeypatch):
    cfg = TrainConfig(vae_channels=(16, 16, 16, 16), invert_kinds=("blur",), invert_images=64, invert_batch=32,
                      invert_steps=1, invert_operator=True, operator_steps=300)
    trainer = Trainer(tmp_path / "w", cfg)

    def invert(self, vae, x, z0):  # the decoder "draws" blur one unit (unscaled) up everywhere
        return z0 + 1.0

    monkeypatch.setattr(Trainer, "_invert", invert)
    from sdsctl.shapes import train

    start = _invert_state(cfg)
    vae = train.build_vae(cfg)
    vae.load_state_dict(start["vae"])
    images, scenes = world.sample_batch(9, 12, degradation="blur")
    with torch.no_grad():  # the world's own latents, as the latents stage writes them
        start["latents"] = vae.encode(train._to_tensor(images)).latent_dist.mean * start["scaling_factor"]
    start["strengths"] = torch.tensor([s.strength for s in scenes])
    state = trainer.invert_degraded({**start, "latents": start["latents"].clone()})
    blurred = torch.arange(12) % 3 == 0
    moved = state["latents"] - start["latents"]
    assert torch.all(moved[~blurred] == 0) and torch.all(state["input_ids"] == start["input_ids"])
    # each image's own latents moved by about one unit times the scaling factor (cycled
    # inverted latents of other renders would differ from them element by element)
    assert float((moved[blurred] - 0.5).abs().mean()) < 0.1


def test_a_fresh_work_folder_can_start_from_an_existing_priors_vae(tmp_path):
    from diffusers import AutoencoderKL

    from sdsctl.prior import SHAPES_PRIOR

    trainer = Trainer(tmp_path / "w", TrainConfig(), vae_from=SHAPES_PRIOR)
    state = trainer._load()
    assert (state["stage"], state["step"]) == ("latents", 0)
    shipped = AutoencoderKL.from_pretrained(SHAPES_PRIOR, subfolder="vae").state_dict()
    assert state["vae"].keys() == shipped.keys()
    assert all(torch.equal(state["vae"][k], shipped[k]) for k in shipped)
    torch.save({"stage": "prior", "step": 7}, trainer.ckpt_path)  # a checkpoint is resumed, not replaced
    assert trainer._load() == {"stage": "prior", "step": 7}


def test_the_prior_stage_tells_quality_word_captions_from_their_token_ids(tmp_path):
    trainer = Trainer(tmp_path / "w", TrainConfig())
    rng = np.random.default_rng(4)
    scenes = [world.sample_scene(rng) for _ in range(400)]
    named = trainer._names_a_degradation(trainer._token_ids([s.caption for s in scenes]))
    assert named.tolist() == [s.degradation is not None for s in scenes]  # "over-saturated" included


def test_rebalancing_trains_quality_word_captions_more_and_leaves_dropped_rows_alone():
    g = torch.Generator().manual_seed(0)
    degraded = torch.arange(100) % 5 == 0  # a fifth, as in the world
    pools = (torch.nonzero(~degraded).flatten(), torch.nonzero(degraded).flatten())
    idx = torch.randint(0, 100, (4000,), generator=g)
    drop = torch.rand(4000, generator=g) < 0.3
    out = Trainer._rebalance(idx, drop, pools, 0.5, g)
    assert torch.equal(out[drop], idx[drop])  # the unconditional rows keep the world's images
    kept = out[~drop]
    assert abs(float(degraded[kept].float().mean()) - 0.5) < 0.03
    counts = torch.bincount(kept[degraded[kept]], minlength=100)[degraded].float()
    assert counts.min() > 0.5 * counts.mean()  # every degraded image is drawn, uniformly
