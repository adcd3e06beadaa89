"""Every GPU check of sdsctl in one go (``benchmarks/gpu.sh`` runs it; a few minutes on an H100/H200).

Compute does not depend on weights, so full-size architectures are built with random weights
from their published configurations -- Stable Diffusion 2.1-base (512 px, 64 × 64 latents) and,
if time allows, SDXL base (1024 px) -- in memory, on the GPU, in the asked dtype. Then:

1. ``sdsctl bench`` of sds, robust_nfsd and robust_nfsd_ehc: eager, channels-last, compiled
   (torch.compile + CUDA graphs), side by side (steps/s, ms/step, floor_ratio, peak memory);
2. no host synchronisation on quiet steps: ``torch.cuda.set_sync_debug_mode("error")`` around
   steps that neither log nor preview (SDS, robust NFSD in both phases, VSD);
3. half precision: an EHC step in float16 keeps finite encoder gradients; bf16 and fp16 SDS
   steps are finite;
4. the compiled denoiser agrees with the eager one (bf16 tolerance);
5. 3D: ``sdsctl bench`` of nerf_robust_nfsd, nerf_latent_robust_nfsd and texture_robust_nfsd
   (views rendered at 64 px; the hash grid's backend is tiny-cuda-nn where it imports), with
   the renderer's own forward and backward.

Results go to ``OUT/gpu.json`` (and are printed). ``--tiny`` runs the same script with small
configurations on the CPU: that is how it is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 projection_dim=512, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_1 = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False, steps_offset=1)

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 8, 8),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=64, norm_num_groups=4)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 projection_dim=32, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)


def build_sd(device, dtype, tiny: bool):
    """An SD 2.1-base-shaped pipeline with random weights, built on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdsctl.models import SHAPES_PRIOR

    tokenizer = CLIPTokenizer.from_pretrained(str(SHAPES_PRIOR / "tokenizer"))
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD21_UNET)).to(dtype)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE), scaling_factor=0.18215).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else SD21_TEXT))).to(dtype)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    from sdsctl.models.stable_diffusion import StableDiffusionPrior

    return StableDiffusionPrior(pipe, device=torch.device(device), dtype=dtype, source="random SD 2.1-base")


def build_sdxl(device, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdsctl.models import SHAPES_PRIOR
    from sdsctl.models.sdxl import SDXLPrior

    tokenizer = CLIPTokenizer.from_pretrained(str(SHAPES_PRIOR / "tokenizer"))
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 1024}, scaling_factor=0.13025, force_upcast=True).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_1)).to(dtype)
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)).to(dtype)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, scheduler=DDPMScheduler(**SD_SCHEDULER))
    return SDXLPrior(pipe, device=torch.device(device), dtype=dtype, source="random SDXL base")


def recipe(name: str, device: str, dtype: str, *sets: str):
    from sdsctl.engine.recipe import load_recipe

    return load_recipe(name, [f"dtype={dtype}", f"device={device}", *sets])


def check_no_sync(prior, device: str, dtype: str) -> dict:
    """Quiet steps under ``set_sync_debug_mode('error')``: any host sync raises."""
    from sdsctl.engine.loop import Optimization

    out = {}
    cases = {"sds": ("sds",), "robust_nfsd (warm-up)": ("robust_nfsd",),
             "robust_nfsd (main)": ("robust_nfsd", "schedule.warmup_steps=0"), "vsd": ("vsd",)}
    for label, (name, *sets) in cases.items():
        loaded = recipe(name, device, dtype, *sets)
        opt = Optimization(loaded, prior, torch.device(device), prior.dtype)
        try:
            opt.initialize()
            opt.step(0)  # first step: allocations, lazy initialisation
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                for k in range(1, 4):
                    opt.step(k)
                out[label] = "no sync"
            except RuntimeError as exc:
                out[label] = f"SYNC: {str(exc).splitlines()[0]}"
            finally:
                if device.startswith("cuda"):
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            opt.close()
    return out


def check_half_precision(device: str, tiny: bool) -> dict:
    from sdsctl.engine.loop import Optimization

    out = {}
    for dtype_name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        if device == "cpu" and dtype_name == "float16":
            continue
        prior = build_sd(device, dtype, tiny)
        for name in ("sds", "robust_nfsd_ehc"):
            opt = Optimization(recipe(name, device, dtype_name, "parameterization.init_steps=10"
                                      if name.endswith("ehc") else "seed=0"), prior, torch.device(device), dtype)
            opt.initialize()
            records = [opt.step(k).fetched() for k in range(3)]
            grads = [p.grad for p in opt.param.parameters() if p.grad is not None]
            out[f"{name} {dtype_name}"] = {
                "finite": all(all(v == v and abs(v) != float("inf") for v in (r["loss"], r["norms"]["score"]))
                              for r in records),
                "theta_finite": bool(opt.theta_finite()),
                "grads_nonzero": bool(grads) and all(bool(g.abs().sum() > 0) for g in grads),
            }
            opt.close()
        del prior
    return out


