"""Image statistics that mean something on any model: colour, sharpness, structure, change.

The shapes judge knows what an image of its world should look like; these figures do not
need a world. They read one RGB image (float ``[H, W, 3]`` in [0, 1], or anything
:func:`as_array` takes) and are what ``sdsctl doctor`` and ``sdsctl compare`` use on any
model:

* ``saturation``: mean HSV saturation;
* ``colorfulness``: Hasler & Süsstrunk's colourfulness, "Measuring colourfulness in natural
  images" (2003), σ_rgyb + 0.3·μ_rgyb on the [0, 1] scale (×255 gives the paper's numbers);
* ``clipped``: share of pixels with a channel at 0 or 1 (within 1/100): score distillation
  at a high guidance scale drives colours against the ends of the range (over-saturation);
* ``sharpness``: how steep the strongest edges are: the mean of the steepest 6 % of colour
  gradients over the image's colour range (p2..p98), so it does not grow with contrast.
  Clean renders of the shapes world give 0.34-0.50; on the
  shapes prior, robust NFSD's results 0.31-0.34, SDS at CFG 7.5 (over-smooth)
  0.27-0.28 (``docs/compare.md``);
* ``structure``: the share of the image's colour variance that survives a 8×8 box
  downsampling -- near 1 for a few large regions (a shape on a background), low for
  pixel noise (the decoded Gaussian start of a run);
* ``two_tone``: the share of the colour variance explained by the best split into two
  colours (2-means started from the border's median): near 1 for one object on a plain
  background, lower for many blobs of colour (the decoded Gaussian start of a run);
* :func:`change`: mean absolute difference of two images (convergence).
"""

from __future__ import annotations

import numpy as np

LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


def as_array(image) -> np.ndarray:
    """A float32 ``[H, W, 3]`` array in [0, 1] from a path, a PIL image, an array or a ``[3, H, W]`` tensor."""
    from PIL import Image

    if isinstance(image, (str,)) or hasattr(image, "is_file"):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if hasattr(image, "detach"):
        t = image.detach().float().cpu()
        if t.dim() == 4:
            t = t[0]
        image = t.permute(1, 2, 0).numpy()
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.clip(np.asarray(image, dtype=np.float32), 0, 1)


def saturation(x: np.ndarray) -> float:
    mx, mn = x.max(-1), x.min(-1)
    return float(np.where(mx > 1e-3, (mx - mn) / np.maximum(mx, 1e-3), 0).mean())


def colorfulness(x: np.ndarray) -> float:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def clipped(x: np.ndarray) -> float:
    return float(((x >= 0.99) | (x <= 0.01)).any(-1).mean())


def sharpness(x: np.ndarray) -> float:
    gy, gx = np.gradient(x, axis=(0, 1))
    g = np.sqrt((gx**2 + gy**2).sum(-1)).ravel()
    spread = float(np.linalg.norm(np.percentile(x.reshape(-1, 3), 98, 0) - np.percentile(x.reshape(-1, 3), 2, 0)))
    if spread < 1e-3:
        return 0.0
    k = max(8, int(0.06 * g.size))
    return float(np.sort(g)[-k:].mean() / spread)


def structure(x: np.ndarray, cells: int = 8) -> float:
    h, w = x.shape[:2]
    fh, fw = max(1, h // cells), max(1, w // cells)
    crop = x[: fh * cells, : fw * cells]
    coarse = crop.reshape(cells, fh, cells, fw, 3).mean(axis=(1, 3))
    total = float(crop.reshape(-1, 3).var(0).sum())
    return float(coarse.reshape(-1, 3).var(0).sum() / total) if total > 1e-8 else 0.0


def two_tone(x: np.ndarray) -> float:
    pix = x.reshape(-1, 3)
    total = float(((pix - pix.mean(0)) ** 2).sum())
    if total < 1e-8:
        return 0.0
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    a = np.median(border, 0)
    b = pix[np.argmax(((pix - a) ** 2).sum(1))]
    for _ in range(8):
        near_a = ((pix - a) ** 2).sum(1) <= ((pix - b) ** 2).sum(1)
        if near_a.all() or not near_a.any():
            break
        a, b = pix[near_a].mean(0), pix[~near_a].mean(0)
    within = float(np.minimum(((pix - a) ** 2).sum(1), ((pix - b) ** 2).sum(1)).sum())
    return 1.0 - within / total


def stats(image) -> dict[str, float]:
    """Every statistic above, for one image."""
    x = as_array(image)
    return {
        "saturation": saturation(x),
        "colorfulness": colorfulness(x),
        "clipped": clipped(x),
        "sharpness": sharpness(x),
        "structure": structure(x),
        "two_tone": two_tone(x),
        "brightness": float((x @ LUMA).mean()),
    }


def change(a, b) -> float:
    """Mean absolute difference of two images of the same size, per channel in [0, 1]."""
    return float(np.abs(as_array(a) - as_array(b)).mean())
