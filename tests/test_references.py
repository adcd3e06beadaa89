"""Reference fixtures: one real step of each bundled recipe against its reference implementation.

Each test builds the bundled recipe on a tiny random-weight Stable Diffusion pipeline -- SD 1.x
(ε-prediction) and SD 2.x (v-prediction), real diffusers classes -- takes one step of sdsctl's
loop and compares the gradient it puts on θ (latent pixels: θ is the latent) with the gradient
the reference computes on the same latent with the same random draws. The reference side is
written out here from the reference's source, with its own conventions: its CFG form, its
weighting, its timestep handling and schedule, its normalization, its DDIM steps. It calls the
diffusers UNet, scheduler and ``encode_prompt`` directly, never sdsctl's prior.

Draws: sdsctl takes every random number from the run's generator (the timestep first, then the
guidance's noise); the references use their own generators (and Python's ``random`` for SDI's
overshoot, the global torch RNG for LucidDreamer's offset noise). The reference side here
replays sdsctl's generator state in sdsctl's order, so both sides see the same numbers.

``python benchmarks/reference_mutations.py`` breaks the plugins and recipes on purpose (23
plausible mistakes: a CFG scale in the wrong convention, a weighting, a normalization in the
wrong place, a ramp that does not anneal, a sign) and reports which of these tests catch each;
every one is caught.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdsctl.engine.loop import Optimization
from sdsctl.engine.recipe import load_recipe

CPU = torch.device("cpu")
NEG = "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"], ids=["sd1", "sd2-v"])
def pipeline(request, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    import tiny_pipelines

    folder = tiny_pipelines.sd(tmp_path_factory.mktemp("ref") / "sd", prediction_type=request.param)
    return folder, StableDiffusionPipeline.from_pretrained(folder)


class Reference:
    """The reference side: diffusers' UNet, DDIM scheduler and ``encode_prompt``, nothing of sdsctl."""

    def __init__(self, pipe):
        self.pipe, self.unet, self.scheduler = pipe, pipe.unet, pipe.scheduler
        self.alphas = self.scheduler.alphas_cumprod.float()  # threestudio/LucidDreamer: self.alphas
        self.v = self.scheduler.config.prediction_type == "v_prediction"
        self._emb: dict[str, torch.Tensor] = {}

    def emb(self, prompt: str) -> torch.Tensor:
        if prompt not in self._emb:
            self._emb[prompt] = self.pipe.encode_prompt(prompt, CPU, 1, False)[0]
        return self._emb[prompt]

    @torch.no_grad()
    def raw(self, x: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        """The UNet's own output (ε or v)."""
        return self.unet(x, torch.tensor([t]), encoder_hidden_states=self.emb(prompt)).sample

    def eps(self, x: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        """ε̂; from a v-prediction as threestudio's ``ddim_inversion_step`` converts it:
        ``pred_epsilon = α_t^½ · v + β_t^½ · sample``."""
        out = self.raw(x, t, prompt)
        if not self.v:
            return out
        a = self.alphas[t]
        return a.sqrt() * out + (1 - a).sqrt() * x

    def noised(self, x: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        return self.scheduler.add_noise(x, noise, torch.tensor([t]))

    def diffusers_cfg(self, x, t, cond: str, uncond: str, s: float) -> torch.Tensor:
        """``uncond + s·(cond − uncond)`` (diffusers, DreamFusion, LucidDreamer, ScaleDreamer, SDS-Bridge)."""
        e_u, e_c = self.eps(x, t, uncond), self.eps(x, t, cond)
        return e_u + s * (e_c - e_u)


@dataclasses.dataclass
class Step:
    z: torch.Tensor  # the latent before the step (θ of latent pixels)
    grad: torch.Tensor  # the gradient sdsctl's step put on θ
    generator: torch.Generator  # the run's generator as it was before the step
    steps: int
    record: dict


def sdsctl_step(recipe: str, folder, k: int, *overrides: str) -> Step:
    """Step ``k`` (0-based) of the bundled ``recipe`` on ``folder``: θ's gradient, without moving θ."""
    loaded = load_recipe(recipe, [f"model={folder}", *overrides])
    prior = loaded.components["model"].obj(loaded.recipe.model).load(CPU, torch.float32)
    opt = Optimization(loaded, prior, CPU, torch.float32)
    opt.initialize()
    assert opt.param.space == "latent" and len(opt.theta) == 1
    z = opt.render().detach().clone()
    generator = torch.Generator()
    generator.set_state(opt.generator.get_state())
    grads = []
    opt.optimizer.step = lambda *a, **kw: grads.append(opt.theta[0].grad.detach().clone())  # θ stays
    record = opt.step(k)
    assert loaded.recipe.optimizer.score_scale == 1.0 and len(grads) == 1
    return Step(z=z, grad=grads[0], generator=generator, steps=loaded.recipe.steps, record=record.host)


def randint(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=g))


def randn(g: torch.Generator, like: torch.Tensor, shape=None) -> torch.Tensor:
    return torch.randn(shape or like.shape, generator=g)


def agree(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding through a UNet: 1e-4 of the gradient's scale."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


# ----------------------------------------------------------------------------- SDS


def test_sds(pipeline):
    """DreamFusion's SDS as davidmcall/SDS-Bridge@240e06e writes it, ``2D_experiments/guidance.py``
    ``sds_loss`` (L203–248): ``noise_pred = uncond + cfg·(text − uncond)``, ``w = 1 − ᾱ_t``,
    ``grad = w·(noise_pred − noise)``; t ~ U[20, 980] (threestudio's 0.02/0.98, ``randint(min,
    max + 1)``). ``recipes/sds.yaml``: CFG 100, empty negative prompt."""
    folder, pipe = pipeline
    ref, step = Reference(pipe), sdsctl_step("sds", folder, 0)
    g, z = step.generator, step.z
    t = randint(g, 20, 981)
    noise = randn(g, z)
    x_t = ref.noised(z, noise, t)
    pred = ref.diffusers_cfg(x_t, t, "a red circle on a blue background", "", 100.0)
    assert step.record["t"] == t
    agree(step.grad, (1 - ref.alphas[t]) * (pred - noise))


# ----------------------------------------------------------------------------- NFSD


@pytest.mark.parametrize("t_range", [(20, 199), (200, 980)], ids=["t<200", "t>=200"])
def test_nfsd(pipeline, t_range):
    """Katzir et al.'s NFSD as davidmcall/SDS-Bridge@240e06e writes it, ``2D_experiments/guidance.py``
    ``nfsd_loss`` (L298–358): ``δ_C = cfg·(text − uncond)``, ``δ_D = uncond`` for t < 200 else
    ``uncond − neg``, ``grad = w·(δ_C + δ_D)``, ``w = 1 − ᾱ_t``; its negative prompt is NFSD's."""
    folder, pipe = pipeline
    lo, hi = t_range
    ref = Reference(pipe)
    step = sdsctl_step("nfsd", folder, 0, f"schedule.t_min={lo}", f"schedule.t_max={hi}")
    g, z = step.generator, step.z
    t = randint(g, lo, hi + 1)
    x_t = ref.noised(z, randn(g, z), t)
    prompt = "a red circle on a blue background"
    e_u, e_c = ref.eps(x_t, t, ""), ref.eps(x_t, t, prompt)
    delta_c = 7.5 * (e_c - e_u)
    delta_d = e_u if t < 200 else e_u - ref.eps(x_t, t, NEG)
    agree(step.grad, (1 - ref.alphas[t]) * (delta_c + delta_d))


# ----------------------------------------------------------------------------- VSD


def test_vsd_first_step(pipeline):
    """ProlificDreamer's VSD as threestudio-project/threestudio@28d9d80 writes it,
    ``threestudio/models/guidance/stable_diffusion_vsd_guidance.py`` ``compute_grad_vsd``
    (L456–559): pretrained ``uncond + guidance_scale·(text − uncond)`` minus the LoRA model's
    ``est_uncond + guidance_scale_lora·(est_camera − est_uncond)`` (1.0: its conditional
    prediction; sdsctl's single view has no camera), ``w = 1 − ᾱ_t``, one noise for both. At the
    first step the LoRA is zero (B = 0), so its prediction is the pretrained conditional one."""
    folder, pipe = pipeline
    ref, step = Reference(pipe), sdsctl_step("vsd", folder, 0)
    g, z = step.generator, step.z
    t = randint(g, 20, 981)
    x_t = ref.noised(z, randn(g, z), t)
    prompt = "a red circle on a blue background"
    pretrained = ref.diffusers_cfg(x_t, t, prompt, "", 7.5)
    agree(step.grad, (1 - ref.alphas[t]) * (pretrained - ref.eps(x_t, t, prompt)))


# ----------------------------------------------------------------------------- ISM


def lucid_ddim(eps, x, a_from, a_to):
    """LucidDreamer's ``guidance/sd_step.py::ddim_step`` at η = 0 with a negative delta (inversion):
    ``x0 = (x − √(1 − a_t)·ε)/√a_t``, ``x_next = √a_next·x0 + √(1 − a_next)·ε``."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


@pytest.mark.parametrize("k", [0, 60, 200], ids=["first", "annealing", "annealed"])
def test_ism(pipeline, k):
    """LucidDreamer's ISM, EnVision-Research/LucidDreamer@2ecf093, ``guidance/sd_utils.py``
    ``train_step`` (L346–466) and ``add_noise_with_cfg`` (L159–215), ``arguments/__init__.py``
    defaults (iterations 5000, warmup_iter 1500, delta_t 80, delta_t_start 100, xs_delta_t 200,
    xs_inv_steps 5, t_range [0.02, 0.5], max_t_range 0.98): the warm-up rate, the annealed
    ``ind_t`` range and δ_T, the noised start with offset noise 0.1, the strided inversion with
    the empty prompt, ``target = pred_scores[0][1]`` (ε at x_s, s), CFG 7.5 and
    ``grad = √((1 − ᾱ_t)/ᾱ_t)·(pred_noise − target)``."""
    folder, pipe = pipeline
    ref = Reference(pipe)
    step = sdsctl_step("ism", folder, k)
    g, z, a = step.generator, step.z, ref.alphas
    iteration = k * 5000 / step.steps  # the run's progress in LucidDreamer's iterations
    warm_up_rate = 1.0 - min(iteration / 1500, 1.0)
    current_delta_t = int(80 + warm_up_rate * (100 - 80))
    ind_t = randint(g, 20, 500 + int(480 * warm_up_rate))
    ind_prev_t = max(ind_t - current_delta_t, 0)
    noise = randn(g, z) + 0.1 * randn(g, z, (1, 4, 1, 1)).repeat(z.shape[0], 1, 1, 1)
    starting_ind = max(ind_prev_t - 200 * 5, 0)
    x = ref.noised(z, noise, starting_ind)  # add_noise_with_cfg, is_noisy_latent=False
    cur = starting_ind
    for _ in range(5):
        eps = ref.eps(x, cur, "")  # cfg <= 1: the inverse-text ('') row
        nxt = min(cur + 200, ind_prev_t)
        x = lucid_ddim(eps, x, a[cur], a[nxt])
        cur = nxt
        if cur == ind_prev_t:
            break
    target = ref.eps(x, ind_prev_t, "")  # step 2's first prediction: pred_scores[0][1]
    x_t = lucid_ddim(target, x, a[ind_prev_t], a[ind_t])
    pred_noise = ref.diffusers_cfg(x_t, ind_t, "a red circle on a blue background", "", 7.5)
    w = ((1 - a[ind_t]) / a[ind_t]) ** 0.5
    assert step.record["timesteps"] == {"t": ind_t, "s": ind_prev_t}
    agree(step.grad, w * (pred_noise - target))


# ----------------------------------------------------------------------------- CSD


def threestudio_c(value, global_step):
    """threestudio's ``C`` (``threestudio/utils/misc.py``) for ``[start_step, start, end, end_step]``."""
    start_step, start, end, end_step = value
    return start + (end - start) * max(min(1.0, (global_step - start_step) / (end_step - start_step)), 0.0)


@pytest.mark.parametrize("k", [0, 100, 300], ids=["first", "ramping", "second-half"])
def test_csd(pipeline, k):
    """CSD as CVMI-Lab/Classifier-Score-Distillation@5c65ca7 runs it:
    ``threestudio/models/guidance/deep_floyd_simple_guidance.py`` L235–263 (its "uncond" the
    negative prompt, "null" the empty one): ``grad = w·(cond·ε_y + uncond·ε_neg + null·ε_∅)``, w
    uniform, then ``grad / (grad.norm(2) + 1e-8)``; ``configs/csd-if-object.yaml``: cond_scale 1,
    uncond_scale [0, −0, −1, 5000], null_scale [0, −1, 0, 5000], max_step_percent
    [5000, 0.98, 0.5, 5001], min 0.02, max_steps 10000."""
    folder, pipe = pipeline
    ref = Reference(pipe)
    step = sdsctl_step("csd", folder, k)
    g, z = step.generator, step.z
    global_step = k * 10000 // step.steps
    max_step = int(1000 * threestudio_c([5000, 0.98, 0.5, 5001], global_step))
    t = randint(g, 20, max_step + 1)
    x_t = ref.noised(z, randn(g, z), t)
    uncond_scale = threestudio_c([0, -0.0, -1, 5000], global_step)
    null_scale = threestudio_c([0, -1, 0.0, 5000], global_step)
    grad = 1.0 * (1.0 * ref.eps(x_t, t, "a red circle on a blue background") + uncond_scale * ref.eps(x_t, t, NEG)
                  + null_scale * ref.eps(x_t, t, ""))
    grad = grad / (grad.norm(2) + 1e-8)
    agree(step.grad, grad)
    assert float(step.grad.norm()) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- SDI


def threestudio_predict(ref: Reference, x, t_unet, s):
    """threestudio SDI's ``predict_noise`` without Perp-Neg (L262–265), on the UNet's own output:
    ``noise_pred_text + s·(noise_pred_text − noise_pred_uncond)``."""
    out_u, out_c = ref.raw(x, t_unet, ""), ref.raw(x, t_unet, "a red circle on a blue background")
    return out_c + s * (out_c - out_u)


@pytest.mark.parametrize("k", [0, 250], ids=["first", "halfway"])
def test_sdi(pipeline, k):
    """SDI as threestudio-project/threestudio@28d9d80 runs it (by the paper's first author):
    ``stable_diffusion_sdi_guidance.py`` ``update_step`` (t_anneal: t = int(1000·((max − min)·(1 −
    p) + min))), ``get_inversion_timesteps`` (leading spacing, the rolled origin, the overshoot
    δ = int(random()·1000 // n)), ``ddim_inversion_step`` (its prediction-type branches, the
    η·σ noise with ``scheduler._get_variance(prev_timestep, timestep)``), ``compute_grad_sdi`` and
    the loss ``0.5·mse(latents, x̂₀)`` (grad ∝ latents − x̂₀); ``configs/sdi.yaml``:
    guidance_scale 7.5, inversion_guidance_scale −7.5, inversion_n_steps 10, inversion_eta 0.3,
    min/max step percent 0.25/0.98. One deviation, documented in ``plugins/sdi.py``: the first
    inversion step's prediction is made at timestep 0 where threestudio passes −99."""
    from diffusers import DDIMInverseScheduler

    folder, pipe = pipeline
    ref = Reference(pipe)
    step = sdsctl_step("sdi", folder, k, "seed=1")  # seed 0's first draw gives δ = 0
    g, z = step.generator, step.z
    inverse = DDIMInverseScheduler.from_config(ref.scheduler.config)
    percentage = k / step.steps
    t = int(1000 * ((0.98 - 0.25) * (1 - percentage) + 0.25))
    timesteps = (torch.arange(0, 10) * (1000 // 10)) + inverse.config.steps_offset
    timesteps = [int(v) for v in timesteps if v < t]
    timesteps = [timesteps[0] - 100, *timesteps]
    delta_t = int(float(torch.rand((), generator=g)) * 1000 // 10)
    timesteps.append(min(t + delta_t, 999))

    x = z.clone()
    for cur, nxt in zip(timesteps[:-1], timesteps[1:]):
        out = threestudio_predict(ref, x, max(cur, 0), -7.5)
        a_t = inverse.alphas_cumprod[cur] if cur >= 0 else inverse.initial_alpha_cumprod
        a_next = inverse.alphas_cumprod[nxt]
        if ref.v:
            x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        variance = ref.scheduler._get_variance(nxt, cur) ** 0.5
        x = x + 0.3 * randn(g, x) * variance
    noise_pred = threestudio_predict(ref, x, t, 7.5)
    ref.scheduler.set_timesteps(50)
    x0_hat = ref.scheduler.step(noise_pred, t, x).pred_original_sample
    assert step.record["timesteps"] == {"t": t, "t_inverted": timesteps[-1]} and timesteps[-1] > t
    agree(step.grad, z - x0_hat)


# ----------------------------------------------------------------------------- ASD


@pytest.mark.parametrize("k", [0, 250], ids=["first", "halfway"])
def test_asd(pipeline, k):
    """ASD as theEricMa/ScaleDreamer@23f433f runs it:
    ``threestudio/models/guidance/stable_diffusion_asd_guidance.py`` ``get_t_plus`` (L294–316:
    ``plus_ratio·(t − min_step)`` clamped to [0, T − t − 1], × U[0, 1), t + long(·) clamped to
    [1, T − 1]), one shared noise (L227–246), CFG ``uncond + s·(text − uncond)`` at t and the
    conditional prediction at t + Δt (``get_eps`` L376–426), ``grad = w·(noise_pred −
    noise_pred_second)`` with w = 1 − ᾱ_t (L261–283); ``asd_sd_nerf.yaml``: guidance_scale 7.5,
    plus_ratio 0.1, plus_random true, min_step_percent [0, 0.5, 0.02, 25000], max_step_percent
    [0, 0.98, 0.5, 25000], max_steps 25000."""
    folder, pipe = pipeline
    ref = Reference(pipe)
    step = sdsctl_step("asd", folder, k)
    g, z = step.generator, step.z
    global_step = k * 25000 // step.steps
    min_step = int(1000 * threestudio_c([0, 0.5, 0.02, 25000], global_step))
    max_step = int(1000 * threestudio_c([0, 0.98, 0.5, 25000], global_step))
    t = randint(g, min_step, max_step + 1)
    t_plus = min(max(0.1 * (t - min_step), 0.0), 1000 - t - 1)
    t_plus = t_plus * float(torch.rand((), generator=g))
    t_plus = min(max(t + int(t_plus), 1), 999)
    noise = randn(g, z)
    x_t, x_plus = ref.noised(z, noise, t), ref.noised(z, noise, t_plus)
    prompt = "a red circle on a blue background"
    noise_pred = ref.diffusers_cfg(x_t, t, prompt, "", 7.5)
    assert step.record["timesteps"] == {"t": t, "t_shifted": t_plus}
    agree(step.grad, (1 - ref.alphas[t]) * (noise_pred - ref.eps(x_plus, t_plus, prompt)))


# ----------------------------------------------------------------------------- SDS-Bridge


@pytest.mark.parametrize("k", [0, 300], ids=["stage-one", "stage-two"])
def test_sds_bridge(pipeline, k):
    """SDS-Bridge as davidmcall/SDS-Bridge@240e06e runs it in 2D: ``2D_experiments/generate.py``
    (cfg_scale 40 in both stages, stage two from half the run) and ``guidance.py``
    (``sds_loss`` L203–248; ``bridge_stage_two`` L250–296: ``grad = w·cfg·(ε_tgt − ε_src)``,
    prompts ``prompt + ", " + text``, w = 1 − ᾱ_t). ``recipes/sds_bridge.yaml`` keeps the source
    words the shapes prior knows."""
    folder, pipe = pipeline
    ref = Reference(pipe)
    step = sdsctl_step("sds_bridge", folder, k)
    g, z = step.generator, step.z
    t = randint(g, 20, 981)
    noise = randn(g, z)
    x_t = ref.noised(z, noise, t)
    prompt, w = "a red circle on a blue background", 1 - ref.alphas[t]
    if k < 300:
        expected = w * (ref.diffusers_cfg(x_t, t, prompt, "", 40.0) - noise)
    else:
        src = ref.eps(x_t, t, prompt + ", oversaturated, smooth, pixelated, blurry, noisy")
        tgt = ref.eps(x_t, t, prompt + ", detailed high resolution, high quality, sharp")
        expected = w * 40.0 * (tgt - src)
    agree(step.grad, expected)
