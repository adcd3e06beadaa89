"""Full-size architectures end to end through ``sdsctl run``, with random weights.

For each family (``benchmarks/fullsize/<family>.json``: the published model's component
configurations, values copied from its config files), write a diffusers folder with random
weights in the dtype and variant users download (fp16 safetensors, ``variant="fp16"``, sharded
over 5 GB like the published UNets), then measure what a user's first hour meets:

* ``sdsctl model DIR --json`` (the configuration read without weights);
* the load time (``Prior.load``, the recipe's dtype);
* ``sdsctl bench``'s ms/step and floor ratio on ``recipes/sds.yaml``;
* ``sdsctl run recipes/sds.yaml`` and ``recipes/robust_nfsd.yaml`` for a few steps through the
  normal CLI (validation, text encoders released, the loop, the run directory): wall time and
  peak memory (RSS on the CPU, the allocator's peak on CUDA) from ``summary.json``.

The prompts go through the shipped shapes prior's CLIP tokenizer (offline: no tokenizer can be
downloaded here); the text encoders keep the published vocabulary size and widths. One JSON
object per family is written to ``--out``::

    python benchmarks/fullsize.py --families sd15,sd21base,sdxl --device cpu --resolution 256 --out fullsize.json

Families written so far: SD 1.5, SD 2.1-base, SDXL base (docs/performance.md has the table).
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
SDSCTL = [sys.executable, "-c", "from sdsctl.cli import main; main()"]


def build(family: str, folder: Path) -> dict:
    """Write ``family``'s pipeline with random weights to ``folder`` (fp16 variant, sharded)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdsctl.models import SHAPES_PRIOR

    spec = json.loads((HERE / "fullsize" / f"{family}.json").read_text())
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(SHAPES_PRIOR / "tokenizer"))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    parts = {"unet": diffusers.UNet2DConditionModel(**spec["unet"]),
             "vae": diffusers.AutoencoderKL(**spec["vae"]),
             "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"], **ids)),
             "tokenizer": tokenizer}
    if "text_encoder_2" in spec:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"], **ids))
        parts["tokenizer_2"] = tokenizer
    scheduler = dict(spec["scheduler"])
    parts["scheduler"] = getattr(diffusers, scheduler.pop("_class_name")).from_config(scheduler)
    pipeline = getattr(diffusers, spec["pipeline"])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if spec["pipeline"] == "StableDiffusionPipeline" else {}
    pipe = pipeline(**parts, **extra)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16", max_shard_size="5GB")
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items() if hasattr(m, "parameters")}


def measure(family: str, folder: Path, device: str, resolution: int, steps: int, work: Path) -> dict:
    """Every figure in a process of its own, one after another: a full-size model's memory is
    given back between them (SDXL in float32 takes 14 GB of the machine's 24)."""
    sets = [f"model={folder}", "model.variant=fp16", f"device={device}", f"parameterization.resolution={resolution}"]
    set_args = [a for s in sets for a in ("--set", s)]
    described = subprocess.run([*SDSCTL, "model", str(folder), "--json", "--variant", "fp16"], capture_output=True,
                               text=True, check=True)
    load = subprocess.run([sys.executable, "-c", LOAD, str(folder), device], capture_output=True, text=True, check=True)
    report = json.loads(subprocess.run([*SDSCTL, "bench", "sds", *set_args, "--steps", str(steps), "--warmup", "1",
                                        "--json"], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
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
    return {"model": json.loads(described.stdout), "load_s": float(load.stdout.split()[-1]),
            "ms_per_step": report["ms_per_step"], "floor_ratio": report["floor_ratio"],
            "bench_peak_memory_mb": report["peak_memory_mb"], "threads": report["threads"], "runs": runs}


#: the load time, in a process of its own: ``Prior.load`` in float32 from the fp16 files
LOAD = """
import sys, time, torch
from sdsctl.models import Prior
start = time.perf_counter()
Prior.load(sys.argv[1], torch.device(sys.argv[2]), torch.float32, variant="fp16")
print(round(time.perf_counter() - start, 1))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15,sd21base,sdxl")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resolution", type=int, default=None, help="default: the family's native one")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdsctl-fullsize"))
    parser.add_argument("--out", type=Path, default=Path("fullsize.json"))
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for family in args.families.split(","):
        folder = args.work / family
        if not (folder / "model_index.json").is_file():
            start = time.perf_counter()
            parameters = build(family, folder)
            results.setdefault(family, {})["write_s"] = round(time.perf_counter() - start, 1)
            results[family]["parameters"] = parameters
        spec = json.loads((HERE / "fullsize" / f"{family}.json").read_text())
        resolution = args.resolution or spec["unet"]["sample_size"] * 8
        results.setdefault(family, {}).update(
            measure(family, folder, args.device, resolution, args.steps, args.work),
            resolution=resolution, device=args.device, dtype="float32 (fp16 files)",
            machine=f"{os.cpu_count()} CPUs" if args.device == "cpu" else torch.cuda.get_device_name(0))
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(family, json.dumps({k: results[family][k] for k in ("load_s", "ms_per_step", "floor_ratio")}),
              flush=True)


if __name__ == "__main__":
    main()
