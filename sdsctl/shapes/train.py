"""Training of the embedded shapes prior: a VAE, then a text-conditioned UNet on its latents.

The recipe of the shipped prior, nothing else: ``TrainConfig()`` is what ``sdsctl
train-shapes`` runs and what ``sdsctl/shapes/prior/`` was trained with. Four stages, each
resumable from ``<workdir>/checkpoint.pt`` (written atomically every ``checkpoint_every``
steps):

1. ``vae``: an ``AutoencoderKL`` (64x64 -> 4x8x8). Each batch of world images is topped up
   with forced-degraded ones (one of each kind in turn), so blur and noise have a reason
   to stay in the latents. It is also trained off the data manifold, because the RGB
   hash-grid parameterization (EHC) back-propagates through the encoder from images that
   are not yet renders: a quarter of the world images are colour-shifted or blended with
   another and reconstructed as they are, and a Jacobian penalty on the encoder's response
   to high-pass noise, relative to its latents' spread, keeps it smooth on the fine
   patterns the world never has (the frequencies that blur changes are left free).
2. ``decoder``: the encoder is final, so the decoder alone is fine-tuned (L1 + L2 + L1 on
   image gradients) on the same kind of batches.
3. ``latents``: the world is rendered once, encoded to scaled latents and the captions
   tokenized; the VAE's ``scaling_factor`` is set to 1/std of the latents.
4. ``prior``: ``UNet2DConditionModel`` + ``CLIPTextModel`` trained jointly from scratch with
   the epsilon-prediction loss under SD's scaled-linear ``DDPMScheduler``, with caption
   dropout for classifier-free guidance; the exported weights are an EMA of the trained ones.

Then :meth:`Trainer.export` writes a standard ``StableDiffusionPipeline`` folder
(safetensors). The experiments measured against this recipe (other regularizers, an
adversarial stage, grain codes, decoder inversion, ...) and the commit where their code
can still be read are in ``docs/shapes-prior.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sdsctl.shapes import tokenizer as shapes_tokenizer
from sdsctl.shapes import world

ProgressFn = Callable[[str, int, int, dict], None]

#: the stages in order; a checkpoint's ``stage`` is the one to run next (``done`` at the end)
STAGES = ("vae", "decoder", "latents", "prior")


@dataclasses.dataclass
class TrainConfig:
    """The defaults train the shipped prior (``sdsctl train-shapes`` with no options)."""

    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    jacobian_weight: float = 5.0
    jacobian_share: int = 4  # penalty on 1/share of each batch (one extra encoder pass)
    vae_degraded_extra: int = 6  # images per VAE batch forced to be degraded, so degradations stay representable
    decoder_steps: int = 600
    decoder_lr: float = 3e-4
    n_images: int = 60_000
    prior_steps: int = 10_000
    prior_batch: int = 64
    prior_lr: float = 5e-4
    caption_dropout: float = 0.3
    ema_decay: float = 0.999  # the exported UNet and text encoder are an EMA of the weights
    checkpoint_every: int = 250
    device: str = "cpu"
    # model sizes
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 64
    text_layers: int = 3

    def __post_init__(self):
        if not 0 <= self.vae_degraded_extra <= self.vae_batch // 2:
            raise ValueError(f"vae_degraded_extra must be between 0 and half of vae_batch ({self.vae_batch // 2})")

    @classmethod
    def smoke(cls, **kw) -> "TrainConfig":
        """A few steps of every stage on a small world (for tests and ``train-shapes --smoke``)."""
        base = dict(vae_steps=3, vae_batch=4, vae_degraded_extra=1, decoder_steps=2, n_images=64, prior_steps=3,
                    prior_batch=8, checkpoint_every=2)
        return cls(**{**base, **kw})


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, sample_size=world.IMAGE_SIZE, scaling_factor=1.0,
        norm_num_groups=16,
    )


def build_text_encoder(cfg: TrainConfig, vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4,
        max_position_embeddings=shapes_tokenizer.MAX_LENGTH, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, projection_dim=cfg.text_width,
    )
    return CLIPTextModel(config)


def build_unet(cfg: TrainConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=16,
    )


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------- utilities

def _atomic_save(obj, path: Path) -> None:
    import io

    from sdsctl.engine.rundir import atomic_write

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def _optimizer_step(loss, opt, sched, params) -> None:
    """Backward, clip the gradient norm to 1, step the optimizer and its schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """NHWC float [0, 1] -> NCHW float [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2 - 1


# ----------------------------------------------------------------------------- losses

def _shift_or_blend(x: torch.Tensor, other: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Off-manifold images in [-1, 1] to reconstruct as they are: per-channel gain and offset,
    or a blend with another image (what an RGB parameterization passes through mid-run)."""
    n = x.shape[0]
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.4
    shift = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.4
    alpha = torch.rand(n, 1, 1, 1, generator=g)
    blend = alpha * x + (1 - alpha) * other
    use_blend = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    return (use_blend * blend + (1 - use_blend) * (x * gain + shift)).clamp(-1, 1)


