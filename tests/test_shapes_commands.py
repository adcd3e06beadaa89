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
from sdsctl.shapes.train import TrainConfig, Trainer

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
    assert any(not torch.equal(raw[k], v) for k,
               v in state["text"].items() if k in raw), "EMA weights, not the last step's"


def test_second_run_resumes_without_retraining(trained, monkeypatch):
    checkpoint = (trained.work / "checkpoint.pt").read_bytes()

    def must_not_run(self, state):
        raise AssertionError("a completed training must not train again")

    for stage in ("train_vae", "tune_decoder", "make_latents", "train_prior"):
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


def test_sample_writes_an_enlarged_copy_like_run(tiny_prior, tmp_path):
    from PIL import Image

    out = tmp_path / "a.png"
    result = _sample(tiny_prior, out)
    assert result.exit_code == 0, result.output
    view = tmp_path / "a_512.png"
    assert str(view) in result.stdout
    with Image.open(out) as small, Image.open(view) as big:
        assert big.size == (512, 512)
        assert big.resize((64, 64), Image.NEAREST).tobytes() == small.tobytes()  # the same pixels, enlarged
    assert _sample(tiny_prior, tmp_path / "b.png", "--view-size", "0").exit_code == 0
    assert not (tmp_path / "b_512.png").exists() and not (tmp_path / "b_0.png").exists()


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
    assert not ShapesJudge.applies_to(SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: vocab),
                                                      image_size=64))


def test_shapes_judge_scores_a_render_exactly(tiny_prior):
    from sdsctl_plugins.shapes_judge import ShapesJudge

    images, scenes = world.sample_batch(11, 1, degradation=False)
    image = torch.from_numpy(images[0]).permute(2, 0, 1)
    metric = ShapesJudge(ShapesJudge.Config(name="shapes-judge"), ctx=None)
    result = metric(image, scenes[0].plain_caption)
    assert result["match"] is True
    assert (result["color"], result["shape"], result["background"]) == (scenes[0].color, scenes[0].shape,
                                                                        scenes[0].background)
    other = "square" if scenes[0].shape != "square" else "circle"
    wrong = f"a {scenes[0].color} {other} on a {scenes[0].background} background"
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


def test_highpass_perturbations_spare_the_frequencies_blur_changes():
    """The penalty's noise keeps white noise's variance but moves its energy up: almost none
    below 0.1 cycles/px (where a 1.2-2.8 px blur changes an edge), most of it near the
    checkerboard."""
    from sdsctl.shapes.train import _highpass

    white = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    high = _highpass(white)
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
    monkeypatch.setattr(train.world, "sample_batch", lambda seed, n,
                        **kw: asked.append(kw.get("degradation")) or sample_batch(seed, n, **kw))
    cfg = TrainConfig(vae_steps=1, vae_batch=16, vae_channels=(16, 16, 16, 16), checkpoint_every=1)
    trainer = Trainer(tmp_path / "w", cfg)
    x, extra = trainer._topped_up_batch(0, cfg.vae_degraded_extra)
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


def test_the_decoder_stage_gets_the_degraded_topup(tmp_path, monkeypatch):
    """The decoder is tuned on the same forced-degraded images as the VAE, so its edge loss
    does not teach it to sharpen blurred latents."""
    from sdsctl.shapes import train

    asked = []
    sample_batch = world.sample_batch
    monkeypatch.setattr(train.world, "sample_batch", lambda seed, n,
                        **kw: asked.append((n, kw.get("degradation"))) or sample_batch(seed, n, **kw))
    cfg = TrainConfig(vae_batch=16, vae_channels=(16, 16, 16, 16), decoder_steps=1)
    trainer = Trainer(tmp_path / "w", cfg)
    state = {"stage": "decoder", "step": 0, "vae": train.build_vae(cfg).state_dict()}
    assert trainer.tune_decoder(state)["stage"] == "latents"
    assert sorted(k for _, k in asked if k) == sorted(world.DEGRADATION_WORDS)
    assert sum(n for n, _ in asked) == cfg.vae_batch


def test_a_checkpoint_of_a_removed_stage_is_a_clear_error(tmp_path):
    trainer = Trainer(tmp_path / "w", TrainConfig.smoke())
    torch.save({"stage": "invert", "step": 0}, trainer.ckpt_path)
    with pytest.raises(ValueError, match="'invert'.*earlier version"):
        trainer.run()