def compiled_copy(prior, backend: str):
    """The prior with a compiled copy of its denoiser (the eager one stays as it was)."""
    import copy

    fast = copy.copy(prior)
    fast.denoiser = copy.deepcopy(prior.denoiser)
    fast._compiled = False
    fast.accelerate(compile=True, backend=backend)
    return fast


def compile_agreement(prior, fast, device: str) -> dict:
    z = torch.randn((3, prior.latent_channels, prior.latent_size, prior.latent_size), device=device)
    e = prior.encode_prompts(["", "a red circle on a blue background", "dull"])
    out = {}
    with torch.no_grad():
        for t in ((700, 700, 60), (300, 300, 20)):  # a second t: no recompilation, same agreement
            ts = torch.tensor(t, device=device)
            eager, compiled = prior.predict_noise(z, ts, e), fast.predict_noise(z, ts, e)
            out[f"t={t[0]}"] = float((compiled - eager).abs().max() / eager.abs().max())
    return {"max_relative_error": out, "agrees": all(v < 2e-2 for v in out.values())}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--tiny", action="store_true", help="small configurations on the CPU (tests the script)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds: skip what would not fit")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    dtype_name = "float32" if args.tiny else "bfloat16"
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    results: dict = {"torch": torch.__version__, "python": platform.python_version(),
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype_name}

    def save():
        (args.out / "gpu.json").write_text(json.dumps(results, indent=2))

    def section(name, fn):
        if time.perf_counter() - started > args.budget:
            results[name] = "skipped: out of time"
            return
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # one failing check must not cost the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        print(f"[{time.perf_counter() - started:6.1f}s] {name} ({time.perf_counter() - t0:.1f}s): "
              f"{json.dumps(results[name])[:600]}", flush=True)
        save()

    from sdsctl.diagnostics.bench import bench

    prior = build_sd(device, dtype, args.tiny)
    steps = 4 if args.tiny else args.steps

    def benches():
        table = {}
        for name in ("sds", "robust_nfsd", "robust_nfsd_ehc"):
            for variant, sets in (("eager", ()), ("channels_last", ("channels_last=true",))):
                report = bench(recipe(name, device, dtype_name, *sets), steps=steps, warmup=3, prior=prior)
                table[f"{name} {variant}"] = report
                print(f"  {name} {variant}: {report['steps_per_second']} steps/s, floor_ratio {report['floor_ratio']}, "
                      f"peak {report['peak_memory_mb']} MiB", flush=True)
        return table

    section("bench_sd21_eager", benches)
    section("no_host_sync", lambda: check_no_sync(prior, device, dtype_name))

    def compiled():
        # inductor on the CPU takes minutes: --tiny traces with aot_eager (no code generation)
        fast = compiled_copy(prior, "aot_eager" if args.tiny else "inductor")
        table = {"agreement": compile_agreement(prior, fast, device)}
        for name in ("sds", "robust_nfsd"):
            report = bench(recipe(name, device, dtype_name, "compile=true"), steps=steps, warmup=5, prior=fast)
            table[f"{name} compiled"] = report
            print(f"  {name} compiled: {report['steps_per_second']} steps/s, floor_ratio {report['floor_ratio']}",
                  flush=True)
        return table

    section("bench_sd21_compiled", compiled)
    section("half_precision", lambda: check_half_precision(device, args.tiny))

    def scenes():
        table = {}
        sets = () if args.tiny else ("parameterization.render_size=64",)
        for name in ("nerf_robust_nfsd", "nerf_latent_robust_nfsd", "texture_robust_nfsd"):
            report = bench(recipe(name, device, dtype_name, *sets), steps=steps, warmup=3, prior=prior)
            table[name] = report
            print(f"  {name}: {report['steps_per_second']} steps/s, renderer {report.get('renderer_ms')}, "
                  f"peak {report['peak_memory_mb']} MiB", flush=True)
        return table

    section("bench_3d", scenes)
    prior = None  # free the SD model before SDXL loads (the closures above have run)
    if not args.tiny:
        def sdxl():
            xl = build_sdxl(device, dtype)
            report = bench(recipe("sds", device, dtype_name), steps=max(10, steps // 2), warmup=3, prior=xl)
            return {"sds eager 1024px": report}

        section("bench_sdxl", sdxl)
    results["seconds"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
