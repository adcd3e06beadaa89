"""The judge of the shapes world: what an image shows, and how clean it looks.

From an image of any size (resized to 64x64) it recovers the background colour, the shape
colour and the shape kind, and measures realism: the *palette error* (mean distance of each
pixel, in RGB units of [0, 1], to the nearer of the two palette colours the image should
contain) and one figure per degradation of the world (edge sharpness, noise, saturation,
contrast, brightness). Because the world is procedural, these judgements are exact on
renders, which is what lets the project measure score distillation without a human.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdsctl.shapes import world

_PALETTE_NAMES = list(world.COLORS)
_PALETTE = np.stack([world.palette(n) for n in _PALETTE_NAMES])  # [8, 3]
_LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


@dataclasses.dataclass
class Judgement:
    background: str
    color: str | None
    shape: str | None
    shape_iou: float  # overlap of the shape mask with the best-fitting ideal shape
    palette_error: float
    sharpness: float  # edge steepness: 1 for a clean anti-aliased edge, lower when blurred
    noise: float  # std of pixels around their region's colour, away from edges
    saturation: float  # mean HSV saturation
    contrast: float  # distance of the two region colours over the palette distance (1 = clean)
    brightness: float  # mean luminance

    def matches(self, prompt: str) -> dict[str, bool]:
        """Which attributes asked for by ``prompt`` the image shows (absent ones count as met)."""
        want = world.parse_prompt(prompt)
        got = {"color": self.color, "shape": self.shape, "background": self.background}
        result = {f"match_{k}": (want[k] is None or want[k] == got[k]) for k in got}
        result["match"] = all(result.values())
        return result

    def to_dict(self, prompt: str | None = None) -> dict:
        out = dataclasses.asdict(self)
        if prompt is not None:
            out.update(self.matches(prompt))
        return out


def outside_world(prompt: str) -> str | None:
    """Why ``prompt`` is not a prompt of the shapes world (None when it is one).

    A prompt of the world uses only the world's words and names a shape or a background;
    for any other ("a photo of a dog") the judge has nothing to compare the image with.
    """
    import re

    vocab = set(world.vocabulary())
    unknown = list(dict.fromkeys(w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in vocab))
    if unknown:
        return f"words outside the shapes world: {', '.join(unknown)}"
    want = world.parse_prompt(prompt)
    if want["shape"] is None and want["background"] is None:
        return "the prompt names no shape and no background of the shapes world"
    return None


def to_array(image) -> np.ndarray:
    """A 64x64x3 float32 array in [0, 1] from anything ``sdsctl.engine.imagestats.as_array`` reads."""
    from PIL import Image

    from sdsctl.engine.imagestats import as_array

    arr = as_array(image)
    if arr.shape[:2] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        pil = Image.fromarray((arr * 255 + 0.5).astype(np.uint8))
        pil = pil.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.Resampling.BOX)
        arr = np.asarray(pil, dtype=np.float32) / 255.0
    return arr


def _nearest(colors: np.ndarray) -> np.ndarray:
    return np.argmin(((colors[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)


def judge(image, prompt: str | None = None) -> Judgement:
    """Judge one image. With a prompt, the palette error is measured against the prompt's colours.

    The two colours are measured first (the border's median, then the median of the pixels
    farthest from it) and only then named by the nearest palette colour, so the shape and
    the realism figures stay meaningful on dark, washed-out or noisy images.
    """
    x = to_array(image)
    n = x.shape[0]
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    c_b = np.median(border, axis=0)
    dist = np.linalg.norm(x - c_b, axis=-1)
    far = np.percentile(dist[3:-3, 3:-3], 98)
    fg_pixels = x[dist > 0.6 * far]
    has_shape = far > 0.06 and len(fg_pixels) >= 0.02 * n * n
    c_f = np.median(fg_pixels, axis=0) if has_shape else c_b

    bg_idx = int(_nearest(c_b))
    fg_order = np.argsort(((c_f - _PALETTE) ** 2).sum(-1))
    fg_idx = int(fg_order[0] if fg_order[0] != bg_idx else fg_order[1])

    want = world.parse_prompt(prompt) if prompt else {}
    ideal_bg = world.palette(want["background"]) if want.get("background") else _PALETTE[bg_idx]
    ideal_fg = world.palette(want["color"]) if want.get("color") else _PALETTE[fg_idx]
    palette_error = float(np.minimum(np.linalg.norm(x - ideal_bg, axis=-1),
                                     np.linalg.norm(x - ideal_fg, axis=-1)).mean())
    background = _PALETTE_NAMES[bg_idx]
    brightness = float((x @ _LUMA).mean())
    if not has_shape:
        return Judgement(background, None, None, 0.0, palette_error, 0.0, float(x.std()), _saturation(x), 0.0,
                         brightness)

    axis = c_f - c_b
    # soft membership: projection of every pixel on the measured background -> shape axis
    p = np.clip(((x - c_b) @ axis) / (axis @ axis), 0, 1)
    shape, iou = _classify(p)
    return Judgement(
        background=background, color=_PALETTE_NAMES[fg_idx], shape=shape, shape_iou=iou,
        palette_error=palette_error, sharpness=_sharpness(p), noise=_noise(x, p),
        saturation=_saturation(x), contrast=_contrast(x, p, ideal_bg, ideal_fg), brightness=brightness,
    )


def _median5(p: np.ndarray) -> np.ndarray:
    """5x5 median filter: removes pixel noise from the membership map, keeps the edges."""
    from numpy.lib.stride_tricks import sliding_window_view

    return np.median(sliding_window_view(np.pad(p, 2, mode="edge"), (5, 5)), axis=(-1, -2))


def _classify(p: np.ndarray) -> tuple[str | None, float]:
    """Fit each ideal shape to the mask's bounding box and keep the best overlap (IoU).

    The membership map is median-filtered first: on noisy images a few stray pixels would
    otherwise stretch the bounding box (shape accuracy on the world's noisy renders: 79 %
    unfiltered, 94 % filtered; clean renders stay at 100 %).
    """
    p = _median5(p)
    mask = p > 0.5
    if mask.sum() < 4:
        return None, 0.0
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    size = float((bottom - top + right - left) / 2)
    best, best_iou = None, -1.0
    for shape in world.SHAPES:
        scene = world.Scene(shape, "red", "blue", (left + right) / 2, (top + bottom) / 2, size)
        cov = world._coverage(scene)
        iou = float(np.minimum(cov, p).sum() / max(np.maximum(cov, p).sum(), 1e-6))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def _sharpness(p: np.ndarray) -> float:
    """Mean of the steepest membership gradients, as many as the edge has pixels.

    An anti-aliased edge goes from 0 to 1 within about one pixel (gradient ~ 0.7-1); blur
    spreads it (a 3-pixel blur gives ~0.15).
    """
    gy, gx = np.gradient(p)
    g = np.hypot(gx, gy).ravel()
    edge = (p > 0.5)
    perimeter = int((edge[1:] != edge[:-1]).sum() + (edge[:, 1:] != edge[:, :-1]).sum())
    k = max(8, perimeter // 2)
    return float(np.sort(g)[-k:].mean() * 2)


def _regions(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels well inside the background and well inside the shape (2 px from any edge)."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(p, 2, mode="edge")
    win = sliding_window_view(padded, (5, 5))
    return win.max(axis=(-1, -2)) < 0.5, win.min(axis=(-1, -2)) > 0.5


def _noise(x: np.ndarray, p: np.ndarray) -> float:
    bg, fg = _regions(p)
    devs = []
    for region in (bg, fg):
        if region.sum() >= 16:
            pix = x[region]
            devs.append(np.abs(pix - np.median(pix, axis=0)).mean() * 1.2533)  # ~ sigma for Gaussian noise
    return float(np.mean(devs)) if devs else 0.0


def _saturation(x: np.ndarray) -> float:
    mx, mn = x.max(-1), x.min(-1)
    return float(np.where(mx > 1e-3, (mx - mn) / np.maximum(mx, 1e-3), 0).mean())


def _contrast(x: np.ndarray, p: np.ndarray, c_b: np.ndarray, c_f: np.ndarray) -> float:
    bg, fg = _regions(p)
    if bg.sum() < 4 or fg.sum() < 4:
        return 0.0
    return float(np.linalg.norm(np.median(x[fg], 0) - np.median(x[bg], 0)) / np.linalg.norm(c_f - c_b))
