"""Measured checks of a shapes prior: is it faithful to prompts, and do quality words work?

``sdsctl evaluate-prior`` prints the figures the prior is shipped with:

- **fidelity**: one sample for each of the 8 x 7 x 3 (colour, background, shape)
  combinations, 50 DDIM steps, CFG 7.5, judged against its prompt;
- **unconditional**: samples of the empty prompt that show one shape;
- **quality words**: for each degradation word, samples of ``a {word} {color} {shape} ...``
  against the plain caption at the same seeds, compared in the judge's matching figure;
- **encoder robustness**: how far the VAE encoder moves per unit of input perturbation;
- **VAE round trip**: whether blur, noise, darkness and low contrast survive encode -> decode.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from sdsctl.shapes import judge, sampling, world

#: quality word -> (judge figure, expected direction of change vs the plain caption)
QUALITY_CHECKS = {
    "blurry": ("sharpness", -1),
    "noisy": ("noise", +1),
    "oversaturated": ("saturation", +1),
    "low contrast": ("contrast", -1),
    "dark": ("brightness", -1),
}


def all_prompts() -> list[str]:
    return [
        world.CAPTION_TEMPLATE.format(color=c, shape=s, background=b)
        for c, b, s in itertools.product(world.COLORS, world.COLORS, world.SHAPES) if c != b
    ]


def fidelity(pipe, *, seed: int = 0, steps: int = 50, guidance_scale: float = 7.5, limit: int | None = None) -> dict:
    prompts = all_prompts()
    if limit:
        rng = np.random.default_rng(seed)
        prompts = [prompts[i] for i in sorted(rng.choice(len(prompts), limit, replace=False))]
    images = sampling.sample(pipe, prompts, [seed + i for i in range(len(prompts))], steps=steps,
                             guidance_scale=guidance_scale)
    judged = [judge.judge(im, p) for im, p in zip(images, prompts)]
    matches = [j.matches(p) for j, p in zip(judged, prompts)]
    attrs = [m[k] for m in matches for k in ("match_color", "match_shape", "match_background")]
    return {
        "pairs": len(prompts),
        "match_rate": float(np.mean([m["match"] for m in matches])),
        "attribute_rate": float(np.mean(attrs)),
        "median_palette_error": float(statistics.median(j.palette_error for j in judged)),
        "failures": [p for p, m in zip(prompts, matches) if not m["match"]],
        "_images": images,
    }


def unconditional(pipe, *, n: int = 64, seed: int = 1000, steps: int = 50) -> dict:
    images = sampling.sample(pipe, [""] * n, [seed + i for i in range(n)], steps=steps, guidance_scale=1.0)
    judged = [judge.judge(im) for im in images]
    one_shape = [j.shape is not None and j.shape_iou >= 0.7 for j in judged]
    return {"samples": n, "one_shape_rate": float(np.mean(one_shape)), "_images": images}


def quality_words(pipe, *, n: int = 24, seed: int = 2000, steps: int = 50, guidance_scale: float = 7.5) -> dict:
    rng = np.random.default_rng(seed)
    base = [all_prompts()[i] for i in rng.choice(len(all_prompts()), n, replace=False)]
    seeds = [seed + i for i in range(n)]
    plain = [judge.judge(im, p)
             for im, p in zip(sampling.sample(pipe, base, seeds, steps=steps, guidance_scale=guidance_scale), base)]
    rows = {}
    for word, (figure, sign) in QUALITY_CHECKS.items():
        prompts = [f"a {word} " + p[2:] for p in base]
        images = sampling.sample(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
        judged = [judge.judge(im, p) for im, p in zip(images, prompts)]
        diffs = [sign * (getattr(j, figure) - getattr(q, figure)) for j, q in zip(judged, plain)]
        rows[word] = {
            "figure": figure,
            "plain_median": float(statistics.median(getattr(q, figure) for q in plain)),
            "word_median": float(statistics.median(getattr(j, figure) for j in judged)),
            "right_direction_rate": float(np.mean([d > 0 for d in diffs])),
            "shape_match_rate": float(np.mean([j.shape == world.parse_prompt(p)["shape"]
                                               for j, p in zip(judged, prompts)])),
        }
    return {"pairs_per_word": n, "words": rows}


@torch.no_grad()
def encoder_robustness(vae, *, n: int = 256, seed: int = 3000, sigma: float = 0.05) -> dict:
    """Latent change per unit of input perturbation, ``|E(x + d) - E(x)| / |d|``.

    Latents are the posterior means times the latent scale (unit variance), images in [0, 1].
    ``scale`` is 1/std of the clean latents (the VAE's own ``scaling_factor`` when set).
    Perturbations: white pixel noise, one colour shift per image, a +-sigma checkerboard, and
    high-pass noise (white noise minus its 3x3 blur: the fine patterns the world never has,
    what the RGB hash grid's artefacts are made of; the frequencies a blur changes are spared).
    """
    from sdsctl.shapes.train import _highpass

    imgs, _ = world.sample_batch(seed, n, degradation=False)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(seed)

    def enc(batch):
        return vae.encode(batch * 2 - 1).latent_dist.mean

    z = enc(x)
    scale = 1.0 / float(z.std())
    out = {"latent_scale": scale}
    perturbations = {
        "pixel_noise": sigma * torch.randn(x.shape, generator=g),
        "colour_shift": sigma * torch.randn(n, 3, 1, 1, generator=g).expand_as(x),
        "checkerboard": sigma * ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2 * 2 - 1).float().expand_as(x),
        "highpass_noise": sigma * _highpass(torch.randn(x.shape, generator=g)),
    }
    for name, d in perturbations.items():
        dz = (enc(x + d) - z) * scale
        out[name] = float((dz.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).median())
    return out


#: degradation -> the judge figure its round trip through the VAE is read by
ROUND_TRIP_FIGURES = {"blur": "sharpness", "noise": "noise", "dark": "brightness", "lowcontrast": "contrast"}


@torch.no_grad()
def vae_round_trip(vae, *, n: int = 64, seed: int = 4000, strength: float = 0.5) -> dict:
    """Does the VAE keep each degradation? The judge's matching figure (median over ``n``
    scenes) of clean and degraded renders, before and after encode -> decode.

    A quality word can only work if the VAE draws what it names: if blurred renders come back
    as sharp as clean ones, no UNet can make ``blurry`` samples blurrier.
    """
    import dataclasses

    from sdsctl.shapes.train import _to_tensor

    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, degradation=False) for _ in range(n)]

    def judged(kind: str | None) -> tuple[list, list]:
        """Judgements of the renders and of their reconstructions."""
        imgs = np.stack([world.render(dataclasses.replace(s, degradation=kind, strength=strength if kind else 0.0),
                                      np.random.default_rng(seed + i), 1 / 255) for i, s in enumerate(scenes)])
        rec = vae.decode(vae.encode(_to_tensor(imgs)).latent_dist.mean).sample
        rec = ((rec + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return [judge.judge(im) for im in imgs], [judge.judge(im) for im in rec]

    def median(judgements: list, figure: str) -> float:
        return float(statistics.median(getattr(j, figure) for j in judgements))

    clean_in, clean_out = judged(None)  # once: every figure is read from the same judgements
    out = {}
    for kind, figure in ROUND_TRIP_FIGURES.items():
        bad_in, bad_out = judged(kind)
        out[kind] = {"figure": figure, "clean_in": median(clean_in, figure), "clean_out": median(clean_out, figure),
                     "degraded_in": median(bad_in, figure), "degraded_out": median(bad_out, figure)}
    return out


def evaluate(folder: str | Path, *, quick: bool = False, out: Path | None = None) -> dict:
    """All checks of a shapes prior; with ``out``, also ``report.json`` and the sample grids there."""
    pipe = sampling.load_pipeline(folder)
    report = {
        "fidelity": fidelity(pipe, limit=24 if quick else None),
        "unconditional": unconditional(pipe, n=16 if quick else 100),
        "quality_words": quality_words(pipe, n=8 if quick else 24),
        "encoder_robustness": encoder_robustness(pipe.vae),
        "vae_round_trip": vae_round_trip(pipe.vae, n=16 if quick else 64),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(report["fidelity"]["_images"], out / "fidelity.png")
        save_grid(report["unconditional"]["_images"], out / "unconditional.png")
    for section in report.values():
        section.pop("_images", None)
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def save_grid(images: np.ndarray, path: Path, columns: int = 12) -> None:
    from sdsctl.engine.images import save_image

    n = len(images)
    rows = -(-n // columns)
    h, w = images.shape[1:3]
    grid = np.ones((rows * h, columns * w, 3), dtype=np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    save_image(torch.from_numpy(grid).permute(2, 0, 1), path)
