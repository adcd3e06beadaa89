"""Miniatures of every supported model family, saved as diffusers pipeline folders.

Each is built from arguments with the family's real component classes and config keys,
scaled down (as diffusers' own pipeline tests build theirs) and random weights, then
``save_pretrained`` so that ``model_index.json`` detection is exercised. Tokenizers are
offline: the shipped shapes CLIP tokenizer, and a small T5-style word-level tokenizer made
with the ``tokenizers`` library. Geometry: 64 × 64 images for the latent families (VAE
factor 8, 8 × 8 latents), 16 × 16 for IF (pixel space). The flow-matching families (SD3,
FLUX.1-dev, FLUX.1-schnell: ``FLOW_BUILDERS``) have the same geometry; their default
resolution (1024) is their pipelines', so tests set 64.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdsctl.models import SHAPES_PRIOR

CLIP_WIDTH = 32
IF_SIZE = 16
WORDS = ("a red green blue yellow circle square triangle star on background white black dark "
         "unrealistic blurry low quality out of focus ugly contrast dull resolution gloomy , -").split()


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(SHAPES_PRIOR / "tokenizer"))


def clip_text_encoder(tokenizer, cls_name: str = "CLIPTextModel", projection_dim: int | None = None):
    import transformers
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        hidden_size=CLIP_WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu", projection_dim=projection_dim or CLIP_WIDTH,
    )
    return getattr(transformers, cls_name)(config)


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4, sample_size=64, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def sd(out: Path, *, prediction_type: str = "epsilon") -> Path:
    """SD 1.x (ε) or, with ``prediction_type="v_prediction"`` and linear projections, SD 2.x."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    v2 = prediction_type == "v_prediction"
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_WIDTH, norm_num_groups=4, attention_head_dim=(2, 4) if v2 else 2,
        use_linear_projection=v2,
    )
    tok = clip_tokenizer()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_text_encoder(tok), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def sdxl(out: Path) -> Path:
    """SDXL: two CLIP encoders (the second with a projection), the UNet's text_time added embedding."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + CLIP_WIDTH,  # 6 time ids × 8 + the pooled width
        cross_attention_dim=2 * CLIP_WIDTH,  # both encoders' hidden states, concatenated
    )
    tok = clip_tokenizer()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip_text_encoder(tok),
        text_encoder_2=clip_text_encoder(tok, "CLIPTextModelWithProjection"),
        tokenizer=tok, tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def t5_tokenizer():
    """A T5 tokenizer (a ``tokenizers`` Unigram model: pad 0, eos 1, unk 2, ``</s>`` appended) over ``WORDS``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)


def deepfloyd_if(out: Path) -> Path:
    """IF stage I: T5 encoder, a pixel-space UNet with learned variance (out = 2 × in channels)."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                           pad_token_id=0, eos_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=IF_SIZE, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=16, encoder_hid_dim=32, encoder_hid_dim_type="text_proj", addition_embed_type="text",
        addition_embed_type_num_heads=2,
        attention_head_dim=4, norm_num_groups=4, resnet_time_scale_shift="scale_shift", act_fn="gelu",
        only_cross_attention=False,
    )
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                              prediction_type="epsilon",
                              thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0)
    pipe = IFPipeline(tokenizer=tok, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def t5_encoder(tok, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=width, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                   pad_token_id=0, eos_token_id=1))


def flow_vae():
    """The VAE of the flow families: as :func:`vae`, with a ``shift_factor`` (SD3 and FLUX have one)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4, sample_size=64, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=1.5, shift_factor=0.06, use_quant_conv=False, use_post_quant_conv=False,
    )


