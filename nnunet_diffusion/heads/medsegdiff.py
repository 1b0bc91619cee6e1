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

What the authors' code adds to the paper (public repository ImprintLab/MedSegDiff, formerly KidsWithTokens/
MedicineToken; the code behind the paper's numbers, not described in the paper). The denoiser has a second output,
``cal``, a direct mask prediction of its conditional image path (nets/medsegdiff.py, :class:`CalDecoder`), and

- training (``guided_diffusion/gaussian_diffusion.py``, ``training_losses_segmentation``: ``loss_cal`` = the MSE
  between the mask and ``cal``; ``guided_diffusion/train_util.py``, ``forward_backward``: ``loss = (loss * weights +
  loss_cal * 10).mean()``):  L = ||ε − ε_θ||² + λ_cal ||y − cal||², λ_cal = 10            (``training_loss``)
- inference (``p_sample_loop_known``): with s the final diffusion sample and cal the ``cal`` of the last reverse
  step, the output is clip(cal + ¼ s, 0, 1) when Dice(s, cal) < 0.65, else clip(½ cal + ½ s, 0, 1)  (``blend``)

``cal_head = false`` and ``output = "sample"`` give the paper's text alone (variant ``paperText``).
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


OUTPUTS = ("blend", "sample", "cal")  # what a draw returns: the authors' blend, the diffusion sample (paper), cal
CAL_WEIGHT_AUTHORS = 10.0             # train_util.py: loss_cal * 10
BLEND_DICE = 0.65                     # p_sample_loop_known: the Dice below which cal leads the blend


def cal_probabilities(cal_logits: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """The ``cal`` output as probabilities: sigmoid per region (the authors' one-channel sigmoid), softmax over the
    classes of a label dataset."""
    return torch.sigmoid(cal_logits.float()) if has_regions else torch.softmax(cal_logits.float(), 1)


def training_losses(denoiser, schedule: NoiseSchedule, image: torch.Tensor, y: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                    prediction_type: str = "epsilon", has_regions: bool = True) -> dict[str, torch.Tensor]:
    """The terms of the training loss: "diffusion", MedSegDiff eq. 7, E ||ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, I, t)||²,
    t ~ U{0..T−1}, ε ~ N(0, I) (``prediction_type="sample"``: ||x_0 − x̂_θ(x_t, I, t)||², ours); and, for a denoiser
    with the authors' ``cal`` output, "cal" = ||y − cal||² (mean over voxels and channels; ``loss_cal``)."""
    x0 = mask_to_x0(y)
    t = schedule.sample_timesteps(x0.shape[0], x0.device, generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32, generator=generator)
    x_t = schedule.q_sample(x0, noise, t)
    out = denoiser(x_t, image, t)
    predicted, cal = out if isinstance(out, tuple) else (out, None)
    losses = {"diffusion": masked_mse(x0, predicted, mask) if prediction_type == "sample"
              else noise_prediction_loss(noise, predicted, mask)}
    if cal is not None:
        losses["cal"] = masked_mse(y.float(), cal_probabilities(cal, has_regions), mask)
    return losses


def training_loss(denoiser, schedule: NoiseSchedule, image: torch.Tensor, y: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  prediction_type: str = "epsilon", cal_weight: float = CAL_WEIGHT_AUTHORS,
                  has_regions: bool = True) -> torch.Tensor:
    """L = L_diffusion (eq. 7) + ``cal_weight`` x L_cal (the authors' code; no L_cal without a ``cal`` output)."""
    losses = training_losses(denoiser, schedule, image, y, mask, generator, prediction_type, has_regions)
    return losses["diffusion"] + cal_weight * losses["cal"] if "cal" in losses else losses["diffusion"]


def agreement_dice(sample: torch.Tensor, cal: torch.Tensor) -> torch.Tensor:
    """The authors' ``dice_score(sample, cal)`` per batch element and channel: the sample binarised (their
    ``pred > 0`` on the diffusion scale, here probability > 0.5) against the soft ``cal``; 2 Σ s·c / Σ (s + c), and 1
    where both are empty (their 0/0 is NaN, which also takes the mean branch)."""
    s = (sample > 0.5).float()
    dims = tuple(range(2, sample.ndim))
    inter, total = (s * cal).sum(dims), (s + cal).sum(dims)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-8), torch.ones_like(total))


