"""Full-size architectures end to end through ``sdsctl run``, with random weights.

For each family (``benchmarks/fullsize/<family>.json``: the published model's component
configurations, values copied from its config files), write a diffusers folder with random
weights in the dtype, variant and shards users download (fp16 safetensors with ``variant="fp16"``
for SD and IF, fp16 files for SD3, bf16 for FLUX; 5 GB shards), then measure what a user's first hour meets:

* ``sdsctl model DIR --json`` (the configuration read without weights);
* the load time (``Prior.load``, the recipe's dtype);
* ``sdsctl bench``'s ms/step and floor ratio on ``recipes/sds.yaml``;
* ``sdsctl run recipes/sds.yaml`` and ``recipes/robust_nfsd.yaml`` for a few steps through the
  normal CLI (validation, text encoders released, the loop, the run directory): wall time and
  peak memory (RSS on the CPU, the allocator's peak on CUDA) from ``summary.json``.

The prompts go through the shipped shapes prior's CLIP tokenizer, and a T5 tokenizer built offline
over its words (no tokenizer can be downloaded here); the text encoders keep the published
vocabulary sizes and widths. One JSON
object per family is written to ``--out``::

    python benchmarks/fullsize.py --device cpu --resolution 256 --out fullsize.json

Families (``FAMILIES``): SD 1.5, SD 2.1-base, SDXL base, DeepFloyd IF-I-M, SD3-medium, FLUX.1 dev and
schnell. Where a component does not fit the 24 GB machine (T5-XXL's 4.8 B parameters, FLUX's 12 B
transformer) its file keeps the published widths with fewer layers and says so (``_published_num_layers``).
docs/performance.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
#: every family written, in the order of docs/performance.md's table
FAMILIES = ("sd15", "sd21base", "sdxl", "if_m", "sd3_medium", "flux_dev", "flux_schnell")
SDSCTL = [sys.executable, "-c", "from sdsctl.cli import main; main()"]


#: the component class where a family's file does not name one (``_class_name``)
DEFAULT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                   "text_encoder_2": "CLIPTextModelWithProjection"}


def spec_of(family: str) -> dict:
    """``benchmarks/fullsize/<family>.json``: the published configurations, plus how users download them
    (``dtype``, ``variant``, ``max_shard_size``) and the family's ``native_resolution``."""
    return json.loads((HERE / "fullsize" / f"{family}.json").read_text())


def settings(config: dict) -> dict:
    """A component's configuration without the notes (keys starting with ``_``)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def t5_tokenizer(clip_tokenizer):
    """A T5 tokenizer built offline (a ``tokenizers`` Unigram model: pad 0, eos 1, unk 2) over the shapes
    prior's words: the published SentencePiece model cannot be downloaded here; the encoder keeps T5's
    32,128-row embedding."""
    from transformers import T5Tokenizer

    words = sorted({w.removesuffix("</w>") for w in clip_tokenizer.get_vocab() if w.isalpha()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def component(name: str, config: dict, ids: dict):
    """One pipeline component from its configuration: a diffusers model or scheduler, or a transformers
    text encoder built from its ``config_class`` (a CLIP encoder gets the tokenizer's special ids)."""
    import diffusers
    import transformers

    cls_name = config.get("_class_name") or DEFAULT_CLASSES[name]
    if hasattr(diffusers, cls_name):
        cls = getattr(diffusers, cls_name)
        return cls.from_config(settings(config)) if "Scheduler" in cls_name else cls(**settings(config))
    cls = getattr(transformers, cls_name)
    extra = ids if cls_name.startswith("CLIP") else {}
    return cls(cls.config_class(**settings(config), **extra))


def build(family: str, folder: Path) -> dict:
    """Write ``family``'s pipeline with random weights to ``folder`` in the dtype, variant and shards users
    download; return the parameter count per component."""
    import diffusers
    from transformers import CLIPTokenizer

    from sdsctl.models import SHAPES_PRIOR

    spec = spec_of(family)
    torch.manual_seed(0)
    clip = CLIPTokenizer.from_pretrained(str(SHAPES_PRIOR / "tokenizer"))
    ids = {"bos_token_id": clip.bos_token_id, "eos_token_id": clip.eos_token_id, "pad_token_id": clip.pad_token_id}
    parts = {}
    for name, config in spec.items():
        if isinstance(config, dict):
            parts[name] = component(name, config, ids)
        if name.startswith("text_encoder"):
            t5 = parts[name].__class__.__name__.startswith("T5")
            parts[name.replace("text_encoder", "tokenizer")] = t5_tokenizer(clip) if t5 else clip
    extra = {"StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None,
                                         "requires_safety_checker": False},
             "IFPipeline": {"safety_checker": None, "feature_extractor": None, "watermarker": None,
                            "requires_safety_checker": False},
             "StableDiffusionXLPipeline": {"add_watermarker": False}}.get(spec["pipeline"], {})
    pipe = getattr(diffusers, spec["pipeline"])(**parts, **extra)
    pipe.to(getattr(torch, spec.get("dtype", "float16"))).save_pretrained(
        folder, safe_serialization=True, variant=spec.get("variant", "fp16"),
        max_shard_size=spec.get("max_shard_size", "5GB"))
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items() if hasattr(m, "parameters")}


