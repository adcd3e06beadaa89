"""The one image writer, the contact sheet, and the terminal preview.

Images inside sdsctl are float RGB tensors ``[3, H, W]`` in [0, 1]. They are quantized to
8 bits in one place (:func:`to_pil`) and written as PNG without metadata, so the same pixels
always give the same bytes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .rundir import atomic_write


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


def contact_sheet(paths: list[Path], thumb: int = 128, gap: int = 2) -> Image.Image | None:
    """The images at ``paths`` in a near-square grid, in order (None if there are none)."""
    if not paths:
        return None
    images = [Image.open(p).convert("RGB") for p in paths]
    size = min(thumb, max(max(im.size) for im in images))
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * size + (cols - 1) * gap, rows * size + (rows - 1) * gap), (255, 255, 255))
    for i, im in enumerate(images):
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BOX)
        sheet.paste(im, ((i % cols) * (size + gap), (i // cols) * (size + gap)))
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
