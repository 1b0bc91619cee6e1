"""MedSegDiff (Wu et al., MIDL 2023, arXiv 2211.00611) as plain torch: no nnU-Net imports.

The segmentation mask itself is the diffused variable x_0 (one channel per BraTS region, or one-hot over
the classes of a label dataset), scaled to [−1, 1]. The denoiser ε_θ(x_t, I, t) is
:class:`~nnunet_diffusion.nets.medsegdiff.MedSegDiffUNet` (eqs. 2–6).

- eq. 7 (training): L = E_{x_0,ε,t} ||ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, I, t)||²          (``training_loss``)
- eq. 1 (inference): p_θ(x_{0:T−1} | x_T) = Π_t p_θ(x_{t−1} | x_t), from x_T ~ N(0, I)  (``sample_masks``)
- several samples fused into one mask (mean, or STAPLE) and a voxel-wise uncertainty map (``fuse``,
  ``sample_variance``, ``binary_entropy``): the paper's ensembles (it cites EnsemDiff, Wolleb et al. 2021).

``prediction_type`` "epsilon" is the paper's ε-prediction; "sample" (ours) lets the denoiser predict x_0 itself
with the loss ||x_0 − x̂_0||², which learns from far fewer iterations (used by the short demo/test variants).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch

from ..diffusion import NoiseSchedule, masked_mse, noise_prediction_loss, sample
from ..nets.medsegdiff import FF_PARSER_PLACEMENTS
from ..spec import FUSIONS, DiffusionSpec, key



def mask_to_x0(y: torch.Tensor) -> torch.Tensor:
    """x_0 = 2y − 1: a {0, 1} mask (or soft target) as the diffused variable in [−1, 1]."""
    return 2.0 * y.float() - 1.0


def x0_to_probabilities(x0: torch.Tensor) -> torch.Tensor:
    """(x_0 + 1)/2 clipped to [0, 1]."""
    return ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def training_loss(denoiser, schedule: NoiseSchedule, image: torch.Tensor, y: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  prediction_type: str = "epsilon") -> torch.Tensor:
    """MedSegDiff eq. 7: E ||ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, I, t)||², t ~ U{0..T−1}, ε ~ N(0, I)
    (``prediction_type="sample"``: ||x_0 − x̂_θ(x_t, I, t)||², ours)."""
    x0 = mask_to_x0(y)
    t = schedule.sample_timesteps(x0.shape[0], x0.device, generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32, generator=generator)
    x_t = schedule.q_sample(x0, noise, t)
    predicted = denoiser(x_t, image, t)
    if prediction_type == "sample":
        return masked_mse(x0, predicted, mask)
    return noise_prediction_loss(noise, predicted, mask)


@torch.no_grad()
def sample_masks(denoiser, schedule: NoiseSchedule, image: torch.Tensor, mask_channels: int, steps: int,
                 sampler: str = "ddpm", num_samples: int = 1, seed: int = 0,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """n masks drawn by the reverse process (eq. 1) with K steps; returns (n, B, C, *spatial) probabilities in
    [0, 1]. Draw i uses a generator seeded with ``seed + i`` on the image's device (reproducible per window)."""
    shape = (image.shape[0], mask_channels, *image.shape[2:])
    draws = []
    for i in range(num_samples):
        gen = torch.Generator(device=image.device).manual_seed(int(seed) + i)
        x0 = sample(lambda x_t, t: denoiser(x_t, image, t), shape, schedule, steps, sampler, generator=gen,
                    device=image.device, clip=1.0, prediction_type=prediction_type)
        draws.append(x0_to_probabilities(x0))
    return torch.stack(draws)


def staple(binary_samples: np.ndarray) -> np.ndarray:
    """STAPLE (Warfield et al. 2004) of n binary masks (n, *spatial) → foreground probability (*spatial), by
    SimpleITK's STAPLEImageFilter. All-empty input gives zeros."""
    import SimpleITK as sitk
    if not binary_samples.any():
        return np.zeros(binary_samples.shape[1:], np.float32)
    if binary_samples.all():
        return np.ones(binary_samples.shape[1:], np.float32)
    images = [sitk.GetImageFromArray(b.astype(np.uint8)) for b in binary_samples]
    return sitk.GetArrayFromImage(sitk.STAPLE(images, 1.0)).astype(np.float32)


def fuse(samples: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """Fuse (n, B, C, *spatial) sample probabilities into (B, C, *spatial): the mean, or STAPLE of the
    samples thresholded at 0.5 (per batch element and channel)."""
    if method == "mean":
        return samples.mean(0)
    if method != "staple":
        raise ValueError(f"fusion must be one of {FUSIONS}; got {method!r}")
    binary = (samples > 0.5).cpu().numpy()
    out = np.stack([np.stack([staple(binary[:, b, c]) for c in range(binary.shape[2])])
                    for b in range(binary.shape[1])])
    return torch.from_numpy(out).to(samples.device)


def sample_variance(samples: torch.Tensor) -> torch.Tensor:
    """Voxel-wise variance over the n samples (biased, 0 for n = 1)."""
    return samples.var(0, unbiased=False)


def binary_entropy(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """H(p) = −p log₂ p − (1−p) log₂(1−p) ∈ [0, 1] per voxel and channel."""
    p = p.float().clamp(eps, 1 - eps)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


# ------------------------------------------------------------------------------------------------ trainer config
# MedSegDiff §III-B: "UNet with 4x, 5x, 6x, 6x downsamples" for S, B, L, ++
DOWNSAMPLINGS = {"S": 4, "B": 5, "L": 6, "++": 6}


@dataclass(frozen=True, kw_only=True)
class MedSegDiffSpec(DiffusionSpec):
    """trainer_configs/medsegdiff.toml."""
    HEAD: ClassVar[str] = "medsegdiff"
    size: str = key(choices=tuple(DOWNSAMPLINGS))
    width: float = key(min=0, min_open=True)
    blocks: tuple[int, ...] = key(item_min=0)
    dynamic_conditioning: bool = key()
    ff_parser: bool = key()
    ff_parser_on: str = key(choices=FF_PARSER_PLACEMENTS)
    num_epochs: int = key(min=1)
    lr: float = key(min=0, min_open=True)
    weight_decay: Optional[float] = key(default=None, min=0)
    grad_clip: float = key(min=0, min_open=True)
