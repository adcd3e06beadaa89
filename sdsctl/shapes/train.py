"""Training of the embedded shapes prior: a VAE, then a text-conditioned UNet on its latents.

Five stages and two optional ones, each resumable from ``<workdir>/checkpoint.pt``
(written atomically every ``checkpoint_every`` steps); the defaults of :class:`TrainConfig`
train the shipped prior:

1. ``vae``: an ``AutoencoderKL`` (64x64 -> 4x8x8). Besides reconstructing world images (each
   batch topped up with one image of each degradation, so blur and noise have a reason to
   stay in the latents) it is trained off the data manifold, because the RGB hash-grid
   parameterization (EHC) back-propagates through the encoder from images that are not yet
   renders. Two regularizers: ``jacobian`` (shipped) reconstructs colour shifts and blends
   of two images as they are and penalizes the encoder's response to fine zero-mean noise
   relative to its latents' spread (high-pass noise by default, white or 2x2-block noise in
   the earlier experiments); ``denoise`` (:meth:`TrainConfig.first_release`) removes fine
   pixel noise (input x + noise, target x) instead. ``augment=False`` trains on world
   images only (the clean-only comparison). Measured in ``docs/shapes-prior.md``: a strong
   penalty on white and 2x2-block noise (:meth:`TrainConfig.jacobian_experiment`) stops
   the latents from carrying blur and pixel noise. (A cycle loss E(D(z)) ~ z was tried and
   dropped: slower reconstruction for no measured gain.) Three measured, off-by-default
   terms aim at blur: ``vae_edge_weight`` (an L1 on image gradients),
   ``vae_probe_weight`` (a :class:`DegradationProbe` must read the degradation from the
   latents) and ``vae_blur_margin`` (:func:`_blur_margin_loss`: the latents of a blurred
   image pushed away from the sharp one's; the only one that keeps blur, at the cost of
   the encoder's smoothness).
2. ``decoder``: the decoder alone is fine-tuned (L1 + L2 + L1 on
   image gradients) on world images and, with ``decoder_topup``, the same forced-degraded ones.
3. ``adversarial`` (``adversarial_steps``, 0 by default): encoder and decoder fine-tuned
   together with the VAE loss plus a :class:`~sdsctl.shapes.adversarial.PatchDiscriminator`;
   measured in ``docs/shapes-prior.md``: it sharpens every edge, blurred ones included.
3b. ``grain`` (``grain_steps``, 0 by default): the decoder alone fine-tuned to draw random
   per-cell codes along the latents' least-used direction as a coarse grey grain
   (``sdsctl/shapes/grain.py``); the latents stage then gives each noisy world image the
   clean scene's latents plus such a code, so ``noisy`` no longer moves the latents that
   carry the shape. With ``grain_anchor_batch`` each batch also has world latents moved off
   the manifold (orthogonally to the code), drawn as the decoder drew them before the
   stage, so learning the grain does not change how it draws sampled latents' other
   deviations. With ``uncond_encoder_latents`` the caption-dropped rows of noisy images
   keep the encoder's latents (no code).
4. ``latents``: the world is rendered once, encoded to scaled latents and the captions
   tokenized; the VAE's ``scaling_factor`` is set to 1/std of the latents.
4b. ``invert`` (``invert_kinds``, off by default; measured in ``docs/shapes-prior.md``): the
   smooth encoder maps a blurred image to nearly the sharp scene's latents, but the decoder
   draws blur from other latents;
   fresh renders of each kind are inverted through the frozen decoder (gradient descent on
   the latents) and stand in for the world's images of that kind, so the UNet learns what
   ``blurry`` looks like while the encoder keeps the smoothness EHC needs. With
   ``invert_operator`` a :class:`LatentOperator` fitted to the inversions displaces each of
   the world's own images of that kind instead (the optimization's fine noise averaged out).
   With ``uncond_encoder_latents`` the caption-dropped rows of those images keep the
   encoder's latents, so the unconditional model never learns the inversions' fine patterns.
5. ``prior``: ``UNet2DConditionModel`` + ``CLIPTextModel`` trained jointly from scratch with
   the epsilon-prediction loss under SD's scaled-linear ``DDPMScheduler``, 30 % caption
   dropout for classifier-free guidance; the exported weights are an EMA of the trained ones.

Then :func:`export` writes a standard ``StableDiffusionPipeline`` folder (safetensors).
``Trainer(..., vae_from=FOLDER)`` starts a fresh work folder at stage 4 with the VAE of an
existing prior (``sdsctl train-shapes --vae-from``): the UNet is retrained, the VAE kept.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import tokenizer as shapes_tokenizer
from . import world

ProgressFn = Callable[[str, int, int, dict], None]


@dataclasses.dataclass
class TrainConfig:
    """The defaults train the shipped prior (``sdsctl train-shapes`` with no options)."""

    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    augment: bool = True
    vae_regularizer: Literal["denoise", "jacobian"] = "jacobian"  # see the module docstring
    jacobian_weight: float = 5.0
    jacobian_share: int = 4  # penalty on 1/share of each batch (one extra encoder pass)
    jacobian_blocks: bool = False  # also penalize 2x2-block noise (the experiment; it erased blur)
    jacobian_highpass: bool = True  # penalize high-pass noise only (frequencies that blur leaves alone are free)
    vae_degraded_extra: int = 6  # images per VAE batch forced to be degraded, so degradations stay representable
    vae_edge_weight: float = 0.0  # L1 on image gradients in the VAE loss (measured in docs/shapes-prior.md; off)
    vae_probe_weight: float = 0.0  # a small CNN must read the degradation kind from the latents (measured in docs/shapes-prior.md; off)
    vae_blur_margin: float = 0.0  # push latents of blur(x) this far (relative to the spread) from x's (measured in docs/shapes-prior.md; 0: off)
    vae_blur_margin_weight: float = 1.0
    vae_blur_pairs: int = 8  # (sharp, blurred) pairs per batch for the margin
    decoder_topup: bool = True  # the decoder stage's batches get the same degraded top-up (keeps blur blurry)
    decoder_steps: int = 600
    decoder_lr: float = 3e-4
    adversarial_steps: int = 0  # encoder + decoder fine-tuned against a PatchDiscriminator (measured in docs/shapes-prior.md)
    adversarial_weight: float = 0.5  # scale of the adaptive weight of the discriminator's term
    adversarial_lr: float = 1e-4
    adversarial_warmup: int = 100  # first steps train the discriminator alone
    grain_steps: int = 0  # decoder fine-tuned to draw grain codes, noisy images' latents coded (sdsctl/shapes/grain.py; 0: off)
    grain_batch: int = 24  # clean scenes with grain codes per batch, besides the decoder stage's batch
    grain_lr: float = 5e-4
    grain_anchor_batch: int = 0  # world latents moved off the manifold (orthogonal to the code), drawn as the decoder drew them before the stage
    grain_anchor_range: tuple[float, float] = (0.05, 0.3)  # rms of those moves, in units of the latents' spread
    n_images: int = 60_000
    invert_kinds: tuple[str, ...] = ()  # degradations whose UNet latents come from inverting the decoder (() : off)
    invert_images: int = 512  # fresh renders inverted per kind; they stand in for the world's images of that kind
    invert_steps: int = 50
    invert_lr: float = 0.1
    invert_batch: int = 32
    invert_tv: float = 0.0  # penalty on the spatial differences of the inversion's latent displacement (smooths it)
    invert_operator: bool = False  # fit a LatentOperator to the inversions and apply it to every world image of the kind
    uncond_encoder_latents: bool = False  # caption-dropped rows of inverted kinds get the encoder's latents of the same renders
    operator_steps: int = 3000
    operator_lr: float = 2e-3
    prior_steps: int = 10_000
    prior_batch: int = 64
    prior_lr: float = 5e-4
    caption_dropout: float = 0.3
    prior_degraded_share: float | None = None  # share of captioned examples with a quality word (None: the world's)
    ema_decay: float = 0.999  # exported UNet and text encoder are an EMA of the weights (0: off)
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
        unknown = [k for k in self.invert_kinds if k not in world.DEGRADATION_WORDS]
        if unknown:
            raise ValueError(f"invert_kinds: unknown degradations {unknown}; the world has {list(world.DEGRADATION_WORDS)}")

    @classmethod
    def first_release(cls, **kw) -> "TrainConfig":
        """The first shipped prior (docs/shapes-prior.md, "How the prior got here"): narrow
        VAE with denoising pairs, no top-up, 8,000 UNet steps, 10 % caption dropout, no EMA."""
        base = dict(vae_regularizer="denoise", jacobian_weight=2.0, jacobian_highpass=False, vae_degraded_extra=0,
                    decoder_topup=False, decoder_steps=800, prior_steps=8000, caption_dropout=0.1, ema_decay=0.0,
                    vae_channels=(16, 32, 64, 64))
        return cls(**{**base, **kw})

    @classmethod
    def candidate(cls, **kw) -> "TrainConfig":
        """The candidate measured before the current prior: mild per-pixel (white) Jacobian
        penalty, no decoder top-up, 8,000 UNet steps at 15 % caption dropout."""
        base = dict(jacobian_weight=2.0, jacobian_highpass=False, decoder_topup=False, prior_steps=8000,
                    caption_dropout=0.15)
        return cls(**{**base, **kw})

    @classmethod
    def jacobian_experiment(cls, **kw) -> "TrainConfig":
        """The strong Jacobian-penalty VAE measured in docs/shapes-prior.md (not shipped)."""
        base = dict(vae_steps=2500, jacobian_weight=5.0, jacobian_blocks=True, jacobian_highpass=False,
                    vae_degraded_extra=0, decoder_topup=False, prior_steps=8000, caption_dropout=0.1, ema_decay=0.0)
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **kw) -> "TrainConfig":
        """A configuration that trains a few steps of every stage (for tests)."""
        base = dict(vae_steps=3, vae_batch=4, vae_degraded_extra=1, ema_decay=0.999, decoder_steps=2, adversarial_steps=2,
                    adversarial_warmup=1, n_images=64, invert_kinds=("blur",), invert_images=3, invert_steps=2,
                    invert_batch=2, uncond_encoder_latents=True, grain_steps=2, grain_batch=2, grain_anchor_batch=1, prior_steps=3, prior_batch=8,
                    checkpoint_every=2)
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


#: the classes :class:`DegradationProbe` reads: 0 for a clean image, then the world's degradations
PROBE_CLASSES = (None, *world.DEGRADATION_WORDS)


class DegradationProbe(torch.nn.Module):
    """Reads from (sampled) latents which degradation an image has, if any.

    Trained with the VAE and then dropped (it is not part of the exported prior). Its
    cross-entropy was meant to give the encoder a reason to keep blur and noise in the
    latents, which the reconstruction loss alone barely rewards; measured in
    docs/shapes-prior.md, it does not: blurred and pixelated renders still read as clean.
    """

    def __init__(self, latent_channels: int = 4, width: int = 32):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(latent_channels, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
        )
        self.head = torch.nn.Linear(width, len(PROBE_CLASSES))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z).mean(dim=(2, 3)))


def probe_label(degradation: str | None) -> int:
    return PROBE_CLASSES.index(degradation)


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

    from ..rundir import atomic_write

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


def _perturb(x: torch.Tensor, other: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``denoise`` pairs (input, target) in [-1, 1]: half fine noise to remove, half colour
    shifts and blends to keep."""
    half = x.shape[0] // 2
    sigma = torch.rand(half, 1, 1, 1, generator=g) * 0.2
    noisy = (x[:half] + sigma * torch.randn(x[:half].shape, generator=g)).clamp(-1, 1)
    kept = _shift_or_blend(x[half:], other[half:], g)
    return torch.cat([noisy, kept]), torch.cat([x[:half], kept])


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