def blend(sample: torch.Tensor, cal: torch.Tensor, threshold: float = BLEND_DICE) -> torch.Tensor:
    """The authors' final output (``p_sample_loop_known``): clip(cal + ¼ s, 0, 1) where Dice(s, cal) < ``threshold``
    (the model's two outputs disagree: trust cal), else clip(½ cal + ½ s, 0, 1); per batch element and channel."""
    low = (agreement_dice(sample, cal) < threshold).view(*sample.shape[:2], *([1] * (sample.ndim - 2)))
    return torch.where(low, cal + 0.25 * sample, 0.5 * cal + 0.5 * sample).clamp(0.0, 1.0)


@torch.no_grad()
def sample_masks(denoiser, schedule: NoiseSchedule, image: torch.Tensor, mask_channels: int, steps: int,
                 sampler: str = "ddpm", num_samples: int = 1, seed: int = 0,
                 prediction_type: str = "epsilon", output: str = "sample", has_regions: bool = True) -> torch.Tensor:
    """n masks drawn by the reverse process (eq. 1) with K steps; returns (n, B, C, *spatial) probabilities in
    [0, 1]. Draw i uses a generator seeded with ``seed + i`` on the image's device (reproducible per window).
    ``output`` (:data:`OUTPUTS`): each draw's diffusion sample (the paper), the ``cal`` of its last reverse step, or
    the authors' :func:`blend` of the two; "blend" and "cal" need a denoiser with the ``cal`` output."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
    shape = (image.shape[0], mask_channels, *image.shape[2:])
    draws = []
    for i in range(num_samples):
        gen = torch.Generator(device=image.device).manual_seed(int(seed) + i)
        last = {}

        def denoise(x_t, t):
            out = denoiser(x_t, image, t)
            if isinstance(out, tuple):
                out, last["cal"] = out
            return out

        s = x0_to_probabilities(sample(denoise, shape, schedule, steps, sampler, generator=gen, device=image.device,
                                       clip=1.0, prediction_type=prediction_type))
        if output != "sample":
            if "cal" not in last:
                raise ValueError(f"output {output!r} needs the denoiser's cal output (cal_head); this denoiser has "
                                 f"none")
            cal = cal_probabilities(last["cal"], has_regions)
            s = cal if output == "cal" else blend(s, cal)
        draws.append(s)
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
    PREDICT_ONLY: ClassVar[frozenset] = DiffusionSpec.PREDICT_ONLY | {"output"}
    size: str = key(choices=tuple(DOWNSAMPLINGS))
    width: float = key(min=0, min_open=True)
    blocks: tuple[int, ...] = key(item_min=0)
    dynamic_conditioning: bool = key()
    ff_parser: bool = key()
    ff_parser_on: str = key(choices=FF_PARSER_PLACEMENTS)
    cal_head: bool = key(doc="the authors' direct mask output cal (their code, not the paper)")
    cal_weight: float = key(min=0, doc="λ_cal of L = L_diffusion + λ_cal ||y − cal||² (the authors' code: 10)")
    output: str = key(choices=OUTPUTS, doc="a draw's result: the authors' blend of cal and the sample, the sample "
                                           "(the paper), or cal")
    num_epochs: int = key(min=1)
    lr: float = key(min=0, min_open=True)
    weight_decay: Optional[float] = key(default=None, min=0)
    grad_clip: float = key(min=0, min_open=True)

    def check(self) -> None:
        super().check()
        if not self.cal_head and self.output != "sample":
            self.fail("output", f"{self.output!r} needs the cal output; with cal_head = false only \"sample\" exists")
        if not self.cal_head and self.cal_weight:
            self.fail("cal_weight", f"must be 0 with cal_head = false (there is no cal to train); got "
                                    f"{self.cal_weight:g}")
