"""The one image writer, the contact sheet, and the terminal preview.

Images inside sdsctl are float RGB tensors ``[3, H, W]`` in [0, 1]. They are quantized to
8 bits in one place (:func:`to_pil`) and written as PNG without metadata, so the same pixels
always give the same bytes.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdsctl.engine.rundir import atomic_write


def to_pil(image: torch.Tensor) -> Image.Image:
    """A float RGB ``[3, H, W]`` tensor in [0, 1] as an 8-bit PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_image(image: torch.Tensor | Image.Image, path: Path) -> None:
    """Write an image as PNG, atomically."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    atomic_write(Path(path), png_bytes(pil))


def view_copy(image: torch.Tensor | Image.Image, size: int) -> Image.Image:
    """``image`` scaled so that its longer side is ``size``, for looking at: by whole-number
    factors with nearest-neighbour (a 64×64 image becomes 8×8 blocks per pixel; nothing is
    invented between pixels), by Lanczos otherwise."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    scale = size / max(pil.size)
    new = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    whole = scale >= 1 and float(scale).is_integer()
    return pil.resize(new, Image.Resampling.NEAREST if whole else Image.Resampling.LANCZOS)


def save_view(image: torch.Tensor | Image.Image, path: Path, size: int) -> None:
    """Write :func:`view_copy` of ``image`` as PNG, atomically (``final_512.png``)."""
    save_image(view_copy(image, size), path)


def font(size: int):
    """PIL's default font at ``size`` px (one bitmap size on Pillow < 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def picture_label(path: Path) -> str:
    """``step_000020`` → step 20; a 3D view ``az045_el15`` → az 45° el 15°; else the file's stem."""
    stem = path.stem
    if stem.startswith("step_") and stem.split("_")[1].isdigit():
        return f"step {int(stem.split('_')[1])}"
    view = re.fullmatch(r"az(\d+)_el(-?\d+)(.*)", stem)
    return f"az {int(view[1])}° el {int(view[2])}°{view[3].replace('_', ' ')}" if view else stem


def contact_sheet(paths: list[Path], thumb: int = 128, gap: int = 2, labels: bool = False) -> Image.Image | None:
    """The images at ``paths`` in a near-square grid, in order (None if there are none).

    Small images are enlarged to ``thumb`` by whole-number factors (nearest-neighbour), larger
    ones reduced; with ``labels`` each is captioned with its step (``step_000020.png`` → step 20)."""
    if not paths:
        return None
    from PIL import ImageDraw

    images = [Image.open(p).convert("RGB") for p in paths]
    native = max(max(im.size) for im in images)
    size = native * max(1, thumb // native) if native < thumb else min(thumb, native)
    label_h = 16 if labels else 0
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_h = size + label_h
    sheet = Image.new("RGB", (cols * size + (cols - 1) * gap, rows * cell_h + (rows - 1) * gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet) if labels else None
    small = font(12) if labels else None
    for i, (im, path) in enumerate(zip(images, paths)):
        if im.size != (size, size):
            enlarge = size > max(im.size) and size % max(im.size) == 0
            im = im.resize((size, size), Image.Resampling.NEAREST if enlarge else Image.Resampling.BOX)
        x, y = (i % cols) * (size + gap), (i // cols) * (cell_h + gap)
        sheet.paste(im, (x, y))
        if draw is not None:
            draw.text((x + 2, y + size + 2), picture_label(path), fill=(0, 0, 0), font=small)
    return sheet


def half_blocks(image: torch.Tensor | Image.Image, width: int = 32):
    """A ``rich`` Text drawing the image with '▀': the foreground colour is the upper pixel,
    the background the lower one, so each character shows two pixels stacked."""
    from rich.style import Style
    from rich.text import Text

    pil = image if isinstance(image, Image.Image) else to_pil(image)
    height = max(2, round(width * pil.height / pil.width / 2) * 2)
    pixels = np.asarray(pil.resize((width, height), Image.Resampling.BOX))
    text = Text()
    for y in range(0, height, 2):
        for x in range(width):
            top, bottom = pixels[y, x], pixels[y + 1, x]
            text.append("▀", Style(color=f"rgb({top[0]},{top[1]},{top[2]})",
                                   bgcolor=f"rgb({bottom[0]},{bottom[1]},{bottom[2]})"))
        if y + 2 < height:
            text.append("\n")
    return text