def _fine_perturbation(x: torch.Tensor, g: torch.Generator, blocks: bool = False, highpass: bool = False) -> torch.Tensor:
    """Zero-mean pixel noise the encoder should barely see, with a random amplitude per image
    (sigma up to 0.2 in [-1, 1] units); with ``blocks``, half of it in 2x2 blocks; with
    ``highpass``, white noise minus its 3x3 binomial blur (response 1 - cos^2(pi fx) cos^2(pi fy):
    full at the checkerboard, under 0.35 below 0.2 cycles/px where blur changes an edge),
    rescaled to unit variance."""
    n = x.shape[0]
    sigma = 0.02 + torch.rand(n, 1, 1, 1, generator=g) * 0.18
    fine = torch.randn(x.shape, generator=g)
    if highpass:
        fine = _highpass(fine)
    if not blocks:
        return sigma * fine
    coarse = torch.randn(n, 3, x.shape[2] // 2, x.shape[3] // 2, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    blocky = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    return sigma * (blocky * coarse + (1 - blocky) * fine)


def _highpass(noise: torch.Tensor) -> torch.Tensor:
    """``noise`` minus its 3x3 binomial blur (circular), scaled so white noise keeps unit variance."""
    k1 = torch.tensor([0.25, 0.5, 0.25])
    kernel = -(k1[:, None] * k1[None, :])
    kernel[1, 1] += 1.0
    kernel = kernel / kernel.pow(2).sum().sqrt()
    c = noise.shape[1]
    padded = F.pad(noise, (1, 1, 1, 1), mode="circular")
    return F.conv2d(padded, kernel.expand(c, 1, 3, 3).to(noise), groups=c)


def _blur_pairs(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clean renders and the same scenes blurred at a uniform random strength, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, degradation=False) for _ in range(n)]
    sharp = np.stack([world.render(s, rng, 1 / 255) for s in scenes])
    blurred = np.stack([world.render(dataclasses.replace(s, degradation="blur", strength=float(rng.uniform())), rng, 1 / 255)
                        for s in scenes])
    return _to_tensor(sharp), _to_tensor(blurred)


