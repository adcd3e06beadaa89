"""What the flow-matching families (SD3/3.5, FLUX.1) share: the VP interface over a velocity model.

A rectified-flow transformer predicts a velocity v̂ on a σ schedule; the guidance terms see
ε, ᾱ and t ∈ [0, N) as with every other family. :class:`FlowPrior` does the mapping with
``sdsctl.diffusion``'s conversion (its equations are stated there, once):

* ``sigmas[t]``: σ of training index t, shifted as the model was trained
  (:func:`~sdsctl.diffusion.flow_sigmas`; the dynamic shift's μ from the image's sequence
  length by the family's own pipeline's ``calculate_shift``); ``alphas_cumprod = ᾱ(σ)``;
* ``add_noise(z₀, ε, t)`` returns the VP sample z_t = x_σ / s(σ) with x_σ = (1 − σ)z₀ + σε;
* ``predict_noise(z_t, t, y)`` feeds x_σ = s(σ)·z_t and σ to the transformer and returns
  ε̂ = x_σ + (1 − σ)·v̂ (float32).

``set_image_size`` rebuilds the table for the run's resolution when the scheduler shifts
dynamically (FLUX.1-dev: μ depends on the number of latent patches); the loop calls it
before the guidance and the weighting start. Prompt embeddings are packed as SDXL's are:
the transformer's sequence conditioning plus one position holding the pooled projection
(zero-padded to the wider of the two), split again in ``_velocity``.
"""

from __future__ import annotations

from torch import Tensor

from sdsctl import diffusion
from sdsctl.errors import SdsctlError
from sdsctl.models.base import Prior


class FlowPrior(Prior):
    """A flow-matching family: subclasses set ``_image_seq_len``, ``_mu``, ``_encode_prompts``
    and ``_velocity`` (the transformer's v̂ at x_σ and σ)."""

    denoiser_name = "transformer"

    def __init__(self, pipe, **kwargs):
        cfg = pipe.transformer.config
        self.hidden_width, self.pooled_width = int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)
        super().__init__(pipe, **kwargs)

    # -- the schedule
    def _noise_schedule(self, config) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = "flow"
        self.set_image_size(self.image_size, self.image_size)

    @classmethod
    def _prediction_type(cls, scheduler_config: dict) -> str:
        return "flow"

    def set_image_size(self, height: int, width: int) -> None:
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        self.mu = self._mu(self._image_seq_len(h, w)) if self.scheduler.config.use_dynamic_shifting else None
        self.sigmas = diffusion.flow_sigmas(self.scheduler, self.mu).to(self.device)
        self.alphas_cumprod = diffusion.flow_alpha_bar(self.sigmas)
        self._table_size = (h, w) if self.mu is not None else None

    def _image_seq_len(self, h: int, w: int) -> int:
        """The transformer's number of image tokens for ``h`` × ``w`` latents."""
        raise NotImplementedError

    def _mu(self, image_seq_len: int) -> float:
        """The dynamic shift's μ, as the family's pipeline computes it."""
        raise NotImplementedError

    def _check_size(self, z: Tensor) -> None:
        if self._table_size is not None and tuple(z.shape[-2:]) != self._table_size:
            raise SdsctlError(f"{self.family}: the noise schedule was shifted for {self._table_size[0]}x"
                              f"{self._table_size[1]} latents (set_image_size), not {z.shape[-2]}x{z.shape[-1]}")

    # -- the interface, in VP terms
    def add_noise(self, z0: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """z_t = x_σ / s(σ), x_σ = (1 − σ)·z₀ + σ·ε: the VP sample at ᾱ(σ)."""
        self._check_size(z0)
        sigma = self.sigmas[self._timesteps(t, z0.shape[0])]
        return diffusion.flow_to_vp(diffusion.flow_noise(z0, eps, sigma), sigma)

    def predict_noise(self, z_t: Tensor, t: int | Tensor, embeddings: Tensor, guidance: float | None = None) -> Tensor:
        """ε̂ = x_σ + (1 − σ)·v̂(x_σ, σ) with x_σ = s(σ)·z_t; float32."""
        if guidance is not None and not self.guidance_embedded:
            raise ValueError(f"{self.pipeline_class} takes no guidance scale as an input (guidance_embedded is False)")
        self._check_size(z_t)
        sigma = self.sigmas[self._timesteps(t, z_t.shape[0])]
        x = diffusion.vp_to_flow(z_t.float(), sigma)
        v = self._velocity(x.to(self.dtype), sigma, embeddings.to(self.dtype), guidance).float()
        return diffusion.velocity_to_eps(v, x, sigma)

    def _velocity(self, x: Tensor, sigma: Tensor, embeddings: Tensor, guidance: float | None) -> Tensor:
        """The transformer's v̂ at x_σ (``[n, C, h, w]``, the weights' dtype) and σ (one per row)."""
        raise NotImplementedError

    # -- packed embeddings
    def pack(self, hidden: Tensor, pooled: Tensor) -> Tensor:
        """``[n, L, D]`` sequence and ``[n, P]`` pooled -> ``[n, L + 1, max(D, P)]``."""
        out = hidden.new_zeros(hidden.shape[0], hidden.shape[1] + 1, max(self.hidden_width, self.pooled_width))
        out[:, :-1, : hidden.shape[2]] = hidden
        out[:, -1, : pooled.shape[1]] = pooled
        return out

    def unpack(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        return embeddings[:, :-1, : self.hidden_width], embeddings[:, -1, : self.pooled_width]
