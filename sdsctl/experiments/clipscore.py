"""CLIP score of an image against its prompt, from a local CLIP folder (``--clip DIR``).

CLIPScore as torchmetrics and most papers report it: ``max(100 · cos(E_I(image), E_T(prompt)), 0)``
with CLIP's image and text embeddings (Hessel et al., "CLIPScore", 2021, without their
w = 2.5 rescaling). The folder is what ``transformers`` saves for a ``CLIPModel``
(``config.json``, the weights, the tokenizer files and ``preprocessor_config.json``), e.g.
``hf download openai/clip-vit-base-patch32 --local-dir DIR``. The model loads once per
comparison; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdsctl.errors import SdsctlError


class ClipScorer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise SdsctlError(f"--clip {folder}: no CLIP model there (no config.json); give the folder of a "
                              "transformers CLIPModel, e.g. `hf download openai/clip-vit-base-patch32 --local-dir DIR`")
        try:
            from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

            self.model = CLIPModel.from_pretrained(str(folder)).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
            self.processor = CLIPImageProcessor.from_pretrained(str(folder))
        except Exception as exc:
            raise SdsctlError(f"--clip {folder}: cannot load a CLIP model, tokenizer and image processor "
                              f"from it ({type(exc).__name__}: {exc}); it must hold a transformers CLIPModel "
                              "with its tokenizer and preprocessor_config.json") from exc

    @torch.no_grad()
    def score(self, image_path: Path, prompt: str) -> float:
        from PIL import Image

        with Image.open(image_path) as im:
            pixels = self.processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
        img = self.model.get_image_features(pixel_values=pixels)
        txt = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
        return max(100.0 * cos, 0.0)