def _blur_margin_loss(vae, sharp: torch.Tensor, blurred: torch.Tensor, margin: float, g: torch.Generator):
    """A hinge that pushes the latents of each blurred image at least ``margin`` (rms, relative
    to the spread of the sharp images' latents) from those of the same scene sharp, and the
    blurred images' reconstruction loss (L1 + L2 + :func:`_edge_loss`, from sampled latents),
    so the decoder learns to draw what the displacement says.

    Returns (hinge, mean relative displacement, reconstruction loss)."""
    ps, pb = vae.encode(sharp).latent_dist, vae.encode(blurred).latent_dist
    spread = (ps.mean - ps.mean.mean(0)).pow(2).mean().sqrt().detach()
    displacement = (pb.mean - ps.mean).flatten(1).pow(2).mean(1).sqrt() / spread
    hinge = F.relu(margin - displacement).mean()
    rec = vae.decode(pb.mean + pb.std * torch.randn(pb.mean.shape, generator=g).to(pb.mean)).sample
    rec_loss = _decoder_loss(rec, blurred)
    return hinge, displacement.mean().detach(), rec_loss


def _image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def _edge_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the image gradients of ``rec`` and ``target``: how steep each edge is.

    L1 + L2 on pixels barely notice an edge drawn one pixel too soft (edges are a few
    percent of the pixels), so without this term a VAE draws every edge at one softness
    and a blurred image comes back like a sharp one."""
    (ry, rx), (ty, tx) = _image_gradients(rec), _image_gradients(target)
    return F.l1_loss(ry, ty) + F.l1_loss(rx, tx)


def _decoder_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + L2 + :func:`_edge_loss`: what the decoder stages (and the blurred pairs) fit."""
    return F.l1_loss(rec, target) + F.mse_loss(rec, target) + _edge_loss(rec, target)


def _vae_loss(vae, x_in, target, g, jacobian_weight: float = 0.0, jacobian_share: int = 1, jacobian_blocks: bool = False,
              jacobian_highpass: bool = False, edge_weight: float = 0.0, probe=None, labels=None, probe_weight: float = 0.0):
    """Reconstruction (L1 + L2 + tiny KL, plus ``edge_weight`` times :func:`_edge_loss`), plus
    ``probe_weight`` times the cross-entropy of ``probe`` (a :class:`DegradationProbe`) on the
    sampled latents against ``labels`` (-100: no label), plus
    ``jacobian_weight`` times the encoder's relative sensitivity
    ``|mu(x + d) - mu(x)|^2 / |d|^2 / var(mu)`` to fine perturbations d.

    ``var(mu)`` is the spread of the latents across the batch (per element, so constant
    offsets, which carry no information, cannot buy a smaller penalty).

    Returns (loss, logs, reconstruction)."""
    posterior = vae.encode(x_in).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    rec = vae.decode(z).sample
    kl = posterior.kl().mean() / target[0].numel()
    loss = F.l1_loss(rec, target) + F.mse_loss(rec, target) + 1e-4 * kl
    if edge_weight:
        loss = loss + edge_weight * _edge_loss(rec, target)
    logs = {"rec": float(loss.detach())}
    if probe_weight:
        ce = F.cross_entropy(probe(z), labels, ignore_index=-100)
        loss = loss + probe_weight * ce
        logs["probe"] = float(ce.detach())
    if jacobian_weight:
        k = max(2, x_in.shape[0] // jacobian_share)
        d = _fine_perturbation(x_in[:k], g, jacobian_blocks, jacobian_highpass).to(x_in.device)
        moved = vae.encode(x_in[:k] + d).latent_dist.mean - posterior.mean[:k]
        ratio = moved.flatten(1).pow(2).sum(1) / d.flatten(1).pow(2).sum(1)
        sensitivity = ratio.mean() / posterior.mean.var(dim=0).mean()
        loss = loss + jacobian_weight * sensitivity
        logs["jac"] = float(sensitivity.detach())
    return loss, logs, rec


class LatentOperator(torch.nn.Module):
    """A small CNN on (scaled) latents: the displacement that a degradation of the given
    strength makes in them, as the decoder draws it (fitted to decoder inversions)."""

    def __init__(self, channels: int = 4, width: int = 64):
        super().__init__()
        act = torch.nn.SiLU()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels + 1, width, 3, padding=1), act, torch.nn.Conv2d(width, width, 3, padding=1), act,
            torch.nn.Conv2d(width, width, 3, padding=1), act, torch.nn.Conv2d(width, channels, 3, padding=1))
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        s = strength.to(z).view(-1, 1, 1, 1).expand(-1, 1, *z.shape[2:])
        return self.net(torch.cat([z, s], dim=1))


