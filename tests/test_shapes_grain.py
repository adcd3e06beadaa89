"""Grain codes (``sdsctl/shapes/grain.py``) and the training stages that use them."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sdsctl.shapes import grain, judge, train, world
from sdsctl.shapes.train import Trainer, TrainConfig


def test_the_least_used_direction_is_found_with_the_latents_spread():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    scales = torch.tensor([3.0, 2.0, 1.0, 0.05])  # the last basis vector is barely used
    cells = torch.randn(4096, 4, generator=g) * scales @ basis.T
    latents = cells.reshape(64, 8, 8, 4).permute(0, 3, 1, 2)
    u, std = grain.least_used_direction(latents)
    assert abs(float(u @ basis[:, 3])) > 0.999 and abs(float(u.norm()) - 1) < 1e-5
    assert std == float(latents.std())


def test_displacing_moves_each_cell_along_the_direction_by_its_code():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 8, 8, generator=g)
    u = torch.nn.functional.normalize(torch.randn(4, generator=g), dim=0)
    codes = torch.randn(3, 8, 8, generator=g)
    moved = grain.displace(z, codes, u, 2.5) - z
    along = torch.einsum("nchw,c->nhw", moved, u)
    assert torch.allclose(along, 2.5 * codes, atol=1e-5)
    assert torch.allclose(moved - along[:, None] * u.reshape(1, 4, 1, 1), torch.zeros_like(moved), atol=1e-5)


def test_grain_is_grey_zero_for_no_code_and_saturates_beyond_the_maximum():
    codes = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))
    image = grain.grain(codes, 64)
    assert image.shape == (2, 3, 64, 64)
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 0], image[:, 2])
    assert torch.equal(grain.grain(torch.zeros(1, 8, 8), 64), torch.zeros(1, 3, 64, 64))
    big = torch.sign(codes) * 2 * grain.CODE_MAX
    assert torch.allclose(grain.grain(big, 64), grain.grain(3 * big, 64))
    assert torch.allclose(grain.grain(-codes, 64), -image)


def test_a_coded_grain_is_as_noisy_as_the_worlds_noise_and_keeps_the_shape():
    """At the amplitude for a strength, clean renders plus the grain read about as noisy as
    the world's noisy renders of that strength, and the judge still reads their scenes."""
    rng = np.random.default_rng(3)
    scenes = [world.sample_scene(rng, degradation=False) for _ in range(48)]
    clean = np.stack([world.render(s, rng, 1 / 255) for s in scenes])
    noisy = np.stack([world.render(dataclasses.replace(s, degradation="noise", strength=0.5), rng, 1 / 255) for s in scenes])
    g = torch.Generator().manual_seed(3)
    codes = grain.random_codes(grain.amplitude_for_strength(torch.full((48,), 0.5)), 8, g)
    coded = (torch.from_numpy(clean).permute(0, 3, 1, 2) + grain.grain(codes, 64) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    judged = [judge.judge(im, s.caption) for im, s in zip(coded, scenes)]
    world_noise = np.median([judge.judge(im).noise for im in noisy])
    assert 0.5 * world_noise < np.median([j.noise for j in judged]) < 1.5 * world_noise
    assert np.median([judge.judge(im).noise for im in clean]) < 0.2 * world_noise
    assert np.mean([j.matches(s.caption)["match"] for j, s in zip(judged, scenes)]) >= 0.9


def test_training_amplitudes_cover_the_worlds_range_and_beyond():
    a = grain.training_amplitudes(1000, torch.Generator().manual_seed(4), high=10.0)
    low, top = (float(grain.amplitude_for_strength(torch.tensor(s))) for s in (0.0, 1.0))
    assert float(a.min()) >= 0.25 and float(a.max()) <= 10.0
    assert 0.4 < float((a > 3.0).float().mean()) < 0.6  # half beyond the range, where the grain saturates
    assert float(((a >= low) & (a <= top)).float().mean()) > 0.05 and float((a < low).float().mean()) > 0.05


def _small(**kw) -> TrainConfig:
    return TrainConfig(vae_channels=(16, 16, 16, 16), n_images=64, checkpoint_every=2, **kw)


def test_the_grain_stage_tunes_only_the_decoder_and_records_the_direction(tmp_path):
    cfg = _small(grain_steps=2, grain_batch=2, vae_batch=4, vae_degraded_extra=1)
    trainer = Trainer(tmp_path / "w", cfg)
    torch.manual_seed(0)
    start = {"stage": "grain", "step": 0, "vae": train.build_vae(cfg).state_dict()}
    state = trainer.tune_grain(dict(start))
    assert (state["stage"], state["step"]) == ("latents", 0)
    u = state["grain"]["direction"]
    assert u.shape == (4,) and abs(float(u.norm()) - 1) < 1e-5 and state["grain"]["latent_std"] > 0
    changed = {k for k in start["vae"] if not torch.equal(start["vae"][k], state["vae"][k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    resumed = trainer._load()  # checkpointed at the end of the stage
    assert resumed["stage"] == "latents" and torch.equal(resumed["grain"]["direction"], u)


def test_without_grain_steps_the_stage_passes_the_vae_on(tmp_path):
    state = Trainer(tmp_path / "w", _small()).tune_grain({"stage": "grain", "step": 0, "vae": {}})
    assert (state["stage"], "grain" in state) == ("latents", False)


def test_noisy_scenes_get_the_clean_scenes_latents_plus_a_code(tmp_path):
    cfg = _small()
    trainer = Trainer(tmp_path / "w", cfg)
    vae = train.build_vae(cfg).eval()
    rng = np.random.default_rng(5)
    scenes = [world.sample_scene(rng, degradation=False) for _ in range(3)]
    scenes[0] = dataclasses.replace(scenes[0], degradation="noise", strength=0.0)
    scenes[2] = dataclasses.replace(scenes[2], degradation="noise", strength=1.0)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    u = torch.tensor([0.0, 0.6, 0.0, 0.8])
    coding = {"direction": u, "latent_std": 2.0}
    with torch.no_grad():
        a, b = (trainer._grain_coded(vae, z, scenes, coding, seed) for seed in (10, 11))
    assert torch.equal(a[1], z[1])  # a clean scene keeps its latents
    for row in (0, 2):
        assert not torch.allclose(a[row], z[row])
        diff = a[row] - b[row]  # another seed: another code on the same clean latents
        along = torch.einsum("chw,c->hw", diff, u)
        assert float((diff - along * u.reshape(4, 1, 1)).norm()) < 0.05 * float(along.norm())
    for row, strength in ((0, 0.0), (2, 1.0)):  # the code's spread follows the scene's noise strength
        expected = 2.0 * float(grain.amplitude_for_strength(torch.tensor(strength)))
        spread = float(torch.einsum("chw,c->hw", a[row] - b[row], u).std()) / 2**0.5  # two independent codes
        assert 0.6 * expected < spread < 1.4 * expected, (row, spread, expected)


def test_with_grain_steps_a_work_folder_from_a_priors_vae_starts_at_the_grain_stage(tmp_path):
    from sdsctl.prior import SHAPES_PRIOR

    state = Trainer(tmp_path / "w", TrainConfig(grain_steps=10), vae_from=SHAPES_PRIOR)._load()
    assert (state["stage"], state["step"]) == ("grain", 0)


def test_dropped_rows_take_the_encoders_latents_of_inverted_images_when_asked():
    latents, uncond = torch.zeros(6, 4, 8, 8), torch.ones(6, 4, 8, 8)
    idx, drop = torch.tensor([0, 5, 5, 2]), torch.tensor([True, False, True, False])
    plain = Trainer._batch_latents({"latents": latents}, idx, drop)
    assert torch.equal(plain, torch.zeros(4, 4, 8, 8))
    mixed = Trainer._batch_latents({"latents": latents, "uncond_latents": uncond}, idx, drop)
    assert mixed[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_the_invert_stage_keeps_the_encoders_latents_for_dropped_rows_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_invert", lambda self, vae, x, z0: z0 + 1.0)
    n = 12
    for asked in (False, True):
        cfg = _small(invert_kinds=("blur",), invert_images=4, invert_batch=4, invert_steps=1, uncond_encoder_latents=asked)
        start = {"stage": "invert", "step": 0, "vae": train.build_vae(cfg).state_dict(), "scaling_factor": 0.5,
                 "latents": torch.zeros(n, 4, 8, 8), "input_ids": torch.zeros(n, 32, dtype=torch.long),
                 "degradations": ["blur" if i % 3 == 0 else None for i in range(n)]}
        state = Trainer(tmp_path / f"w{asked}", cfg).invert_degraded(start)
        assert ("uncond_latents" in state) == asked
        if asked:
            blurred = torch.arange(n) % 3 == 0
            uncond, cond = state["uncond_latents"], state["latents"]
            assert torch.equal(uncond[~blurred], cond[~blurred])
            assert torch.allclose(cond[blurred] - uncond[blurred], torch.full_like(uncond[blurred], 0.5))  # scaled inversion step


def test_grain_codes_tell_a_decoder_that_draws_them_from_one_that_does_not():
    """The check reads the decoder: a VAE whose decoder adds the code's grain (a wrapper
    around the shipped VAE) reads noisier at a code than at none; the shipped decoder
    itself is judged on the same figure."""
    from diffusers import AutoencoderKL

    from sdsctl.prior import SHAPES_PRIOR
    from sdsctl.shapes import evaluate

    vae = AutoencoderKL.from_pretrained(SHAPES_PRIOR, subfolder="vae").eval()

    class Drawing(torch.nn.Module):  # decodes z, then draws the grain of z's component along the direction
        def __init__(self, inner, direction, std):
            super().__init__()
            self.inner, self.direction, self.std = inner, direction, std

        def encode(self, x):
            return self.inner.encode(x)

        def decode(self, z):
            base = self.inner.decode(z).sample
            codes = torch.einsum("nchw,c->nhw", z - self.mean, self.direction) / self.std
            return type("Out", (), {"sample": (base + grain.grain(codes, base.shape[-1])).clamp(-1, 1)})

    imgs, _ = world.sample_batch(5000, 16, degradation=False)
    with torch.no_grad():
        z = vae.encode(train._to_tensor(imgs)).latent_dist.mean
    u, std = grain.least_used_direction(z)
    drawing = Drawing(vae, u, std)
    drawing.mean = z.mean(dim=(0, 2, 3), keepdim=True)
    with torch.no_grad():
        drawn = evaluate.grain_codes(drawing, n=16, amplitudes=(0.0, 1.0))
    assert drawn["1"]["noise"] > 3 * drawn["0"]["noise"] and drawn["1"]["scene_right"] >= 0.9
    assert drawn["0"]["scene_right"] == 1.0 and drawn["0"]["palette_error"] < 0.05


def test_off_manifold_moves_have_no_code_and_the_asked_spread():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(200, 4, 8, 8, generator=g)
    u = torch.nn.functional.normalize(torch.randn(4, generator=g), dim=0)
    moved = grain.off_manifold(z, u, 2.0, (0.1, 0.3), g) - z
    assert float(torch.einsum("nchw,c->nhw", moved, u).abs().max()) < 1e-5
    rms = moved.flatten(1).pow(2).mean(1).sqrt() / 2.0
    assert float(rms.min()) >= 0.1 - 1e-5 and float(rms.max()) <= 0.3 + 1e-5 and float(rms.std()) > 0.03


def test_the_anchor_rows_are_drawn_by_the_decoder_from_before_the_stage_also_after_a_resume(tmp_path, monkeypatch):
    cfg = _small(grain_steps=4, grain_batch=2, vae_batch=4, vae_degraded_extra=1, grain_anchor_batch=2)
    torch.manual_seed(0)
    start = {"stage": "grain", "step": 0, "vae": train.build_vae(cfg).state_dict()}
    before = train.build_vae(cfg).eval()
    before.load_state_dict(start["vae"])
    moved, targets = [], []
    off_manifold, decoder_loss = grain.off_manifold, train._decoder_loss
    monkeypatch.setattr(grain, "off_manifold", lambda *a: moved.append(off_manifold(*a)) or moved[-1])
    monkeypatch.setattr(train, "_decoder_loss", lambda rec, target: targets.append(target[-2:]) or decoder_loss(rec, target))
    state = Trainer(tmp_path / "w", cfg).tune_grain(dict(start))
    saved = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(saved["grain_teacher"][k], v) for k, v in start["vae"].items())
    assert any(not torch.equal(state["vae"][k], v) for k, v in start["vae"].items())
    # resumed at step 2 from a state whose decoder has moved on: the anchors are still the original decoder's
    resumed = Trainer(tmp_path / "w2", cfg).tune_grain({**state, "stage": "grain", "step": 2})
    assert resumed["stage"] == "latents" and len(targets) == len(moved) == 6
    with torch.no_grad():
        for z, target in zip(moved, targets):
            assert torch.allclose(target, before.decode(z).sample, atol=1e-5)


def test_dropped_rows_of_noisy_images_keep_the_encoders_latents_when_asked(tmp_path):
    for asked in (False, True):
        cfg = _small(grain_steps=1, uncond_encoder_latents=asked)
        vae = train.build_vae(cfg).eval()
        coding = {"direction": torch.tensor([0.0, 0.0, 0.6, 0.8]), "latent_std": 1.0}
        state = Trainer(tmp_path / f"w{asked}", cfg).make_latents({"stage": "latents", "vae": vae.state_dict(), "grain": coding})
        assert ("uncond_latents" in state) == asked
        if asked:
            noisy = torch.tensor([k == "noise" for k in state["degradations"]])
            assert noisy.any()
            same = (state["uncond_latents"] == state["latents"]).flatten(1).all(1)
            assert torch.equal(same, ~noisy)  # only the coded rows differ
