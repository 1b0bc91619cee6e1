"""NNDM (Mekanaboyina 2025, arXiv 2510.09681) as plain torch: no nnU-Net imports.

The paper numbers no equations; each function names the formula it implements by section:
- §4.2 residual:        e = y − ŷ                                         (``residual``)
- §4.2 forward process: q(e_t | e_{t−1}) = N(√(1−β_t) e_{t−1}, β_t I)      (``diffusion_loss`` via the core's q_sample)
- §4.2 reverse process: p_φ(e_{t−1} | e_t, x)                             (``refine`` via the core's sampler)
- §4.2 L_diff:          E ||ε_t − ε_φ(e_t, t, x)||²                          (``diffusion_loss``, "epsilon")
- §4.3 L_total:         L_seg + λ L_diff                                   (``total_loss``)
- §4.3 refinement:      ŷ_T = DiffRefine(ŷ_0, x; φ)                          (``refine`` + ``refined_probabilities``)

Conventions: ŷ are the backbone's probabilities (softmax over classes including background, or one
sigmoid per region when the dataset is region-based as BraTS is); y is the matching one-hot / region
target; e ∈ [−1, 1] per channel. The refiner is conditioned on the image x *and* on ŷ (§4.3: "ŷ_0 ... serves as
the conditioning input for the diffusion module"), i.e. ε_φ(e_t, t, x ⊕ ŷ). ``residual_conditioning=False`` is
§5.4's ablation "excluding the residual conditioning" as we read it: the refiner no longer sees ŷ_0, the mask its
residual is taken from, and models e from the image alone, ε_φ(e_t, t, x) (§4.2's formula written literally);
§5.4 reports that this "caused over-segmentation along tumor boundaries".

``prediction_type`` "epsilon" is the paper's ε-prediction. "sample" (ours, not the paper's) lets the refiner
predict e itself with the loss ||e − ê_φ(e_t, t, x ⊕ ŷ)||²: on short trainings it learns to generate e from
noise far sooner (documentation/explanation/nndm.md); sampling is the same loop for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..diffusion import NoiseSchedule, masked_mse, noise_prediction_loss, sample
from ..spec import DiffusionSpec, key
from .common import probabilities, probabilities_to_logits, target_channels  # noqa: F401 (part of this API)


def residual(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """NNDM §4.2: e = y − ŷ (the residual the diffusion model learns)."""
    return y.float() - y_hat.float()


def refiner_in_channels(num_outputs: int, num_inputs: int, residual_conditioning: bool = True) -> int:
    """Input channels of the refiner: e_t (one per output) ⊕ x ⊕ (ŷ, one per output, unless §5.4's ablation)."""
    return (2 if residual_conditioning else 1) * num_outputs + num_inputs


def refiner_input(e_t: torch.Tensor, x: torch.Tensor, y_hat: torch.Tensor,
                  residual_conditioning: bool = True) -> torch.Tensor:
    """The denoiser's input: noisy residual e_t ⊕ image x ⊕ baseline probabilities ŷ_0 (channel concat; §4.3
    "ŷ_0 ... serves as the conditioning input"). ``residual_conditioning=False`` (§5.4's ablation "excluding the
    residual conditioning"): e_t ⊕ x only, ε_φ(e_t, t, x) as §4.2 writes it; ŷ_0 is not an input at all."""
    if not residual_conditioning:
        return torch.cat([e_t.to(x.dtype), x], 1)
    return torch.cat([e_t.to(x.dtype), x, y_hat.to(x.dtype)], 1)


def diffusion_loss(refiner, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor,
                   mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   prediction_type: str = "epsilon", residual_conditioning: bool = True) -> torch.Tensor:
    """NNDM §4.2 L_diff = E_{e,t,ε} ||ε − ε_φ(e_t, t, x)||² with e = y − ŷ and
    e_t = √ᾱ_t e + √(1−ᾱ_t) ε (the closed form of q(e_t | e_{t−1}) iterated, DDPM eq. 4).
    With ``prediction_type="sample"`` the refiner predicts e and the loss is ||e − ê||² (ours).
    ``residual_conditioning``: see ``refiner_input``. Which backbone output ŷ is (the live one, or one under
    feature dropout) is the caller's choice (``residual_source`` in trainer_configs/nndm.toml)."""
    e = residual(y, y_hat)
    t = schedule.sample_timesteps(e.shape[0], e.device, generator)
    noise = torch.randn(e.shape, device=e.device, dtype=torch.float32, generator=generator)
    e_t = schedule.q_sample(e, noise, t)
    predicted = refiner(refiner_input(e_t, x, y_hat, residual_conditioning), t)
    if prediction_type == "sample":
        return masked_mse(e, predicted, mask)
    return noise_prediction_loss(noise, predicted, mask)


def total_loss(seg_loss: torch.Tensor, diff_loss: torch.Tensor, lam: float) -> torch.Tensor:
    """NNDM §4.3: L_total = L_seg + λ L_diff."""
    return seg_loss + lam * diff_loss


@torch.no_grad()
def refine(refiner, schedule: NoiseSchedule, x: torch.Tensor, y_hat: torch.Tensor, steps: int,
           sampler: str = "ddim", num_samples: int = 1, seed: int = 0,
           prediction_type: str = "epsilon", residual_conditioning: bool = True) -> torch.Tensor:
    """NNDM §4.3 DiffRefine: ê ~ p_φ(e | x, ŷ_0) by ``steps`` reverse steps from e_T ~ N(0, I)
    (§4.2 reverse process), averaged over ``num_samples`` draws. Returns ê (float32, shape of ŷ).
    ``residual_conditioning=False`` (§5.4 ablation): ê ~ p_φ(e | x), ŷ_0 only gives the shape.

    Reproducible: draw i uses a generator seeded with ``seed + i`` on x's device, so the same window
    gives the same ê whatever else was predicted before it.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    total = None
    for i in range(num_samples):
        gen = torch.Generator(device=x.device).manual_seed(int(seed) + i)
        e_hat = sample(lambda e_t, t: refiner(refiner_input(e_t, x, y_hat, residual_conditioning), t),
                       y_hat.shape, schedule, steps, sampler, generator=gen, device=x.device, clip=1.0,
                       prediction_type=prediction_type)
        total = e_hat if total is None else total + e_hat
    return total / num_samples


def refined_probabilities(y_hat: torch.Tensor, e_hat: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """ŷ_T = ŷ_0 + ê, kept a valid probability map: clipped to [0, 1]; for softmax outputs renormalised to
    sum to one over classes (y and ŷ both sum to one, so the learnt e sums to ≈ 0 already)."""
    p = (y_hat.float() + e_hat.float()).clamp(0.0, 1.0)
    if not has_regions:
        p = p / p.sum(1, keepdim=True).clamp_min(1e-6)
    return p


# ------------------------------------------------------------------------------------------------ trainer config
# where the refiner's training residual e = y - y_hat takes y_hat from: the backbone's output on the training patch
# ("backbone", "dropout": under feature dropout), a trained nnU-Net's out-of-fold predictions of the training cases
# ("oof", issue 32), or "auto": "oof" when NNDIFF_BASELINE names an nnU-Net whose every fold is trained, else "backbone"
RESIDUAL_SOURCES = ("auto", "backbone", "dropout", "oof")


@dataclass(frozen=True, kw_only=True)
class NNDMSpec(DiffusionSpec):
    """trainer_configs/nndm.toml: nnU-Net's stage (stage 1), the refiner alone (2) and both jointly (3)."""
    HEAD: ClassVar[str] = "nndm"
    STAGE_KEYS: ClassVar[tuple] = ("stage1_epochs", "stage2_epochs", "stage3_epochs")
    stage1_epochs: int = key(min=0)
    stage2_epochs: int = key(min=0)
    stage3_epochs: int = key(min=0)
    lambda_diff: float = key(min=0)
    joint_backbone_lr: float = key(min=0)
    joint_grad_through_residual: bool = key()
    refiner_channels: tuple[int, ...] = key(item_min=1)
    refiner_res_blocks: int = key(min=0)
    refiner_lr: float = key(min=0)
    refiner_weight_decay: float = key(min=0)
    refiner_grad_clip: float = key(min=0, min_open=True)
    residual_conditioning: bool = key()
    residual_source: str = key(choices=RESIDUAL_SOURCES)
    residual_dropout: float = key(min=0, max=1, max_open=True)
    oof_corruption: bool = key(default=True, doc="out-of-fold residuals: nnU-Net's cascade corruption of y_hat")

    def check(self) -> None:
        super().check()
        if not self.refiner_channels:
            self.fail("refiner_channels", "needs at least one level")
        if self.residual_source == "dropout" and not 0.0 < self.residual_dropout < 1.0:
            self.fail("residual_dropout", f'residual_source = "dropout" needs 0 < residual_dropout < 1; got '
                                          f"{self.residual_dropout}")
