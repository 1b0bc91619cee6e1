"""The one diffusion core every head uses: noise schedule, forward process, loss, sampling loop.

Thin over MONAI (``monai.networks.schedulers``): the β/ᾱ schedule and the forward process q(x_t | x_0)
come from MONAI's ``DDPMScheduler`` (``NoiseSchedules`` registry, ``add_noise``). The reverse step is ours,
written once for any pair of timesteps (t → t'), because MONAI 1.6's strided sampling is inconsistent:
``set_timesteps`` spaces timesteps with ``linspace`` (MONAI PR #8623) while ``DDIMScheduler.step`` assumes a
stride of T // K and ``DDPMScheduler.step`` assumes t' = t − 1, so any K < T reads ᾱ at the wrong index.
Our step looks the previous timestep up from the actual schedule. ``tests/test_diffusion_core.py`` checks
it against MONAI's own ``step`` wherever MONAI's assumption holds (DDPM with K = T, DDIM with a uniform
stride).

Works on any tensor layout (B, C, *spatial): 2D and 3D alike.

References (equation numbers of Ho et al. 2020, "DDPM", and Song et al. 2021, "DDIM"):
- DDPM eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
- DDPM eq. 14: L_simple = E ||ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)||²
- DDPM eqs. 6–7 / DDIM eq. 12 (η = 1): ancestral posterior step
- DDIM eq. 12 (η = 0): deterministic step

Two parameterisations of the denoiser's output (``prediction_type``): "epsilon" (ε̂, DDPM's) and "sample"
(x̂_0 itself). The reverse step is the same for both; only how x̂_0 and ε̂ are read off the output differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from monai.networks.schedulers import DDPMScheduler
from tqdm import tqdm

SAMPLERS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "sample")
# the linear β range is quoted for T = 1000; this schedule rescales it to the configured T
LINEAR_FOR_T = "linear_beta_for_T"
REFERENCE_T = 1000
SCHEDULES = ("linear_beta", LINEAR_FOR_T, "scaled_linear_beta", "sigmoid_beta", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    """Training-time noise schedule. Paper defaults of NNDM §5.1: linear β from 1e-4 to 0.02, T = 1000.

    ``schedule``: one of MONAI's (``linear_beta``, ``scaled_linear_beta``, ``sigmoid_beta``, ``cosine``) or
    ``linear_beta_for_T``: the linear range ``beta_start``..``beta_end`` is read as stated for T = 1000 and scaled by
    1000 / T, i.e. β_t = linspace(β_start·1000/T, β_end·1000/T, T) (Nichol & Dhariwal 2021, improved DDPM,
    ``get_named_beta_schedule("linear")``). Σβ_t, and so ᾱ_{T−1} ≈ exp(−Σβ_t), is then about the same for any T:
    with 1e-4..0.02, ᾱ_{T−1} = 4.0e-5 at T = 1000 and 3.3e-5 at T = 250, whereas the unscaled range at T = 250 stops at
    ᾱ_{249} ≈ 0.08 (x_249 still 28 % signal) while sampling starts from pure noise.
    """
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02


class NoiseSchedule:
    """β_t, α_t, ᾱ_t for t = 0..T−1 (MONAI's schedule functions), plus the forward process."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        if config.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1; got {config.num_train_timesteps}")
        if config.schedule not in SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {SCHEDULES}; got {config.schedule!r}")
        kwargs, name = {}, config.schedule
        if config.schedule in ("linear_beta", "scaled_linear_beta", "sigmoid_beta"):
            kwargs = dict(beta_start=config.beta_start, beta_end=config.beta_end)
        elif config.schedule == LINEAR_FOR_T:
            scale = REFERENCE_T / config.num_train_timesteps
            name, kwargs = "linear_beta", dict(beta_start=config.beta_start * scale, beta_end=config.beta_end * scale)
            if not 0.0 < kwargs["beta_start"] <= kwargs["beta_end"] < 1.0:
                raise ValueError(f"beta_schedule {LINEAR_FOR_T!r}: β_start..β_end = "
                                 f"{config.beta_start}..{config.beta_end} scaled by 1000/T = {scale:g} gives "
                                 f"{kwargs['beta_start']:g}..{kwargs['beta_end']:g}; every β must lie in (0, 1) "
                                 f"(raise num_train_timesteps)")
        self.config = config
        self._monai = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, schedule=name, **kwargs)
        self.betas = self._monai.betas.double()
        self.alphas_cumprod = self._monai.alphas_cumprod.double()

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t; ᾱ_{−1} := 1 (the clean sample)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def sample_timesteps(self, batch_size: int, device, generator: Optional[torch.Generator] = None):
        """t ~ U{0, …, T−1}, one per batch element (DDPM Algorithm 1, line 3)."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """DDPM eq. 4: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (MONAI's ``add_noise``), computed in float32."""
        return self._monai.add_noise(x0.float(), noise.float(), t)


def masked_mse(target: torch.Tensor, predicted: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of (target − predicted)² over voxels and channels; ``mask`` (B,1,…) excludes voxels (e.g. nnU-Net's
    ignore label) from the mean. Computed in float32."""
    err = (target.float() - predicted.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def noise_prediction_loss(noise: torch.Tensor, predicted: torch.Tensor,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDPM eq. 14 (L_simple): E ||ε − ε_θ||² (mean over voxels and channels, ``mask`` as in masked_mse)."""
    return masked_mse(noise, predicted, mask)


def inference_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """K timesteps from T−1 down to the last one, evenly spaced ("trailing" spacing): the chain always
    starts from pure noise at t = T−1 and its last step lands on the clean sample (t' = −1)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_train_timesteps} (the schedule's T); got {steps}")
    stride = num_train_timesteps / steps
    return [int(round(num_train_timesteps - 1 - i * stride)) for i in range(steps)]


def reverse_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
                 eta: float, generator: Optional[torch.Generator] = None, clip: Optional[float] = 1.0,
                 prediction_type: str = "epsilon"):
    """One reverse step x_t → x_{t'} (t' < t, t' = −1 means the clean sample). Returns (x_{t'}, x̂_0).

    DDIM eq. 12: x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z, with x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t and
    σ = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}) (DDIM eq. 16). η = 0 is DDIM; η = 1 is DDPM's ancestral
    sampler (DDPM eqs. 6–7 with σ² = β̃), exactly so when t' = t − 1. ``model_output`` is ε̂
    (prediction_type "epsilon") or x̂_0 ("sample"); x̂_0 is clipped to ±``clip`` and ε̂ made consistent with it.
    """
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    x_t32, out32 = x_t.float(), model_output.float()
    if prediction_type == "epsilon":
        x0 = (x_t32 - (1.0 - a_t) ** 0.5 * out32) / a_t ** 0.5
        eps = out32
    elif prediction_type == "sample":
        x0, eps = out32, None
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = None
    if eps is None:  # ε consistent with the (clipped) x̂_0
        eps = (x_t32 - a_t ** 0.5 * x0) / max(1.0 - a_t, 1e-12) ** 0.5
    var = 0.0
    if eta > 0 and t_prev >= 0:
        var = eta ** 2 * (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    x_prev = a_prev ** 0.5 * x0 + max(1.0 - a_prev - var, 0.0) ** 0.5 * eps
    if var > 0:
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        x_prev = x_prev + var ** 0.5 * z
    return x_prev, x0


def sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape, schedule: NoiseSchedule,
           steps: int, sampler: str = "ddim", generator: Optional[torch.Generator] = None,
           device=None, clip: Optional[float] = 1.0, prediction_type: str = "epsilon",
           progress: bool = False) -> torch.Tensor:
    """The sampling loop (DDPM Algorithm 2 / DDIM): x_T ~ N(0, I), then K reverse steps.

    ``denoise(x_t, t)`` returns the network output for a batch (ε̂ or x̂_0, see ``prediction_type``); ``t`` is a
    (B,) long tensor. ``sampler`` is "ddpm" (ancestral, η = 1) or "ddim" (deterministic, η = 0). All
    arithmetic is float32 whatever the network's autocast dtype. ``generator`` (on ``device``) makes the
    result reproducible.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    eta = 1.0 if sampler == "ddpm" else 0.0
    ts = inference_timesteps(schedule.num_train_timesteps, steps)
    x = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    for i, t in enumerate(tqdm(ts, desc=f"{sampler} sampling", disable=not progress, leave=False)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x, _ = reverse_step(schedule, denoise(x, t_batch), t, t_prev, x, eta, generator=generator, clip=clip,
                            prediction_type=prediction_type)
    return x