def fit_latent_operator(z: torch.Tensor, strength: torch.Tensor, displacement: torch.Tensor, *, steps: int, lr: float,
                        seed: int = 0, batch: int = 64, progress: Callable[[int, int, dict], None] | None = None) -> LatentOperator:
    """Fit a :class:`LatentOperator` by MSE (AdamW, cosine). One pair in eight is held out and
    the share of its displacement's variance that the operator explains is logged."""
    torch.manual_seed(seed + 7)
    n = len(z)
    order = torch.randperm(n)
    held, train = order[: max(1, n // 8)], order[max(1, n // 8):]
    op = LatentOperator(z.shape[1])
    opt = torch.optim.AdamW(op.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(seed + 11)
    for step in range(steps):
        idx = train[torch.randint(0, len(train), (min(batch, len(train)),), generator=g)]
        loss = F.mse_loss(op(z[idx], strength[idx]), displacement[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and ((step + 1) % 250 == 0 or step + 1 == steps):
            with torch.no_grad():
                err = F.mse_loss(op(z[held], strength[held]), displacement[held])
            progress(step + 1, steps, {"loss": float(loss.detach()), "held-out explained": float(1 - err / displacement[held].pow(2).mean())})
    return op.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- stages

class Trainer:
    """Runs the stages in order, resuming from the work folder's checkpoint."""

    def __init__(self, workdir: Path, cfg: TrainConfig, progress: ProgressFn | None = None, vae_from: Path | None = None):
        """``vae_from``: a shapes prior folder whose VAE a fresh work folder starts from (the
        VAE stages are skipped; the UNet is trained on that VAE's latents)."""
        self.dir = Path(workdir)
        self.vae_from = Path(vae_from) if vae_from is not None else None
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
            return torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if self.vae_from is not None:
            from diffusers import AutoencoderKL

            vae = build_vae(self.cfg)
            vae.load_state_dict(AutoencoderKL.from_pretrained(self.vae_from / "vae").state_dict())
            return {"stage": "grain" if self.cfg.grain_steps else "latents", "step": 0, "vae": vae.state_dict()}
        return {"stage": "vae", "step": 0}

    def run(self) -> Path:
        state = self._load()
        if state["stage"] == "vae":
            state = self.train_vae(state)
        if state["stage"] == "decoder":
            state = self.tune_decoder(state)
        if state["stage"] == "adversarial":
            state = self.train_adversarial(state)
        if state["stage"] == "grain":
            state = self.tune_grain(state)
        if state["stage"] == "latents":
            state = self.make_latents(state)
        if state["stage"] == "invert":
            state = self.invert_degraded(state)
        if state["stage"] == "prior":
            state = self.train_prior(state)
        return self.export(state, self.dir / "prior")

    # -- stage 1
    def train_vae(self, state: dict) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg).to(self.device)
        probe = DegradationProbe(vae.config.latent_channels).to(self.device) if cfg.vae_probe_weight else None
        params = list(vae.parameters()) + (list(probe.parameters()) if probe is not None else [])
        opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.1)
        if "vae" in state:
            vae.load_state_dict(state["vae"])
            if probe is not None:
                probe.load_state_dict(state["probe"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        g = torch.Generator().manual_seed(cfg.seed)
        t0, start = time.time(), state["step"]
        for step in range(start, cfg.vae_steps):
            loss, logs, _, _ = self._vae_stage_loss(vae, cfg.seed * 1_000_003 + step, g, probe)
            _optimizer_step(loss, opt, sched, params)
            done = step + 1
            self.progress("vae", done, cfg.vae_steps, {**logs, "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
                stage = "decoder" if done == cfg.vae_steps else "vae"
                state = {"stage": stage, "step": 0 if stage == "decoder" else done, "vae": vae.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict()}
                if probe is not None:
                    state["probe"] = probe.state_dict()
                _atomic_save(state, self.ckpt_path)
                if done == 1000:
                    _atomic_save({"vae": vae.state_dict()}, self.dir / "vae_step1000.pt")
        return state

    def _vae_stage_loss(self, vae, seed: int, g: torch.Generator, probe=None):
        """The VAE stage's loss on the batch drawn with ``seed``: world images topped up with
        degraded ones, a quarter of the world images colour-shifted or blended (with the
        Jacobian penalty) or, for ``denoise``, half of them noised; with ``vae_blur_margin``,
        plus :func:`_blur_margin_loss` on pairs of their own. Returns (loss, logs, the batch's
        reconstruction, its target)."""
        cfg = self.cfg
        g.manual_seed(seed)
        x, extra, labels = self._topped_up_batch(seed, cfg.vae_degraded_extra)
        x_in, target, jacobian_weight = x, x, 0.0
        if cfg.augment and cfg.vae_regularizer == "denoise":
            half = x.shape[0] // 2
            x_in, target = _perturb(x[half:], x[:half], g)
            x_in, target = torch.cat([x[:half], x_in]), torch.cat([x[:half], target])
            labels[half:] = -100  # perturbed pairs have no kind
        elif cfg.augment:
            quarter = cfg.vae_batch // 4
            x_in = target = torch.cat([x[:-quarter], _shift_or_blend(x[-quarter:], x[:quarter], g)])
            labels[x.shape[0] - quarter : x.shape[0]] = -100  # shifted and blended images have no kind
            jacobian_weight = cfg.jacobian_weight
        x_in, target = torch.cat([x_in, extra]), torch.cat([target, extra])
        loss, logs, rec = _vae_loss(vae, x_in, target, g, jacobian_weight, cfg.jacobian_share, cfg.jacobian_blocks,
                                    cfg.jacobian_highpass, cfg.vae_edge_weight, probe, labels, cfg.vae_probe_weight)
        if cfg.vae_blur_margin:
            sharp, blurred = (t.to(self.device) for t in _blur_pairs(seed + 600_000_000, cfg.vae_blur_pairs))
            hinge, displacement, rec_blurred = _blur_margin_loss(vae, sharp, blurred, cfg.vae_blur_margin, g)
            loss = loss + cfg.vae_blur_margin_weight * hinge + rec_blurred
            logs.update(blur_displacement=float(displacement), blurred_rec=float(rec_blurred.detach()))
        return loss, logs, rec, target

    def _topped_up_batch(self, seed: int, extra: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``vae_batch - extra`` world images drawn with ``seed``, ``extra`` forced-degraded ones,
        and the :func:`probe_label` of every image (world ones first).

        At the world's own share (a fifth, spread over six kinds) a batch of 32 holds about
        one image of each degradation, too few for the reconstruction loss to keep blur or
        noise in the latents against the Jacobian penalty; the extra ones go through the
        kinds in turn. The extra images are reconstructed as they are, never perturbed.
        """
        imgs, scenes = world.sample_batch(seed, self.cfg.vae_batch - extra)
        kinds = list(world.DEGRADATION_WORDS)
        extra_kinds = [kinds[i % len(kinds)] for i in range(extra)]
        degraded = [world.sample_batch(seed + 500_000_000 + i, 1, degradation=kind)[0] for i, kind in enumerate(extra_kinds)]
        degraded = np.concatenate(degraded) if degraded else imgs[:0]
        labels = [probe_label(s.degradation) for s in scenes] + [probe_label(k) for k in extra_kinds]
        return (_to_tensor(imgs).to(self.device), _to_tensor(degraded).to(self.device),
                torch.tensor(labels, device=self.device))

    # -- stage 2
    def tune_decoder(self, state: dict) -> dict:
        """Fine-tune the decoder alone on world images, from the encoder's posterior means.

        The encoder, which fixes the latents the UNet learns, is final (unless the
        adversarial stage follows), so the decoder can still be sharpened: L1 + L2 + an L1 on
        image gradients (edges).
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
            world_images, degraded, _ = self._topped_up_batch(cfg.seed * 1_000_037 + step + 77_777_777,
                                                              cfg.vae_degraded_extra if cfg.decoder_topup else 0)
            x = torch.cat([world_images, degraded])
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean
            rec = vae.decode(z).sample
            loss = _decoder_loss(rec, x)
            _optimizer_step(loss, opt, sched, params)
            done = step + 1
            self.progress("decoder", done, cfg.decoder_steps, {"rec": float(loss.detach()), "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.decoder_steps:
                finished = done == cfg.decoder_steps
                state = {**state, "stage": "adversarial" if finished else "decoder", "step": 0 if finished else done,
                         "vae": vae.state_dict(), "decoder_opt": opt.state_dict(), "decoder_sched": sched.state_dict()}
                _atomic_save(state, self.ckpt_path)
        if cfg.decoder_steps == 0:
            state = {**state, "stage": "adversarial", "step": 0}
        return state

    # -- stage 3
    def train_adversarial(self, state: dict) -> dict:
        """Fine-tune encoder and decoder together with the VAE stage's loss plus a
        :class:`~sdsctl.shapes.adversarial.PatchDiscriminator`'s (the first
        ``adversarial_warmup`` steps train the discriminator alone). Runs before the
        latents are made, because the encoder moves."""
        from . import adversarial

        cfg = self.cfg
        if cfg.adversarial_steps == 0:
            return {**state, "stage": "grain", "step": 0}
        torch.manual_seed(cfg.seed + 2)
        vae = build_vae(cfg).to(self.device)
        vae.load_state_dict(state["vae"])
        disc = adversarial.PatchDiscriminator().to(self.device)
        params = list(vae.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.adversarial_lr, betas=(0.5, 0.9), weight_decay=0.0)
        opt_disc = torch.optim.AdamW(disc.parameters(), lr=2 * cfg.adversarial_lr, betas=(0.5, 0.9), weight_decay=0.0)
        if "disc" in state:
            disc.load_state_dict(state["disc"])
            opt.load_state_dict(state["adversarial_opt"])
            opt_disc.load_state_dict(state["disc_opt"])
        g = torch.Generator()
        last_layer = vae.decoder.conv_out.weight
        t0, start = time.time(), state["step"]
        for step in range(start, cfg.adversarial_steps):
            warming = step < cfg.adversarial_warmup
            with torch.set_grad_enabled(not warming):
                loss, logs, rec, target = self._vae_stage_loss(vae, cfg.seed * 1_000_003 + 300_000_000 + step, g)
            d_loss = adversarial.discriminator_loss(disc(target), disc(rec.detach()))
            opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_disc.step()
            logs["disc"] = float(d_loss.detach())
            if not warming:
                disc.requires_grad_(False)  # the discriminator only learns from its own loss
                gen = adversarial.generator_loss(disc(rec))
                disc.requires_grad_(True)
                weight = adversarial.adaptive_weight(loss, gen, last_layer, cfg.adversarial_weight)
                opt.zero_grad(set_to_none=True)
                (loss + weight * gen).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                logs.update(gen=float(gen.detach()), weight=float(weight))
            done = step + 1
            self.progress("adversarial", done, cfg.adversarial_steps, {**logs, "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.adversarial_steps:
                finished = done == cfg.adversarial_steps
                state = {**state, "stage": "grain" if finished else "adversarial", "step": 0 if finished else done,
                         "vae": vae.state_dict(), "disc": disc.state_dict(), "adversarial_opt": opt.state_dict(),
                         "disc_opt": opt_disc.state_dict()}
                _atomic_save(state, self.ckpt_path)
        return state

    # -- stage 3b
    def tune_grain(self, state: dict) -> dict:
        """Fine-tune the decoder to draw grain codes (``sdsctl/shapes/grain.py``) as coarse grey grain.

        Each batch is the decoder stage's (world and forced-degraded images, reconstructed as
        they are) plus ``grain_batch`` clean scenes whose latents carry a random code along the latents' least-used direction, drawn to the
        scene plus :func:`grain.grain` of the code. Half of the codes lie beyond the world's
        range and their grain is saturated, so the decoder learns to keep the shape however
        long a code guidance makes. The direction and the latents' spread are fixed before
        the first step (from 1,024 world images) and kept in the state for the latents stage.
        """
        from . import grain

        cfg = self.cfg
        if cfg.grain_steps == 0:
            return {**state, "stage": "latents", "step": 0}
        vae = build_vae(cfg).to(self.device)
        vae.load_state_dict(state["vae"])
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        if "grain" not in state:
            imgs, _ = world.sample_batch(cfg.seed * 7919 + 20_000_003, min(1024, cfg.n_images))
            with torch.no_grad():
                z = torch.cat([vae.encode(_to_tensor(imgs[i : i + 256]).to(self.device)).latent_dist.mean.cpu()
                               for i in range(0, len(imgs), 256)])
            direction, std = grain.least_used_direction(z)
            state = {**state, "grain": {"direction": direction, "latent_std": std}}
        direction, std = state["grain"]["direction"].to(self.device), state["grain"]["latent_std"]
        teacher = None
        if cfg.grain_anchor_batch:  # the decoder as it was before this stage, kept to resume from
            state.setdefault("grain_teacher", {k: v.clone() for k, v in vae.state_dict().items()})
            teacher = copy.deepcopy(vae).requires_grad_(False)
            teacher.load_state_dict(state["grain_teacher"])
        params = [p for p in vae.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.grain_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.grain_steps)
        if "grain_opt" in state:
            opt.load_state_dict(state["grain_opt"])
            sched.load_state_dict(state["grain_sched"])
        g = torch.Generator()
        t0, start = time.time(), state["step"]
        for step in range(start, cfg.grain_steps):
            seed = cfg.seed * 1_000_039 + step + 88_888_888
            g.manual_seed(seed)
            world_images, degraded, _ = self._topped_up_batch(seed, cfg.vae_degraded_extra if cfg.decoder_topup else 0)
            x_world = torch.cat([world_images, degraded])  # the decoder stage's batch
            clean_imgs, _ = world.sample_batch(seed + 1, cfg.grain_batch, degradation=False)
            x_clean = _to_tensor(clean_imgs).to(self.device)
            with torch.no_grad():
                z_world = vae.encode(x_world).latent_dist.mean
                z_clean = vae.encode(x_clean).latent_dist.mean
            codes = grain.random_codes(grain.training_amplitudes(cfg.grain_batch, g), z_clean.shape[-1], g).to(self.device)
            z_coded = grain.displace(z_clean, codes, direction, std)
            z_rows = [z_world, z_coded]
            targets = [x_world, (x_clean + grain.grain(codes, x_clean.shape[-1])).clamp(-1, 1)]
            if teacher is not None:
                z_off = grain.off_manifold(z_world[: cfg.grain_anchor_batch], direction, std, cfg.grain_anchor_range, g)
                with torch.no_grad():
                    targets.append(teacher.decode(z_off).sample)
                z_rows.append(z_off)
            target = torch.cat(targets)
            rec = vae.decode(torch.cat(z_rows)).sample
            loss = _decoder_loss(rec, target)
            _optimizer_step(loss, opt, sched, params)
            done = step + 1
            self.progress("grain", done, cfg.grain_steps, {"rec": float(loss.detach()), "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.grain_steps:
                finished = done == cfg.grain_steps
                state = {**state, "stage": "latents" if finished else "grain", "step": 0 if finished else done,
                         "vae": vae.state_dict(), "grain_opt": opt.state_dict(), "grain_sched": sched.state_dict()}
                _atomic_save(state, self.ckpt_path)
        return state

    # -- stage 4
    @torch.no_grad()
    def make_latents(self, state: dict) -> dict:
        """Encode the world once (posterior means) and tokenize its captions. After the grain
        stage, each noisy image's latents are instead the clean scene's plus a grain code
        matching its noise strength (:func:`_grain_coded`)."""
        cfg = self.cfg
        vae = build_vae(cfg).to(self.device)
        vae.load_state_dict(state["vae"])
        vae.eval()
        coded = "grain" in state
        keep_encoded = coded and cfg.uncond_encoder_latents  # dropped rows of noisy images: no code
        means, encoded, captions, kinds, strengths = [], [], [], [], []
        chunk = 500
        for i in range(0, cfg.n_images, chunk):
            n = min(chunk, cfg.n_images - i)
            seed = 10_000_019 + cfg.seed * 7919 + i
            imgs, scenes = world.sample_batch(seed, n)
            x = _to_tensor(imgs).to(self.device)
            z = vae.encode(x).latent_dist.mean
            if keep_encoded:
                encoded.append(z.cpu())
            if coded:
                z = self._grain_coded(vae, z, scenes, state["grain"], seed)
            means.append(z.cpu())
            captions += [s.caption for s in scenes]
            kinds += [s.degradation for s in scenes]
            strengths += [s.strength for s in scenes]
            self.progress("latents", i + n, cfg.n_images, {})
        latents = torch.cat(means)
        scaling = float(1.0 / latents.std())
        ids = self._token_ids(captions)
        state = {"stage": "invert" if cfg.invert_kinds and cfg.invert_images else "prior", "step": 0,
                 "vae": state["vae"], "scaling_factor": scaling, "latents": latents * scaling, "input_ids": ids,
                 "degradations": kinds, "strengths": torch.tensor(strengths, dtype=torch.float32),
                 **({"grain": state["grain"]} if coded else {}),
                 **({"uncond_latents": torch.cat(encoded) * scaling} if keep_encoded else {})}
        _atomic_save(state, self.ckpt_path)
        return state

    def _grain_coded(self, vae, z: torch.Tensor, scenes: list, coding: dict, seed: int) -> torch.Tensor:
        """``z`` with the rows of noisy scenes replaced by the latents of the same scene rendered
        clean plus a random grain code (amplitude from the scene's noise strength; seeded)."""
        from . import grain

        rows = [k for k, s in enumerate(scenes) if s.degradation == "noise"]
        if not rows:
            return z
        rng = np.random.default_rng(seed + 40_000_000)
        clean = np.stack([world.render(dataclasses.replace(scenes[k], degradation=None), rng, 1 / 255) for k in rows])
        z_clean = vae.encode(_to_tensor(clean).to(self.device)).latent_dist.mean
        g = torch.Generator().manual_seed(seed + 40_000_000)
        amplitude = grain.amplitude_for_strength(torch.tensor([scenes[k].strength for k in rows], dtype=torch.float32))
        codes = grain.random_codes(amplitude, z.shape[-1], g).to(z)
        z = z.clone()
        z[rows] = grain.displace(z_clean, codes, coding["direction"], coding["latent_std"])
        return z

    # -- stage 4b
    def invert_degraded(self, state: dict) -> dict:
        """UNet latents for the degradations the encoder does not keep, found by inverting the decoder.

        The smooth encoder (what EHC back-propagates through) maps a blurred render to nearly
        the sharp scene's latents, so a UNet trained on them cannot make ``blurry`` samples
        blurrier; yet the decoder draws blur from other latents: gradient descent on
        ``z`` (from the encoder's) to minimize L1 + L2 of decode(z) against the blurred render
        finds them. Inverting every world image of a kind would cost too long on a CPU, so
        ``invert_images`` fresh renders per kind are inverted and stand in, cycled, for the
        world's images of that kind (same count, so the kind keeps its share of the data).

        With ``invert_operator``, a :class:`LatentOperator` is fitted instead to map the
        encoder's latents of an image (and its degradation strength) to the inversion's
        displacement, and applied to each of the world's own images of that kind: an average
        over many inversions, it keeps the part of the displacement that the image decides
        and drops the optimization's own fine noise, which guidance would amplify.
        """
        cfg = self.cfg
        vae = build_vae(cfg).to(self.device)
        vae.load_state_dict(state["vae"])
        vae.eval().requires_grad_(False)
        chunks = [(kind, j) for kind in cfg.invert_kinds for j in range(math.ceil(cfg.invert_images / cfg.invert_batch))]
        done = state.setdefault("inverted", [])  # one (kind, latents, input_ids, encoder latents, strengths) per chunk
        for index in range(len(done), len(chunks)):
            kind, j = chunks[index]
            n = min(cfg.invert_batch, cfg.invert_images - j * cfg.invert_batch)
            imgs, scenes = world.sample_batch(30_000_017 + cfg.seed * 7919 + index * 1009, n, degradation=kind)
            x = _to_tensor(imgs).to(self.device)
            with torch.no_grad():
                z0 = vae.encode(x).latent_dist.mean
            z = self._invert(vae, x, z0)
            ids = self._token_ids([s.caption for s in scenes])
            scale = state["scaling_factor"]
            done.append((kind, z.cpu() * scale, ids, z0.cpu() * scale, torch.tensor([s.strength for s in scenes])))
            _atomic_save(state, self.ckpt_path)
            self.progress("invert", index + 1, len(chunks), {})
        latents, ids = state["latents"].clone(), state["input_ids"].clone()
        uncond = state.get("uncond_latents", state["latents"]).clone()  # what dropped rows see with uncond_encoder_latents
        for kind in cfg.invert_kinds:
            slots = torch.tensor([i for i, k in enumerate(state["degradations"]) if k == kind], dtype=torch.long)
            rows = [row for row in done if row[0] == kind]
            inv_z, inv_ids, enc_z, strength = (torch.cat([row[i] for row in rows]) for i in (1, 2, 3, 4))
            if cfg.invert_operator:
                op = fit_latent_operator(enc_z, strength, inv_z - enc_z, steps=cfg.operator_steps, lr=cfg.operator_lr,
                                         seed=cfg.seed, progress=lambda step, total, logs: self.progress(f"operator {kind}", step, total, logs))
                with torch.no_grad():
                    latents[slots] = latents[slots] + op(latents[slots], state["strengths"][slots])
            else:
                cycle = torch.arange(len(slots)) % len(inv_z)
                latents[slots], ids[slots], uncond[slots] = inv_z[cycle], inv_ids[cycle], enc_z[cycle]
        state = {"stage": "prior", "step": 0, "vae": state["vae"], "scaling_factor": state["scaling_factor"],
                 "latents": latents, "input_ids": ids, **({"grain": state["grain"]} if "grain" in state else {}),
                 **({"uncond_latents": uncond} if cfg.uncond_encoder_latents else {})}
        _atomic_save(state, self.ckpt_path)
        return state

    def _invert(self, vae, x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """Latents (unscaled) that the frozen decoder draws as ``x``: Adam from the encoder's
        mean ``z0``, cosine-annealed, on the VAE's reconstruction loss (L1 + L2), plus
        ``invert_tv`` times the squared spatial differences of the displacement from that mean."""
        cfg = self.cfg
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=cfg.invert_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.invert_steps, 1))
        for _ in range(cfg.invert_steps):
            rec = vae.decode(z).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
            if cfg.invert_tv:
                dy, dx = _image_gradients(z - z0)
                loss = loss + cfg.invert_tv * (dy.pow(2).mean() + dx.pow(2).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return z.detach()

    # -- stage 5
    def train_prior(self, state: dict) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + 1)
        tok = self.tokenizer
        unet = build_unet(cfg).to(self.device)
        text = build_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id).to(self.device)
        params = list(unet.parameters()) + list(text.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.prior_lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.prior_lr, total_steps=cfg.prior_steps, pct_start=0.05)
        if "unet" in state:
            unet.load_state_dict(state["unet"])
            text.load_state_dict(state["text"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        ema = self._ema(params)
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        noise_sched = build_scheduler()
        latents, ids = state["latents"], state["input_ids"]
        empty = self._token_ids([""])
        if cfg.prior_degraded_share is not None:
            degraded = self._names_a_degradation(ids)
            pools = (torch.nonzero(~degraded).flatten(), torch.nonzero(degraded).flatten())
        g = torch.Generator()
        t0, start = time.time(), state["step"]
        for step in range(start, cfg.prior_steps):
            g.manual_seed(cfg.seed * 1_000_033 + step)
            idx = torch.randint(0, latents.shape[0], (cfg.prior_batch,), generator=g)
            drop = torch.rand(cfg.prior_batch, generator=g) < cfg.caption_dropout
            if cfg.prior_degraded_share is not None:
                idx = self._rebalance(idx, drop, pools, cfg.prior_degraded_share, g)
            z0 = self._batch_latents(state, idx, drop).to(self.device)
            batch_ids = ids[idx].clone()
            batch_ids[drop] = empty
            noise = torch.randn(z0.shape, generator=g).to(self.device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.prior_batch,), generator=g).to(self.device)
            zt = noise_sched.add_noise(z0, noise, t)
            emb = text(batch_ids.to(self.device))[0]
            pred = unet(zt, t, encoder_hidden_states=emb).sample
            loss = F.mse_loss(pred, noise)
            _optimizer_step(loss, opt, sched, params)
            if ema is not None:
                ema.step(params)
            done = step + 1
            self.progress("prior", done, cfg.prior_steps, {"loss": float(loss.detach()), "s/step": (time.time() - t0) / (done - start)})
            if done % cfg.checkpoint_every == 0 or done == cfg.prior_steps:
                state = {**state, "stage": "prior" if done < cfg.prior_steps else "done", "step": done,
                         "unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), **({"ema": ema.state_dict()} if ema is not None else {})}
                _atomic_save(state, self.ckpt_path)
        return state

    @staticmethod
    def _batch_latents(state: dict, idx: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """The latents of the batch's rows ``idx``; caption-dropped rows (``drop``) take
        ``uncond_latents`` when the state has them (the encoder's latents of inverted images,
        so the unconditional model does not learn the inversions' fine patterns)."""
        z = state["latents"][idx]
        if "uncond_latents" in state:
            z = torch.where(drop[:, None, None, None], state["uncond_latents"][idx], z)
        return z

    def _names_a_degradation(self, ids: torch.Tensor) -> torch.Tensor:
        """Which captions (token ids) name one of the world's degradations."""
        words = [w.replace(" ", "") for names in world.DEGRADATION_WORDS.values() for w in names]
        # compared without spaces: decoding splits punctuation ("over - saturated")
        captions = [c.replace(" ", "") for c in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return torch.tensor([any(w in c for w in words) for c in captions], dtype=torch.bool)

    @staticmethod
    def _rebalance(idx, drop, pools, share: float, g: torch.Generator) -> torch.Tensor:
        """Redraw the captioned rows of a batch so that ``share`` of them name a degradation.

        Whole (latent, caption) pairs are reweighted by their kind of caption, so each
        caption's distribution of images, p(x | c), is unchanged; only how often the rare
        quality-word captions are trained changes. Caption-dropped rows keep the world's
        images, so the unconditional model p(x) stays the world's too.
        """
        clean, degraded = pools
        if len(clean) == 0 or len(degraded) == 0:
            return idx
        idx = idx.clone()
        keep = ~drop
        pick_degraded = torch.rand(len(idx), generator=g) < share
        for pool, rows in ((degraded, keep & pick_degraded), (clean, keep & ~pick_degraded)):
            idx[rows] = pool[torch.randint(0, len(pool), (int(rows.sum()),), generator=g)]
        return idx

    def _ema(self, params):
        """An exponential moving average of the prior's weights (diffusers' ``EMAModel``, with
        its warm-up so the early, poor weights fade quickly); ``None`` when ``ema_decay`` is 0."""
        if not self.cfg.ema_decay:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(params, decay=self.cfg.ema_decay, use_ema_warmup=True, power=3 / 4)

    # -- export
    def export(self, state: dict, out: Path) -> Path:
        cfg = self.cfg
        tok = self.tokenizer
        vae = build_vae(cfg)
        vae.load_state_dict(state["vae"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        unet = build_unet(cfg)
        unet.load_state_dict(state["unet"])
        text = build_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id)
        text.load_state_dict(state["text"])
        if "ema" in state:
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

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


if __name__ == "__main__":  # pragma: no cover - convenience for long background runs
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--vae-steps", type=int, help="default: the configuration's")
    p.add_argument("--prior-steps", type=int, help="default: the configuration's")
    p.add_argument("--stop-after-vae", action="store_true")
    p.add_argument("--vae-from", type=Path, help="start a fresh work folder from this prior folder's VAE")
    p.add_argument("--blur-margin", type=float, help="TrainConfig.vae_blur_margin (default: the configuration's)")
    p.add_argument("--invert", nargs="*", metavar="KIND", help="TrainConfig.invert_kinds (default: the configuration's)")
    p.add_argument("--invert-tv", type=float, help="TrainConfig.invert_tv (default: the configuration's)")
    p.add_argument("--invert-operator", action=argparse.BooleanOptionalAction, help="TrainConfig.invert_operator")
    p.add_argument("--invert-images", type=int, help="TrainConfig.invert_images")
    p.add_argument("--degraded-share", type=float, help="TrainConfig.prior_degraded_share")
    p.add_argument("--grain-steps", type=int, help="TrainConfig.grain_steps")
    p.add_argument("--uncond-encoder-latents", action=argparse.BooleanOptionalAction, help="TrainConfig.uncond_encoder_latents")
    p.add_argument("--grain-anchor-batch", type=int, help="TrainConfig.grain_anchor_batch")
    p.add_argument("--caption-dropout", type=float, help="TrainConfig.caption_dropout")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--jacobian-experiment", action="store_true", help="TrainConfig.jacobian_experiment()")
    which.add_argument("--candidate", action="store_true", help="TrainConfig.candidate()")
    which.add_argument("--first-release", action="store_true", help="TrainConfig.first_release()")
    a = p.parse_args()
    torch.set_num_threads(2)
    last = [0.0]

    def show(stage, step, total, logs):
        if time.time() - last[0] > 20 or step == total:
            last[0] = time.time()
            print(stage, step, total, {k: round(v, 4) for k, v in logs.items()}, flush=True)

    make = (TrainConfig.jacobian_experiment if a.jacobian_experiment else TrainConfig.candidate if a.candidate
            else TrainConfig.first_release if a.first_release else TrainConfig)
    steps = {k: v for k, v in (("vae_steps", a.vae_steps), ("prior_steps", a.prior_steps), ("vae_blur_margin", a.blur_margin),
                               ("invert_kinds", tuple(a.invert) if a.invert is not None else None),
                               ("invert_tv", a.invert_tv), ("invert_operator", a.invert_operator),
                               ("invert_images", a.invert_images), ("prior_degraded_share", a.degraded_share),
                               ("grain_steps", a.grain_steps), ("uncond_encoder_latents", a.uncond_encoder_latents),
                               ("grain_anchor_batch", a.grain_anchor_batch), ("caption_dropout", a.caption_dropout)) if v is not None}
    cfg = make(augment=not a.no_augment, **steps)
    tr = Trainer(Path(a.workdir), cfg, show, vae_from=a.vae_from)
    if a.stop_after_vae:
        tr.train_vae(tr._load())
    else:
        print(tr.run())
