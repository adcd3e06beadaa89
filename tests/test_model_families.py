"""Model families: SD 1.x (ε), SD 2.x (v-prediction), SDXL and DeepFloyd IF stage I.

Tiny random-weight pipelines of each family (``tests/tiny_pipelines.py``) run the bundled
recipes end to end, ``sdsctl model`` describes them, and the prior's ε is compared with a
direct call of the same diffusers components as the family's pipeline makes it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdsctl.engine.loop import resolve_dtype
from sdsctl.models import Prior

CPU = torch.device("cpu")
FAMILY = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "sdxl", "if": "deepfloyd-if"}


def _run(cli, tmp_path, recipe, model, *sets):
    out = tmp_path / "run"
    result = cli("run", recipe, "--set", f"model={model}", "--set", "device=cpu", "--no-live", "--out", out,
                 *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "if"])
def test_robust_nfsd_runs_on_every_family(name, cli, tmp_path, tiny_families):
    extra = ["parameterization.name=rgb-pixels"] if name == "if" else []
    summary = _run(cli, tmp_path, "robust_nfsd", tiny_families[name], "steps=3", "schedule.warmup_steps=1", *extra)
    assert summary["status"] == "completed" and summary["steps_done"] == 3
    assert summary["model"]["family"] == FAMILY[name]
    assert summary["model"]["space"] == ("pixel" if name == "if" else "latent")
    assert summary["model"]["prediction_type"] == ("v_prediction" if name == "sd2" else "epsilon")
    assert summary["model"]["dtype"] == "float32" and summary["peak_memory_mb"] > 0


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
@pytest.mark.parametrize("recipe", ["sds", "vsd"])
def test_sds_and_vsd_run_on_sd_and_sdxl(name, recipe, cli, tmp_path, tiny_families):
    summary = _run(cli, tmp_path, recipe, tiny_families[name], "steps=2")
    assert summary["status"] == "completed" and summary["model"]["family"] == FAMILY[name]


def test_bfloat16_run_on_the_cpu(cli, tmp_path, tiny_families):
    summary = _run(cli, tmp_path, "sds", tiny_families["sdxl"], "steps=2", "dtype=bfloat16")
    assert summary["status"] == "completed"
    assert summary["dtype"] == "bfloat16" and summary["model"]["dtype"] == "bfloat16"
    prior = Prior.load(str(tiny_families["sdxl"]), CPU, torch.bfloat16)
    assert prior.denoiser.dtype == torch.bfloat16 and prior.text_encoders[1].dtype == torch.bfloat16
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = prior.encode_prompts(["", "a red circle"])
    assert prior.predict_noise(z, 500, emb).dtype == torch.float32  # the guidance arithmetic stays float32


def test_float16_on_the_cpu_says_what_to_use():
    dtype, warning = resolve_dtype("float16", CPU)
    assert dtype == torch.float32 and "bfloat16" in warning
    assert resolve_dtype("bfloat16", CPU) == (torch.bfloat16, None)


def test_float16_keeps_the_vae_in_float32_where_it_would_overflow_or_underflow(tiny_families, tmp_path):
    prior = Prior.load(str(tiny_families["sdxl"]), CPU, torch.float16)  # force_upcast: the whole VAE in float32
    assert prior.denoiser.dtype == torch.float16 and prior.vae.dtype == torch.float32
    folder = shutil.copytree(tiny_families["sd1"], tmp_path / "sd1-no-upcast")
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    prior = Prior.load(str(folder), CPU, torch.float16)  # the encoder (EHC's backward) in float32, the decoder not
    assert prior.vae.encoder.conv_in.weight.dtype == torch.float32
    assert prior.vae.decoder.conv_in.weight.dtype == torch.float16


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "if"])
def test_model_command_describes_each_family_from_configs(name, cli, tiny_families, monkeypatch):
    monkeypatch.setattr(Prior, "load", classmethod(lambda *a, **k: pytest.fail("sdsctl model loaded weights")))
    result = cli("model", tiny_families[name], "--json")
    assert result.exit_code == 0, result.output + result.stderr
    info = json.loads(result.stdout)
    pixel = name == "if"
    assert info["family"] == FAMILY[name] and info["space"] == ("pixel" if pixel else "latent")
    assert info["pipeline"] == {"sdxl": "StableDiffusionXLPipeline",
                                "if": "IFPipeline"}.get(name, "StableDiffusionPipeline")
    assert info["prediction_type"] == ("v_prediction" if name == "sd2" else "epsilon")
    assert (info["latent_channels"], info["downscale_factor"], info["default_resolution"]) == \
        ((3, 1, 16) if pixel else (4, 8, 64))
    assert [e["name"] for e in info["text_encoders"]] == (["text_encoder",
                                                           "text_encoder_2"] if name == "sdxl" else ["text_encoder"])
    assert [e["max_tokens"] for e in info["text_encoders"]] == ([77] if pixel else [32] * len(info["text_encoders"]))
    assert set(info["dtype_on_disk"].values()) == {"float32"}
    # the parameter counts read from the safetensors headers are the loaded modules' counts
    monkeypatch.undo()
    prior = Prior.load(str(tiny_families[name]), CPU, torch.float32)
    modules = {"unet": prior.denoiser, "vae": prior.vae,
               **{n: getattr(prior.pipe, n) for n in prior.text_encoder_names}}
    assert info["parameters"] == {n: sum(p.numel() for p in m.parameters()) for n,
                                  m in modules.items() if m is not None}


def test_variant_files_are_the_ones_described_and_loaded(cli, tiny_families, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = shutil.copytree(tiny_families["sd1"], tmp_path / "sd1-fp16")
    UNet2DConditionModel.from_pretrained(folder / "unet").half().save_pretrained(folder / "unet", variant="fp16")
    info = json.loads(cli("model", folder, "--json", "--variant", "fp16").stdout)
    assert info["dtype_on_disk"]["unet"] == "float16"
    assert json.loads(cli("model", folder, "--json").stdout)["dtype_on_disk"]["unet"] == "float32"
    prior = Prior.load(str(folder), CPU, torch.float16, variant="fp16")
    assert prior.denoiser.dtype == torch.float16


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_weights_are_counted_from_their_shards(variant, cli, tiny_families, tmp_path):
    """A UNet in shards, as SDXL's and FLUX's are published: with a variant diffusers names the
    index ``diffusion_pytorch_model.safetensors.index.fp16.json``, which ``sdsctl model`` once
    missed (parameters unknown; found at full size by ``benchmarks/fullsize.py``, issue 42)."""
    from diffusers import UNet2DConditionModel

    folder = shutil.copytree(tiny_families["sd1"], tmp_path / "sharded")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    expected = sum(p.numel() for p in unet.parameters())
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.to(torch.float16 if variant else torch.float32).save_pretrained(folder / "unet", variant=variant,
                                                                          max_shard_size="20KB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 2  # really in shards
    info = json.loads(cli("model", folder, "--json", *(["--variant", variant] if variant else [])).stdout)
    assert info["parameters"]["unet"] == expected
    assert info["dtype_on_disk"]["unet"] == ("float16" if variant else "float32")
    prior = Prior.load(str(folder), CPU, torch.float32, variant=variant)  # and diffusers reads the same shards
    assert sum(p.numel() for p in prior.denoiser.parameters()) == expected


def test_latent_geometry_comes_from_the_vae_not_the_unet_input(tiny_families, tmp_path):
    folder = shutil.copytree(tiny_families["sd1"], tmp_path / "inpaint-like")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))  # as inpainting UNets have
    assert Prior.describe(str(folder)).latent_channels == 4


def test_model_command_prints_a_summary(cli, tiny_families):
    result = cli("model", tiny_families["sdxl"])
    assert result.exit_code == 0
    assert "sdxl (StableDiffusionXLPipeline)" in result.stdout
    assert "text_encoder_2: CLIPTextModelWithProjection" in result.stdout


# ----------------------------------------------------------------------------- against diffusers

def _z(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_sdxl_prediction_matches_the_unet_with_the_pipelines_added_conditions(tiny_families):
    from diffusers import StableDiffusionXLPipeline

    prior = Prior.load(str(tiny_families["sdxl"]), CPU, torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_families["sdxl"]), local_files_only=True)
    # What StableDiffusionXLPipeline.__call__ builds for CFG with no negative prompt: zeros for the
    # unconditional branch (force_zeros_for_empty_prompt), time ids (original, crop, target) per row.
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a red circle", device=CPU,
                                                             do_classifier_free_guidance=True)
    assert not uncond.any() and not uncond_pooled.any()
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1)
    z, t = _z((2, 4, 8, 8)), torch.tensor([700, 700])
    with torch.no_grad():
        direct = pipe.unet(z, t, encoder_hidden_states=torch.cat([uncond, cond]),
                           added_cond_kwargs={"text_embeds": torch.cat([uncond_pooled, pooled]),
                                              "time_ids": time_ids}).sample
    emb = torch.cat([prior.encode_prompts([""]),
                     prior.encode_prompts(["a red circle"])])  # rows batched as guidances do
    assert emb.shape == (2, 32 + 1, 64)  # the pooled embedding packed as one more position
    assert torch.allclose(prior.predict_noise(z, t, emb), direct, atol=1e-5)
    # without the pooled embedding and time ids the prediction would differ: they are used
    with torch.no_grad():
        wrong = pipe.unet(z, t, encoder_hidden_states=torch.cat([uncond, cond]),
                          added_cond_kwargs={"text_embeds": torch.zeros_like(torch.cat([uncond_pooled, pooled])),
                                             "time_ids": time_ids}).sample
    assert not torch.allclose(wrong, direct, atol=1e-4)


def test_if_prediction_drops_the_learned_variance_channels(tiny_families):
    from diffusers import IFPipeline

    prior = Prior.load(str(tiny_families["if"]), CPU, torch.float32)
    pipe = IFPipeline.from_pretrained(str(tiny_families["if"]), safety_checker=None, feature_extractor=None,
                                      watermarker=None, requires_safety_checker=False, local_files_only=True)
    cond, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False, device=CPU)
    z, t = _z((1, 3, 16, 16)), torch.tensor([300])
    with torch.no_grad():
        raw = pipe.unet(z, t, encoder_hidden_states=cond).sample
    assert raw.shape[1] == 6  # ε and the variance interpolation
    eps, _variance = raw.split(3, dim=1)  # as IFPipeline splits it
    assert torch.allclose(prior.predict_noise(z, t, prior.encode_prompts(["a red circle"])), eps, atol=1e-5)
    assert torch.allclose(prior.encode_images(prior.decode_latents(z.clamp(-1, 1))), z.clamp(-1, 1),
                          atol=1e-6)  # pixel space


def test_v_prediction_is_converted_to_eps_as_the_scheduler_defines_v(tiny_families):
    prior = Prior.load(str(tiny_families["sd2"]), CPU, torch.float32)
    assert prior.prediction_type == "v_prediction"
    z0, eps = _z((3, 4, 8, 8), 1), _z((3, 4, 8, 8), 2)
    t = torch.tensor([50, 500, 950])
    z_t = prior.add_noise(z0, eps, t)
    v = prior.scheduler.get_velocity(z0, eps, t)  # diffusers' definition of the v target
    emb = prior.encode_prompts(["a", "a", "a"])

    class PerfectV(torch.nn.Module):  # a denoiser that predicts the true v
        config = prior.denoiser.config

        def forward(self, sample, timestep, encoder_hidden_states):
            from types import SimpleNamespace

            return SimpleNamespace(sample=v)

    prior.denoiser = PerfectV()
    assert torch.allclose(prior.predict_noise(z_t, t, emb), eps, atol=1e-4)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(Prior, "load", classmethod(lambda *a, **k: pytest.fail("weights loaded before validation")))


def test_unknown_pipeline_class_names_it_and_the_families(cli, tmp_path, tiny_families, no_load):
    folder = shutil.copytree(tiny_families["sd1"], tmp_path / "pixart")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    for args in (("model", folder), ("run", "sds", "--model", str(folder), "--no-live", "--out", tmp_path / "r")):
        result = cli(*args)
        assert result.exit_code == 2, result.stderr
        assert "'PixArtAlphaPipeline'" in result.stderr
        assert all(f in result.stderr for f in ("stable-diffusion", "sdxl", "deepfloyd-if", "sd3",
                                                "flux")), result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("recipe, latent, fits", [
    ("robust_nfsd", "latent-pixels", "rgb-pixels, rgb-hashgrid, mesh-texture, nerf"),
    ("robust_nfsd_ehl", "latent-hashgrid", "rgb-hashgrid, rgb-pixels, mesh-texture, nerf"),
])
def test_latent_parameterization_on_a_pixel_model_names_those_that_fit(recipe, latent, fits, cli, tmp_path,
                                                                       tiny_families, no_load):
    """The RGB counterpart first and suggested, then the other 2D ones, then the 3D ones."""
    result = cli("run", recipe, "--model", str(tiny_families["if"]), "--no-live", "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "parameterization.name" in result.stderr and f"'{latent}' renders latents" in result.stderr
    assert f"renders RGB: {fits} (--set parameterization.name={fits.split(',')[0]})" in result.stderr


@pytest.mark.parametrize("name, resolution", [("sd1", 60), ("sdxl", 72), ("if", 15)])
def test_a_resolution_the_model_cannot_take_is_rejected_before_loading(name, resolution, cli, tmp_path, tiny_families,
                                                                       no_load):
    result = cli("run", "sds", "--model", str(tiny_families[name]), "--set", "parameterization.name=rgb-pixels",
                 "--set", f"parameterization.resolution={resolution}", "--no-live", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "parameterization.resolution" in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_hub_ids_come_from_the_cache_unless_downloading_is_allowed(cli, monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def snapshot(repo_id, **kwargs):
        calls.append(kwargs["local_files_only"])
        raise OSError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    result = cli("validate", "sds", "--model", "someone/some-model")
    assert result.exit_code == 2
    assert "--allow-download" in result.stderr and "not in the local Hugging Face cache" in result.stderr
    result = cli("validate", "sds", "--model", "someone/some-model", "--allow-download")
    assert result.exit_code == 2 and "could not download it" in result.stderr
    assert calls == [True, False]


def test_a_hub_error_ends_with_the_librarys_reason_not_its_advice(cli, monkeypatch):
    """Hugging Face's own advice ("pass 'local_files_only=False'") names a keyword sdsctl's user
    never sees; sdsctl's message says what to do, the library's reason stays."""
    import huggingface_hub

    def snapshot(repo_id, **kwargs):
        raise OSError("Cannot find an appropriate cached snapshot folder for the specified revision on the local "
                      "disk and outgoing traffic has been disabled. To enable repo look-ups and downloads online, "
                      "pass 'local_files_only=False' as input.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    result = cli("validate", "sds", "--model", "someone/some-model")
    assert result.exit_code == 2 and "--allow-download" in result.stderr
    assert "outgoing traffic has been disabled.)" in result.stderr and "local_files_only" not in result.stderr


@pytest.fixture(scope="module")
def sd1_single_file(tiny_families, tmp_path_factory):
    """The tiny SD 1.x pipeline as one .safetensors file in the original layout (model sites')."""
    from safetensors.torch import save_file

    from tiny_pipelines import original_sd_checkpoint

    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    save_file(original_sd_checkpoint(tiny_families["sd1"]), str(path))
    return path


def test_a_single_file_checkpoint_runs_as_its_folder_does(cli, tmp_path, tiny_families, sd1_single_file):
    """model.path a .safetensors in the original layout, model.config the folder of its
    architecture: the same weights, so the same image, byte for byte."""
    images = []
    for name, sets in [("folder", [f"model={tiny_families['sd1']}"]),
                       ("file", [f"model={sd1_single_file}", f"model.config={tiny_families['sd1']}"])]:
        out = tmp_path / name
        args = [a for s in [*sets, "steps=2", "device=cpu"] for a in ("--set", s)]
        result = cli("run", "sds", *args, "--no-live", "--out", out)
        assert result.exit_code == 0, result.output + result.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["model"]["family"] == "stable-diffusion"
        images.append((out / "final.png").read_bytes())
    assert images[0] == images[1]
    assert str(sd1_single_file) in summary["model"]["source"]


def test_a_single_file_checkpoint_without_its_architecture_is_one_clear_error(cli, sd1_single_file, no_load):
    result = cli("validate", "sds", "--set", f"model={sd1_single_file}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "single-file checkpoint" in result.stderr and "model.config" in result.stderr


def test_model_command_describes_a_single_file_checkpoint_by_its_architecture(cli, tiny_families, sd1_single_file):
    result = cli("model", str(sd1_single_file), "--config", str(tiny_families["sd1"]), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "stable-diffusion" and str(sd1_single_file) in info["source"]
    bare = cli("model", str(sd1_single_file))
    assert bare.exit_code == 2 and "--config DIR" in bare.stderr


@pytest.mark.parametrize("component, holds", [("unet", "a diffusers UNet's weights"),
                                              ("vae", "a diffusers VAE's weights"),
                                              ("text_encoder", "a text encoder's weights")])
def test_a_component_file_is_not_taken_for_a_whole_checkpoint(cli, tiny_families, tmp_path, no_load, component,
                                                              holds):
    """A diffusers component file (e.g. unet/diffusion_pytorch_model.safetensors) is refused
    before any work: exit 2, what it holds, nothing written."""
    (file,) = (tiny_families["sd1"] / component).glob("*.safetensors")
    described = cli("model", str(file), "--config", str(tiny_families["sd1"]))
    assert described.exit_code == 2 and "not an original-layout checkpoint" in described.stderr
    assert f"it holds only {holds}" in described.stderr
    out = tmp_path / "run"
    result = cli("run", "sds", "--set", f"model={file}", "--set", f"model.config={tiny_families['sd1']}",
                 "--no-live", "--out", out)
    assert result.exit_code == 2 and "not an original-layout checkpoint" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_config_without_a_single_file_is_refused(cli, tiny_families, no_load):
    result = cli("validate", "sds", "--set", f"model={tiny_families['sd1']}", "--set",
                 f"model.config={tiny_families['sd2']}")
    assert result.exit_code == 2 and "leave config out" in result.stderr