def _fine_perturbation(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """High-pass pixel noise the encoder should barely see: white noise minus its 3x3 binomial
    blur (response 1 - cos^2(pi fx) cos^2(pi fy): full at the checkerboard, under 0.35 below
    0.2 cycles/px where blur changes an edge), unit variance, times a random amplitude per
    image (sigma 0.02 to 0.2 in [-1, 1] units).

    Penalizing white noise instead also blinds the encoder to the mid frequencies edges are
    made of, and with them to blur (measured in docs/shapes-prior.md)."""
    sigma = 0.02 + torch.rand(x.shape[0], 1, 1, 1, generator=g) * 0.18
    return sigma * _highpass(torch.randn(x.shape, generator=g))


def _highpass(noise: torch.Tensor) -> torch.Tensor:
    """``noise`` minus its 3x3 binomial blur (circular), scaled so white noise keeps unit variance."""
    k1 = torch.tensor([0.25, 0.5, 0.25])
    kernel = -(k1[:, None] * k1[None, :])
    kernel[1, 1] += 1.0
    kernel = kernel / kernel.pow(2).sum().sqrt()
    c = noise.shape[1]
    padded = F.pad(noise, (1, 1, 1, 1), mode="circular")
    return F.conv2d(padded, kernel.expand(c, 1, 3, 3).to(noise), groups=c)


def _edge_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the image gradients of ``rec`` and ``target``: how steep each edge is.

    L1 + L2 on pixels barely notice an edge drawn one pixel too soft (edges are a few
    percent of the pixels), so without this term a decoder draws every edge at one
    softness and a blurred image comes back like a sharp one."""
    dy, dx = (lambda x: x[..., 1:, :] - x[..., :-1, :]), (lambda x: x[..., :, 1:] - x[..., :, :-1])
    return F.l1_loss(dy(rec), dy(target)) + F.l1_loss(dx(rec), dx(target))


def _decoder_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + L2 + :func:`_edge_loss`: what the decoder stage fits."""
    return F.l1_loss(rec, target) + F.mse_loss(rec, target) + _edge_loss(rec, target)


def _vae_loss(vae, x_in, target, g, jacobian_weight: float = 0.0, jacobian_share: int = 1):
    """Reconstruction (L1 + L2 + tiny KL) plus ``jacobian_weight`` times the encoder's relative
    sensitivity ``|mu(x + d) - mu(x)|^2 / |d|^2 / var(mu)`` to high-pass perturbations d
    (:func:`_fine_perturbation`) of the first 1/``jacobian_share`` of the batch.

    ``var(mu)`` is the spread of the latents across the batch (per element, so constant
    offsets, which carry no information, cannot buy a smaller penalty).

    Returns (loss, logs)."""
    posterior = vae.encode(x_in).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    rec = vae.decode(z).sample
    kl = posterior.kl().mean() / target[0].numel()
    loss = F.l1_loss(rec, target) + F.mse_loss(rec, target) + 1e-4 * kl
    logs = {"rec": float(loss.detach())}
    if jacobian_weight:
        k = max(2, x_in.shape[0] // jacobian_share)
        d = _fine_perturbation(x_in[:k], g).to(x_in.device)
        moved = vae.encode(x_in[:k] + d).latent_dist.mean - posterior.mean[:k]
        ratio = moved.flatten(1).pow(2).sum(1) / d.flatten(1).pow(2).sum(1)
        sensitivity = ratio.mean() / posterior.mean.var(dim=0).mean()
        loss = loss + jacobian_weight * sensitivity
        logs["jac"] = float(sensitivity.detach())
    return loss, logs


# ----------------------------------------------------------------------------- stages

class Trainer:
    """Runs the stages in order, resuming from the work folder's checkpoint."""

    def __init__(self, workdir: Path, cfg: TrainConfig, progress: ProgressFn | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.progress = progress or (lambda *a: None)
        self.ckpt_path = self.dir / "checkpoint.pt"
        self.tok_dir = self.dir / "tokenizer"
        if not (self.tok_dir / "vocab.json").exists():
            shapes_tokenizer.write_tokenizer_files(self.tok_dir)
        self.tokenizer = load_tokenizer(self.tok_dir)
        self.device = torch.device(cfg.device)

    def _token_ids(self, captions: list[str]):
        """The captions as padded token ids of the text encoder's fixed length."""
        return self.tokenizer(captions, padding="max_length", max_length=shapes_tokenizer.MAX_LENGTH,
                              truncation=True, return_tensors="pt").input_ids

    def _load(self) -> dict:
        if self.ckpt_path.exists():
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            if state["stage"] not in (*STAGES, "done"):
                raise ValueError(f"{self.ckpt_path}: stage {state['stage']!r} is not one of this training's "
                                 f"{list(STAGES)}; it was written by an earlier version (see docs/shapes-prior.md)")
            return state
        return {"stage": "vae", "step": 0}

    def run(self) -> Path:
        state = self._load()
        for stage, train in zip(STAGES, (self.train_vae, self.tune_decoder, self.make_latents, self.train_prior)):
            if state["stage"] == stage:
                state = train(state)
        return self.export(state, self.dir / "prior")

    # -- stage 1
    def train_vae(self, state: dict) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg).to(self.device)
        params = list(vae.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.1)
        if "vae" in state:
            vae.load_state_dict(state["vae"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        g = torch.Generator().manual_seed(cfg.seed)
        t0, start = time.time(), state["step"]
        for step in range(start, cfg.vae_steps):
            loss, logs = self._vae_stage_loss(vae, cfg.seed * 1_000_003 + step, g)
            _optimizer_step(loss, opt, sched, params)
            done = step + 1
            self.progress("vae", done, cfg.vae_steps, {**logs, "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
                finished = done == cfg.vae_steps
                state = {"stage": "decoder" if finished else "vae", "step": 0 if finished else done,
                         "vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
                _atomic_save(state, self.ckpt_path)
        return state

    def _vae_stage_loss(self, vae, seed: int, g: torch.Generator):
        """The VAE stage's loss on the batch drawn with ``seed``: world images, the last quarter
        of them colour-shifted or blended, topped up with degraded ones (reconstructed as they
        are), with the Jacobian penalty. Returns (loss, logs)."""
        cfg = self.cfg
        g.manual_seed(seed)
        x, extra = self._topped_up_batch(seed, cfg.vae_degraded_extra)
        quarter = cfg.vae_batch // 4
        x = torch.cat([x[:-quarter], _shift_or_blend(x[-quarter:], x[:quarter], g), extra])
        return _vae_loss(vae, x, x, g, cfg.jacobian_weight, cfg.jacobian_share)

    def _topped_up_batch(self, seed: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``vae_batch - extra`` world images drawn with ``seed`` and ``extra`` forced-degraded ones.

        At the world's own share (a fifth, spread over six kinds) a batch of 32 holds about
        one image of each degradation, too few for the reconstruction loss to keep blur or
        noise in the latents against the Jacobian penalty; the extra ones go through the
        kinds in turn. The extra images are reconstructed as they are, never perturbed.
        """
        imgs, _ = world.sample_batch(seed, self.cfg.vae_batch - extra)
        kinds = list(world.DEGRADATION_WORDS)
        degraded = [world.sample_batch(seed + 500_000_000 + i, 1, degradation=kinds[i % len(kinds)])[0]
                    for i in range(extra)]
        degraded = np.concatenate(degraded) if degraded else imgs[:0]
        return _to_tensor(imgs).to(self.device), _to_tensor(degraded).to(self.device)

    # -- stage 2
    def tune_decoder(self, state: dict) -> dict:
        """Fine-tune the decoder alone on topped-up batches, from the encoder's posterior means.

        The encoder, which fixes the latents the UNet learns, is final, so the decoder can
        still be sharpened: L1 + L2 + an L1 on image gradients (edges). The degraded top-up
        keeps the edge loss from teaching it to sharpen blurred latents.
        """
        cfg = self.cfg
        vae = build_vae(cfg).to(self.device)
        vae.load_state_dict(state["vae"])
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        params = [p for p in vae.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.decoder_steps, 1))
        if "decoder_opt" in state:
            opt.load_state_dict(state["decoder_opt"])
            sched.load_state_dict(state["decoder_sched"])
        t0, start = time.time(), state["step"]
        for step in range(start, cfg.decoder_steps):
            x = torch.cat(self._topped_up_batch(cfg.seed * 1_000_037 + step + 77_777_777, cfg.vae_degraded_extra))
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
            rec = vae.decode(z).sample
            loss = _decoder_loss(rec, x)
            _optimizer_step(loss, opt, sched, params)
            done = step + 1
            self.progress("decoder", done, cfg.decoder_steps,
                          {"rec": float(loss.detach()), "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.decoder_steps:
                finished = done == cfg.decoder_steps
                state = {**state, "stage": "latents" if finished else "decoder", "step": 0 if finished else done,
                         "vae": vae.state_dict(), "decoder_opt": opt.state_dict(), "decoder_sched": sched.state_dict()}
                _atomic_save(state, self.ckpt_path)
        if cfg.decoder_steps == 0:
            state = {**state, "stage": "latents", "step": 0}
        return state

    # -- stage 3
    @torch.no_grad()
    def make_latents(self, state: dict) -> dict:
        """Encode the world once (posterior means) and tokenize its captions."""
        cfg = self.cfg
        vae = build_vae(cfg).to(self.device)
        vae.load_state_dict(state["vae"])
        vae.eval()
        means, captions = [], []
        chunk = 500
        for i in range(0, cfg.n_images, chunk):
            n = min(chunk, cfg.n_images - i)
            imgs, scenes = world.sample_batch(10_000_019 + cfg.seed * 7919 + i, n)
            means.append(vae.encode(_to_tensor(imgs).to(self.device)).latent_dist.mean.cpu())
            captions += [s.caption for s in scenes]
            self.progress("latents", i + n, cfg.n_images, {})
        latents = torch.cat(means)
        scaling = float(1.0 / latents.std())
        state = {"stage": "prior", "step": 0, "vae": state["vae"], "scaling_factor": scaling,
                 "latents": latents * scaling, "input_ids": self._token_ids(captions)}
        _atomic_save(state, self.ckpt_path)
        return state

    # -- stage 4
    def train_prior(self, state: dict) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + 1)
        tok = self.tokenizer
        unet = build_unet(cfg).to(self.device)
        text = build_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id).to(self.device)
        params = list(unet.parameters()) + list(text.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.prior_lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.prior_lr, total_steps=cfg.prior_steps,
                                                    pct_start=0.05)
        if "unet" in state:
            unet.load_state_dict(state["unet"])
            text.load_state_dict(state["text"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        ema = self._ema(params)
        if "ema" in state:
            ema.load_state_dict(state["ema"])
        noise_sched = build_scheduler()
        latents, ids = state["latents"], state["input_ids"]
        empty = self._token_ids([""])
        g = torch.Generator()
        t0, start = time.time(), state["step"]
        for step in range(start, cfg.prior_steps):
            g.manual_seed(cfg.seed * 1_000_033 + step)
            idx = torch.randint(0, latents.shape[0], (cfg.prior_batch,), generator=g)
            drop = torch.rand(cfg.prior_batch, generator=g) < cfg.caption_dropout
            z0 = latents[idx].to(self.device)
            batch_ids = ids[idx].clone()
            batch_ids[drop] = empty
            noise = torch.randn(z0.shape, generator=g).to(self.device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.prior_batch,),
                              generator=g).to(self.device)
            zt = noise_sched.add_noise(z0, noise, t)
            emb = text(batch_ids.to(self.device))[0]
            pred = unet(zt, t, encoder_hidden_states=emb).sample
            loss = F.mse_loss(pred, noise)
            _optimizer_step(loss, opt, sched, params)
            ema.step(params)
            done = step + 1
            self.progress("prior", done, cfg.prior_steps,
                          {"loss": float(loss.detach()), "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.prior_steps:
                state = {**state, "stage": "prior" if done < cfg.prior_steps else "done", "step": done,
                         "unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "ema": ema.state_dict()}
                _atomic_save(state, self.ckpt_path)
        return state

    def _ema(self, params):
        """An exponential moving average of the prior's weights (diffusers' ``EMAModel``, with
        its warm-up so the early, poor weights fade quickly)."""
        from diffusers.training_utils import EMAModel

        return EMAModel(params, decay=self.cfg.ema_decay, use_ema_warmup=True, power=3 / 4)

    # -- export
    def export(self, state: dict, out: Path) -> Path:
        """The pipeline folder of the trained prior, its UNet and text encoder the EMA weights."""
        cfg = self.cfg
        tok = self.tokenizer
        vae = build_vae(cfg)
        vae.load_state_dict(state["vae"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        unet = build_unet(cfg)
        unet.load_state_dict(state["unet"])
        text = build_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)
        text.load_state_dict(state["text"])
        params = list(unet.parameters()) + list(text.parameters())
        ema = self._ema(params)
        ema.load_state_dict(state["ema"])
        ema.copy_to(params)
        return save_pipeline_folder(out, vae=vae, unet=unet, text_encoder=text, tokenizer_dir=self.tok_dir)


def _prefix_text_encoder_keys(path: Path) -> None:
    """Store the text encoder under Stable Diffusion's key names (``text_model.`` prefix).

    transformers 5 saves ``CLIPTextModel`` weights without the prefix; older releases (which
    other score-distillation tools pin) would then load a freshly initialized encoder. Every
    release loads the prefixed names.
    """
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    weights = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}
    save_file(weights, str(path), metadata={"format": "pt"})


def save_pipeline_folder(out: Path, *, vae, unet, text_encoder, tokenizer_dir: Path) -> Path:
    """Write a ``StableDiffusionPipeline`` folder with safetensors weights."""
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    _prefix_text_encoder_keys(out / "text_encoder" / "model.safetensors")
    build_scheduler().save_pretrained(out / "scheduler")
    (out / "tokenizer").mkdir(exist_ok=True)
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / "tokenizer" / f)
    import diffusers

    parts = {"scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "image_encoder": [None, None], **parts}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