def sd3(out: Path) -> Path:
    """SD3: an MMDiT (patch 2), two CLIP encoders with projections and T5, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * CLIP_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16,
    )
    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=flow_vae(),
        text_encoder=clip_text_encoder(tok, "CLIPTextModelWithProjection"), tokenizer=tok,
        text_encoder_2=clip_text_encoder(tok, "CLIPTextModelWithProjection"), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(tok3, 2 * CLIP_WIDTH), tokenizer_3=tok3,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def flux(out: Path, *, dev: bool = True) -> Path:
    """FLUX.1: dev (guidance embedding, dynamic shift) or schnell (neither); CLIP pooled + T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=CLIP_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=dev, axes_dims_rope=(4, 4, 8),
    )
    # the published configurations: dev shifts with the resolution, schnell not at all
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096) if dev else \
        FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    pipe = FluxPipeline(scheduler=scheduler, vae=flow_vae(), text_encoder=clip_text_encoder(tok), tokenizer=tok,
                        text_encoder_2=t5_encoder(tok2), tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


FLOW_BUILDERS = {
    "sd3": sd3,
    "flux-dev": flux,
    "flux-schnell": lambda out: flux(out, dev=False),
}


BUILDERS = {
    "sd1": sd,
    "sd2": lambda out: sd(out, prediction_type="v_prediction"),
    "sdxl": sdxl,
    "if": deepfloyd_if,
}


def build_all(root: Path, builders: dict | None = None) -> dict[str, Path]:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity_error()
    return {name: build(root / name) for name, build in (builders or BUILDERS).items()}


# ----------------------------------------------------------------------------- single-file checkpoints

_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION_TO_LDM = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out."))


def _renamed(state: dict, old: str, new: str, renames=()) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith(old + "."):
            rest = key[len(old) + 1:]
            for a, b in renames:
                rest = rest.replace(a, b)
            out[f"{new}.{rest}"] = value
    return out


def original_sd_checkpoint(folder: Path) -> dict:
    """The SD 1.x pipeline saved in ``folder`` as one state dict in the original (CompVis /
    model sites') layout -- ``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.transformer.*`` -- the inverse of diffusers' single-file conversion,
    for this miniature's blocks (a test checks the round trip through ``from_single_file``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    u, cfg = unet.state_dict(), unet.config
    ldm = {}
    for new, old in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                     ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        ldm.update(_renamed(u, old, new))
    layers, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    i = 1
    for b in range(levels):
        for j in range(layers):
            ldm.update(_renamed(u, f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", _RESNET_TO_LDM))
            ldm.update(_renamed(u, f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1"))
            i += 1
        if f"down_blocks.{b}.downsamplers.0.conv.weight" in u:
            ldm.update(_renamed(u, f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{i}.0.op"))
            i += 1
    ldm.update(_renamed(u, "mid_block.resnets.0", "middle_block.0", _RESNET_TO_LDM))
    ldm.update(_renamed(u, "mid_block.attentions.0", "middle_block.1"))
    ldm.update(_renamed(u, "mid_block.resnets.1", "middle_block.2", _RESNET_TO_LDM))
    o = 0
    for b in range(levels):
        for j in range(layers + 1):
            ldm.update(_renamed(u, f"up_blocks.{b}.resnets.{j}", f"output_blocks.{o}.0", _RESNET_TO_LDM))
            attention = _renamed(u, f"up_blocks.{b}.attentions.{j}", f"output_blocks.{o}.1")
            ldm.update(attention)
            if j == layers:
                upsampler = f"output_blocks.{o}.{2 if attention else 1}.conv"
                ldm.update(_renamed(u, f"up_blocks.{b}.upsamplers.0.conv", upsampler))
            o += 1
    out = {f"model.diffusion_model.{k}": v for k, v in ldm.items()}

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    v, n = vae.state_dict(), len(vae.config.down_block_types)
    ldm = {k: v[k] for k in v if k.startswith(("encoder.conv_", "decoder.conv_", "quant_conv", "post_quant_conv"))
           and "norm_out" not in k}
    for part in ("encoder", "decoder"):
        ldm.update(_renamed(v, f"{part}.conv_norm_out", f"{part}.norm_out"))
        for k in (0, 1):
            ldm.update(_renamed(v, f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}",
                                (("conv_shortcut", "nin_shortcut"),)))
        attention = _renamed(v, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION_TO_LDM)
        ldm.update({k: t[:, :, None, None] if t.dim() == 2 else t for k, t in attention.items()})  # 1×1 convs
    for b in range(n):
        ldm.update(_renamed(v, f"encoder.down_blocks.{b}.resnets", f"encoder.down.{b}.block",
                            (("conv_shortcut", "nin_shortcut"),)))
        ldm.update(_renamed(v, f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv"))
        ldm.update(_renamed(v, f"decoder.up_blocks.{b}.resnets", f"decoder.up.{n - 1 - b}.block",
                            (("conv_shortcut", "nin_shortcut"),)))
        ldm.update(_renamed(v, f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{n - 1 - b}.upsample.conv"))
    out.update({f"first_stage_model.{k}": t for k, t in ldm.items()})

    text = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    # the original layout names the CLIP text model's weights text_model.* (transformers 5 dropped that level)
    out.update({f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": t for k, t in text.items()})
    return {k: t.contiguous() for k, t in out.items()}
