"""A model family of the example package: ``ExamplePipeline``, a small text-to-image pipeline
class of its own, and the :class:`~sdsctl.models.Prior` that lets sdsctl distill from it.

A family tells sdsctl how to load the pipeline (``_pipeline_type``), how to embed prompts
(``_encode_prompts``: one row per prompt) and how to call the denoiser (``_denoise``); the base
class does the rest from the pipeline's ``vae`` and ``scheduler`` (noising, ε from the native
prediction, the ᾱ table, the latent space, the resolution checks). Imported by the package's
``register_families`` hook, not at plugin load: it imports torch and diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdsctl.models import SHAPES_PRIOR, Prior


class ExamplePipeline(DiffusionPipeline):
    """A latent text-to-image pipeline: a UNet conditioned on one CLIP text encoder's states."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


class ExamplePrior(Prior):
    family = "example-tiny"
    pipeline_class = "ExamplePipeline"  # model_index.json's _class_name
    space = "latent"

    @classmethod
    def _pipeline_type(cls):
        return ExamplePipeline  # not a diffusers class: the family says where it is

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tokens.input_ids.to(self._text_device()))[0]

    def _denoise(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.denoiser(z_t, t, encoder_hidden_states=embeddings).sample


def build_tiny(folder: Path) -> Path:
    """An ``ExamplePipeline`` folder with a small random UNet of its own; the tokenizer, text
    encoder, VAE and noise schedule are sdsctl's shapes prior's (offline, nothing downloaded)."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel.from_pretrained(SHAPES_PRIOR / "text_encoder")
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, norm_num_groups=8, attention_head_dim=4)
    pipe = ExamplePipeline(unet=unet, vae=AutoencoderKL.from_pretrained(SHAPES_PRIOR / "vae"),
                           text_encoder=text_encoder,
                           tokenizer=CLIPTokenizer.from_pretrained(SHAPES_PRIOR / "tokenizer"),
                           scheduler=DDPMScheduler.from_pretrained(SHAPES_PRIOR / "scheduler"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
