"""DDMD (Fan, Cai, Niranjan, arXiv 2405.04974) as plain torch: no nnU-Net imports.

Discrepancy features (§3.2):
- image-level labels from the ground truth: normal (no tumour) / abnormal               (``image_labels``)
- the images: the patch, or its slices along the first axis (``ae_input = "slices"``)   (``to_slices``,
  ``from_slices``, ``has_image``)
- eq. 9:  AE-1 trained on all images,  L_AE-1 = Σ_j ||b_B − b̂_Bj||²                     (``ae_loss``)
  over a balanced mixture of normal and abnormal images (§4.1)                           (``balanced_weights``)
- eq. 10: AE-2 trained on normal images, L_AE-2 = Σ_j ||b_A − b̂_Aj||²                    (``ae_loss``)
- eq. 11: μ̂^AE = (1/L) Σ_j b̂_j^AE                                                          (``discrepancy``)
- eq. 12: inter-discrepancy X = (1/C) Σ_c |μ̂_c^AE-1 − μ̂_c^AE-2|                             (``discrepancy``)
- eq. 13: intra-discrepancy Y = sqrt((1/LC) Σ_j Σ_c (b̂_jc^AE-2 − μ̂_c^AE-2)²)                (``discrepancy``)
Diffusion with discrepancy features (§3.3):
- eq. 14: x_{b,t} = √ᾱ_t x_b + √(1−ᾱ_t) ε, noise on the mask only                        (``training_loss``)
- eq. 15: X_t = b ⊕ X ⊕ Y ⊕ x_{b,t}                                                       (``denoiser_input``)
- eq. 16: L_simple = E ||ε − ε_θ(X_t, t)||²  (Algorithm 1)                                 (``training_loss``)
- eq. 17 / Algorithm 2: x_{b,t−1} from x_{b,t}, from x_{b,T} ~ N(0, I); §5.1: five masks averaged,
  threshold 0.5                                                                           (``sample_masks``)

The mask is the diffused variable as in MedSegDiff (one channel per BraTS region, or one-hot classes),
scaled to [−1, 1]. ``prediction_type`` "epsilon" is the paper's eq. 16; "sample" (ours) lets the denoiser
predict the mask x_b itself, which learns from far fewer iterations (the short test/demo variants).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..diffusion import NoiseSchedule, masked_mse, noise_prediction_loss, sample
from ..spec import DiffusionSpec, key
from .medsegdiff import mask_to_x0, x0_to_probabilities

NORMAL_MODES = ("patch", "voxel")
AE_INPUTS = ("patch", "slices")


def to_slices(t: torch.Tensor) -> torch.Tensor:
    """(B, C, Z, Y, X) → (B·Z, C, Y, X): the slices along the first spatial axis as a batch of 2D images (slice k
    of item i at index i·Z + k). The first axis is the one nnU-Net's 2d configuration slices (after the plans'
    transpose: the axis of the coarsest spacing, axial on BraTS), so a slice of a 3D patch is the paper's image,
    an axial slice (§4.1). 2D input (B, C, Y, X) is returned as it is: its patches are slices already."""
    if t.ndim != 5:
        return t
    b, c, z = t.shape[:3]
    return t.transpose(1, 2).reshape(b * z, c, *t.shape[3:])


def from_slices(t: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of :func:`to_slices`: (B·Z, C, Y, X) → (B, C, Z, Y, X) for ``batch`` = B."""
    n, c = t.shape[:2]
    return t.reshape(batch, n // batch, c, *t.shape[2:]).transpose(1, 2)


def has_image(b: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the images (patches or slices) of ``b`` (N, C, …) with a non-zero voxel in some channel. An
    all-zero slice is nnU-Net's padding beyond the case, or air outside the brain once nnU-Net's BraTS
    normalisation has set it to 0: no brain, so neither a normal nor an abnormal image (the paper's images are
    middle axial slices, §4.1)."""
    return (b != 0).flatten(1).any(1)


def tumour_voxels(y: torch.Tensor, regions: bool, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, 1, …) bool: tumour voxels of the target ``y`` in the layout of ``heads.common.target_channels``
    (``regions``: one channel per region, any region is tumour; otherwise one-hot classes, background in
    channel 0). Voxels outside ``mask`` (nnU-Net's ignore label) are never tumour."""
    fg = ((y if regions else y[:, 1:]) > 0.5).any(1, keepdim=True)
    return fg & (mask > 0.5) if mask is not None else fg


def image_labels(y: torch.Tensor, regions: bool, mask: Optional[torch.Tensor] = None,
                 max_tumour_fraction: float = 0.0) -> torch.Tensor:
    """DDMD §3.2 image-level label of each patch/slice from its ground truth: True = abnormal, False = normal.
    The paper's label is the presence of tumour in the mask (§3.2, §4.1), i.e. ``max_tumour_fraction = 0``;
    a positive value (ours) also counts patches whose tumour fraction (of the counted voxels) is at most that
    as normal."""
    fg = tumour_voxels(y, regions, mask).flatten(1).float()
    counted = mask.flatten(1).float().sum(1) if mask is not None else torch.full(
        (y.shape[0],), float(fg.shape[1]), device=y.device)
    fraction = fg.sum(1) / counted.clamp_min(1.0)
    return fraction > float(max_tumour_fraction)


def balanced_weights(abnormal: torch.Tensor) -> torch.Tensor:
    """(B,) weights that make a batch the paper's balanced mixture (§4.1: "to ensure a balanced data distribution,
    the training set consists of 5,643 instances of healthy slices and an equivalent number of unhealthy slices";
    I_B, AE-1's set, is that whole set): the normal and the abnormal images of the batch weigh 1/2 each, shared
    equally inside each group; uniform 1/B when the batch holds only one of the two. They sum to 1."""
    abnormal = abnormal.bool().flatten()
    n_ab = abnormal.float().sum()
    n_no = abnormal.numel() - n_ab
    if n_ab == 0 or n_no == 0:
        return torch.full(abnormal.shape, 1.0 / abnormal.numel(), device=abnormal.device)
    return torch.where(abnormal, 0.5 / n_ab, 0.5 / n_no)


def ae_loss(ensemble, b: torch.Tensor, voxel_mask: Optional[torch.Tensor] = None,
            weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDMD eq. 9 (AE-1, all images) / eq. 10 (AE-2, normal images): Σ_j ||b − b̂_j||², as the mean squared
    error over voxels and channels (§4.3 "MSE loss") summed over the L models. ``voxel_mask`` (B, 1, …)
    restricts the error to some voxels (ours: AE-2 on the non-tumour voxels of every patch). ``weights`` (B,),
    summing to 1: each image's mean squared error weighted so (e.g. :func:`balanced_weights`, eq. 9 over the
    balanced mixture) instead of the plain batch mean; not together with ``voxel_mask``. Returns (loss,
    per-model MSE (L,) detached, for the log)."""
    if weights is not None and voxel_mask is not None:
        raise ValueError("ae_loss: weights and voxel_mask cannot be combined")
    recon = ensemble(b)
    if weights is None:
        per_model = torch.stack([masked_mse(b, r, voxel_mask) for r in recon])
    else:
        w = weights.to(torch.float32).flatten()
        per_model = torch.stack([(((b.float() - r.float()) ** 2).flatten(1).mean(1) * w).sum() for r in recon])
    return per_model.sum(), per_model.detach()


def discrepancy(recon1: Optional[torch.Tensor], recon2: torch.Tensor,
                per_channel: bool = False) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """DDMD eqs. 11–13 from the reconstructions of AE-1 and AE-2, each (L, B, C, *spatial):
    μ̂ = mean over the L models (eq. 11); X = (1/C) Σ_c |μ̂_c^AE-1 − μ̂_c^AE-2| (eq. 12);
    Y = sqrt((1/(L C)) Σ_j Σ_c (b̂_jc^AE-2 − μ̂_c^AE-2)²) (eq. 13). Returns X, Y as (B, 1, *spatial) (X is None
    without AE-1). ``per_channel``: the per-modality scores' maps instead (§3.2, "considering the c-th modality
    in Eq. (12) and (13)"), (B, C, *spatial) each."""
    recon2 = recon2.float()
    mu2 = recon2.mean(0)                                              # eq. 11
    sq = ((recon2 - mu2) ** 2).mean(0)                                # (1/L) Σ_j (b̂_jc − μ̂_c)²
    y = sq.sqrt() if per_channel else sq.mean(1, keepdim=True).sqrt()  # eq. 13
    x = None
    if recon1 is not None:
        diff = (recon1.float().mean(0) - mu2).abs()                   # eqs. 11, 12
        x = diff if per_channel else diff.mean(1, keepdim=True)
    return x, y


def condition(image: torch.Tensor, inter: Optional[torch.Tensor], intra: Optional[torch.Tensor]) -> torch.Tensor:
    """b ⊕ X ⊕ Y, leaving out what the variant does not use (DDMD-mini: b; DDMD-light: b ⊕ X; DDMD: all)."""
    return torch.cat([image] + [f.to(image.dtype) for f in (inter, intra) if f is not None], 1)


def denoiser_input(cond: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """DDMD eq. 15: X_t = b ⊕ X ⊕ Y ⊕ x_{b,t} (``cond`` = b ⊕ X ⊕ Y from :func:`condition`)."""
    return torch.cat([cond, x_t.to(cond.dtype)], 1)


def training_loss(denoiser, schedule: NoiseSchedule, cond: torch.Tensor, y: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  prediction_type: str = "epsilon") -> torch.Tensor:
    """DDMD Algorithm 1 / eq. 16: L = E ||ε − ε_θ(X_t, t)||² with x_{b,t} = √ᾱ_t x_b + √(1−ᾱ_t) ε (eq. 14)
    and X_t = b ⊕ X ⊕ Y ⊕ x_{b,t} (eq. 15); t ~ U{0..T−1}. ``prediction_type="sample"``: ||x_b − x̂_θ(X_t, t)||²
    (ours)."""
    x0 = mask_to_x0(y)
    t = schedule.sample_timesteps(x0.shape[0], x0.device, generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32, generator=generator)
    x_t = schedule.q_sample(x0, noise, t)                                            # eq. 14
    predicted = denoiser(denoiser_input(cond, x_t), t)                              # eq. 15
    if prediction_type == "sample":
        return masked_mse(x0, predicted, mask)
    return noise_prediction_loss(noise, predicted, mask)                             # eq. 16


@torch.no_grad()
def sample_masks(denoiser, schedule: NoiseSchedule, cond: torch.Tensor, mask_channels: int, steps: int,
                 sampler: str = "ddpm", num_samples: int = 5, seed: int = 0,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """DDMD Algorithm 2 (eq. 17), ``num_samples`` times (§5.1: five masks): x_{b,T} ~ N(0, I), then the
    reverse steps conditioned on X_t = b ⊕ X ⊕ Y ⊕ x_{b,t}. ``sampler="ddpm"`` with ``steps=T`` is the
    algorithm as written (σ_t² = β̃_t, fixed: the paper's learnt σ_t is not modelled); fewer steps / "ddim"
    are faster. Returns (n, B, C, *spatial) probabilities in [0, 1]; draw i uses a generator seeded with
    ``seed + i`` on the condition's device (reproducible per window)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    shape = (cond.shape[0], mask_channels, *cond.shape[2:])
    draws = []
    for i in range(num_samples):
        gen = torch.Generator(device=cond.device).manual_seed(int(seed) + i)
        x0 = sample(lambda x_t, t: denoiser(denoiser_input(cond, x_t), t), shape, schedule, steps, sampler,
                    generator=gen, device=cond.device, clip=1.0, prediction_type=prediction_type)
        draws.append(x0_to_probabilities(x0))
    return torch.stack(draws)


# ------------------------------------------------------------------------------------------------ trainer config
@dataclass(frozen=True, kw_only=True)
class DDMDSpec(DiffusionSpec):
    """trainer_configs/ddmd.toml: the autoencoder ensembles (stage 1) and the diffusion model (stage 2)."""
    HEAD: ClassVar[str] = "ddmd"
    STAGE_KEYS: ClassVar[tuple] = ("ae_epochs", "diffusion_epochs")
    inter_discrepancy: bool = key()
    intra_discrepancy: bool = key()
    ensemble_size: int = key(min=1)
    ae_channels: tuple[int, ...] = key(item_min=1)
    ae_fc: tuple[int, ...] = key(item_min=1)
    ae_lr: float = key(min=0, min_open=True)
    ae_epochs: int = key(min=0)
    ae2_normal: str = key(choices=NORMAL_MODES)
    ae_input: str = key(choices=AE_INPUTS)
    normal_max_tumour_fraction: float = key(min=0, max=1, max_open=True)
    ae1_balanced: bool = key()
    diffusion_epochs: int = key(min=1)
    lr: float = key(min=0, min_open=True)
    grad_clip: float = key(min=0, min_open=True)
    denoiser_width: float = key(min=0, min_open=True)
    denoiser_levels: int = key(min=1)
    denoiser_res_blocks: int = key(min=0)