def measure(family: str, folder: Path, device: str, resolution: int, steps: int, work: Path) -> dict:
    """Every figure in a process of its own, one after another: a full-size model's memory is
    given back between them (SDXL in float32 takes 14 GB of the machine's 24)."""
    spec, dtype = spec_of(family), run_dtype(family, device)
    variant = spec.get("variant", "fp16")
    sets = [f"model={folder}", f"device={device}", f"parameterization.resolution={resolution}", f"dtype={dtype}"]
    sets += ([f"model.variant={variant}"] if variant else []) + spec.get("sets", [])
    set_args = [a for s in sets for a in ("--set", s)]
    described = checked([*SDSCTL, "model", str(folder), "--json", *(["--variant", variant] if variant else [])])
    load = checked([sys.executable, "-c", LOAD, str(folder), device, variant or "", dtype])
    report = json.loads(checked([*SDSCTL, "bench", "sds", *set_args, "--steps", str(max(steps, 2)), "--warmup", "1",
                                 "--json"]).splitlines()[-1])
    runs = {}
    for recipe, extra in (("sds", []), ("robust_nfsd", ["--set", "schedule.warmup_steps=1"])):
        out = work / f"{family}-{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        done = subprocess.run([*SDSCTL, "run", recipe, *set_args, *extra, "--steps", str(steps), "--no-live",
                               "--out", str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            runs[recipe] = {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
            continue
        summary = json.loads((out / "summary.json").read_text())
        runs[recipe] = {"wall_s": round(wall, 1), "loop_s": summary["seconds"],
                        "peak_memory_mb": summary["peak_memory_mb"], "status": summary["status"]}
    return {"model": json.loads(described), "load_s": float(load.split()[-1]),
            "ms_per_step": report["ms_per_step"], "floor_ratio": report["floor_ratio"],
            "bench_peak_memory_mb": report["peak_memory_mb"], "threads": report["threads"], "runs": runs}


def checked(command: list[str]) -> str:
    """``command``'s standard output; on failure, stop with its standard error (what broke, not a traceback of
    ``subprocess``)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[3:] if command[:3] == SDSCTL else command[:2])}: exit {done.returncode}\n"
                 f"{done.stderr[-3000:]}")
    return done.stdout


def run_dtype(family: str, device: str) -> str:
    """The dtype a user runs the family in: its files' (float16, FLUX's bfloat16) on CUDA, float32 on the CPU
    (float16 has few fast CPU kernels; ``resolve_dtype``)."""
    return spec_of(family).get("dtype", "float16") if device == "cuda" else "float32"


#: the load time, in a process of its own: ``Prior.load`` in the run's dtype from the half-precision files
LOAD = """
import sys, time, torch
from sdsctl.models import Prior
start = time.perf_counter()
Prior.load(sys.argv[1], torch.device(sys.argv[2]), getattr(torch, sys.argv[4]), variant=sys.argv[3] or None)
print(round(time.perf_counter() - start, 1))
"""


#: the table's names for the families
NAMES = {"sd15": "SD 1.5", "sd21base": "SD 2.1-base", "sdxl": "SDXL base", "if_m": "DeepFloyd IF-I-M",
         "sd3_medium": "SD3-medium", "flux_dev": "FLUX.1-dev", "flux_schnell": "FLUX.1-schnell"}


def table(results: dict) -> str:
    """docs/performance.md's table from a results file: one row per family."""
    def millions(n: int) -> str:
        return f"{n / 1e6:,.1f} M"

    rows = ["| family (parameters: denoiser / text encoders / VAE) | pixels | load | ms/step (`bench`) | floor_ratio "
            "| peak RSS: sds / robust NFSD | `run` wall time: sds / robust NFSD |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for family, r in results.items():
        # the built modules' counts where this script built them (the headers also count saved
        # buffers: SD3's positional embedding, 56.6 M), else the headers' (``sdsctl model``)
        parameters = {**r["model"]["parameters"], **r.get("parameters", {})}
        denoiser = parameters.get("unet") or parameters.get("transformer")
        encoders = " + ".join(millions(parameters[k]) for k in sorted(parameters) if k.startswith("text_encoder"))
        cut = [k for k, v in spec_of(family).items() if isinstance(v, dict) and any(x.startswith("_published")
                                                                                  for x in v)]
        note = f" ({', '.join(cut)} with fewer layers)" if cut else ""
        vae = f" / {millions(parameters['vae'])}" if "vae" in parameters else ""
        sds, robust = r["runs"]["sds"], r["runs"]["robust_nfsd"]
        rows.append(f"| {NAMES.get(family, family)}{note} ({millions(denoiser)} / {encoders}{vae}) | {r['resolution']} "
                    f"| {r['load_s']:.1f} s | {r['ms_per_step']:,.0f} | {r['floor_ratio']:.3f} "
                    f"| {sds['peak_memory_mb'] / 1000:.1f} GB / {robust['peak_memory_mb'] / 1000:.1f} GB "
                    f"| {sds['wall_s']:.1f} s / {robust['wall_s']:.1f} s |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resolution", type=int, default=None,
                        help="at most this many pixels a side (default: each family's native resolution; IF-I's is 64)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdsctl-fullsize"))
    parser.add_argument("--out", type=Path, default=Path("fullsize.json"))
    parser.add_argument("--table", action="store_true", help="print --out's results as docs/performance.md's table")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.table:
        print(table(results))
        return
    for family in args.families.split(","):
        folder = args.work / family
        if not (folder / "model_index.json").is_file():
            start = time.perf_counter()
            parameters = build(family, folder)
            results.setdefault(family, {})["write_s"] = round(time.perf_counter() - start, 1)
            results[family]["parameters"] = parameters
        spec = spec_of(family)
        resolution = min(args.resolution or spec["native_resolution"], spec["native_resolution"])
        results.setdefault(family, {}).update(
            measure(family, folder, args.device, resolution, args.steps, args.work),
            resolution=resolution, device=args.device,
            dtype=f"{run_dtype(family, args.device)} ({spec.get('dtype', 'float16')} files)",
            machine=f"{os.cpu_count()} CPUs" if args.device == "cpu" else torch.cuda.get_device_name(0))
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(family, json.dumps({k: results[family][k] for k in ("load_s", "ms_per_step", "floor_ratio")}),
              flush=True)


if __name__ == "__main__":
    main()