def test_jacobian_penalty_is_added_and_ignores_the_latent_scale():
    """The penalty is the encoder's sensitivity *relative to its latents' spread*: scaling the
    latents (the encoder's last layer) must not change it, or training could shrink it for free."""
    from sdsctl.shapes import world
    from sdsctl.shapes.train import _to_tensor, _vae_loss

    vae = _tiny_vae()
    x = _to_tensor(world.sample_batch(0, 8)[0])
    with torch.no_grad():
        plain, _ = _vae_loss(vae, x, x, torch.Generator().manual_seed(1))
        total, logs = _vae_loss(vae, x, x, torch.Generator().manual_seed(1), jacobian_weight=5.0)
        assert logs["jac"] > 0
        assert float(total) == pytest.approx(float(plain) + 5.0 * logs["jac"], rel=1e-5)
        vae.quant_conv.weight[:4] *= 10  # the mean channels only
        vae.quant_conv.bias[:4] *= 10
        _, scaled = _vae_loss(vae, x, x, torch.Generator().manual_seed(1), jacobian_weight=5.0)
    assert scaled["jac"] == pytest.approx(logs["jac"], rel=1e-3)


def test_the_vae_stage_trains_with_the_penalty(tmp_path):
    """The shipped regularizer runs through the VAE stage and logs its penalty."""
    logs = []
    cfg = TrainConfig(vae_steps=2, vae_batch=8, vae_degraded_extra=2, vae_channels=(16, 16, 16, 16), checkpoint_every=2)
    trainer = Trainer(tmp_path / "w", cfg, lambda stage, step, total, log: logs.append(log))
    state = trainer.train_vae(trainer._load())
    assert state["stage"] == "decoder" and len(logs) == 2
    assert all(log["jac"] > 0 for log in logs)


def test_the_default_training_is_the_shipped_priors():
    """`sdsctl train-shapes` with no options reproduces the shipped prior's configuration."""
    from sdsctl.prior import SHAPES_PRIOR

    cfg = TrainConfig()
    vae = json.loads((SHAPES_PRIOR / "vae" / "config.json").read_text())
    unet = json.loads((SHAPES_PRIOR / "unet" / "config.json").read_text())
    assert tuple(vae["block_out_channels"]) == cfg.vae_channels
    assert tuple(unet["block_out_channels"]) == cfg.unet_channels
    assert (cfg.jacobian_weight, cfg.vae_steps, cfg.decoder_steps, cfg.prior_steps) == (5.0, 2000, 600, 10_000)
    assert (cfg.vae_degraded_extra, cfg.caption_dropout, cfg.ema_decay) == (6, 0.3, 0.999)
    assert (SHAPES_PRIOR / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 0


def test_edge_loss_grows_with_blur_and_vanishes_on_a_perfect_reconstruction():
    """The VAE's edge term must tell a blurred reconstruction from a sharp one, and more blur
    must cost more: that is what makes the latents carry blur."""
    import dataclasses

    from sdsctl.shapes.train import _edge_loss, _to_tensor

    rng = np.random.default_rng(4)
    scenes = [world.sample_scene(rng, degradation=False) for _ in range(8)]

    def batch(strength=None):
        return _to_tensor(np.stack([world.render(dataclasses.replace(s, degradation=strength and "blur",
                                                                     strength=strength or 0.0))
                                    for s in scenes]))

    sharp = batch()
    assert float(_edge_loss(sharp, sharp)) == 0.0
    mild, strong = float(_edge_loss(batch(0.01), sharp)), float(_edge_loss(batch(1.0), sharp))
    assert 0 < mild < strong


def test_train_shapes_option_defaults_are_the_training_defaults():
    import inspect

    from sdsctl.shapes.commands import train_shapes

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
    blurring = SimpleNamespace(encode=lambda x: vae.encode(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur,
                                                                    groups=3)))
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
    assert set(report) == {"fidelity", "unconditional", "quality_words", "encoder_robustness", "vae_round_trip"}
    assert report["fidelity"]["pairs"] == 24 and set(report["vae_round_trip"]["blur"]) >= {"clean_in", "degraded_out"}
    assert (tmp_path / "eval" / "fidelity.png").is_file()
