"""A patch discriminator for the shapes VAE, as Stable Diffusion's VAE was trained with one.

L1 + L2 reconstruction losses are minimized by drawing the *mean* of what a latent could
be: an edge whose exact position or softness the latent does not pin down comes back at
one middling softness, blurred and sharp renders alike, and grain comes back as its mean
(none). A discriminator that sees small patches of world images and of reconstructions
penalizes that hedging, so the decoder must commit to a steep edge or a blurred one — and
the reconstruction loss then makes it worth the encoder's while to say which.

Used by the ``adversarial`` stage of :mod:`sdsctl.shapes.train` (off by default, measured
in docs/shapes-prior.md). Not part of the exported prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Real-vs-reconstructed logits for overlapping patches of a 64x64 image (16x16 of
    them, each seeing about 22x22 pixels: enough for an edge's profile and for grain)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, kernel, stride, norm=True):
            return [nn.Conv2d(cin, cout, kernel, stride, 1), *([nn.GroupNorm(8, cout)] if norm else []), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(
            *block(3, width, 4, 2, norm=False), *block(width, 2 * width, 4, 2), *block(2 * width, 4 * width, 3, 1),
            nn.Conv2d(4 * width, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss: real patches above +1, reconstructed ones below -1."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """What the decoder minimizes: make its patches look real."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, gen_loss: torch.Tensor, last_layer: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale`` times the ratio of the two losses' gradient norms at the decoder's last
    layer (as in the VQGAN / Stable Diffusion autoencoder recipe), so the adversarial term
    pulls as hard as the reconstruction term whatever their raw magnitudes."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(max=1e4).detach() * scale
