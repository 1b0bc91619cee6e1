"""MoDiff (Ahn et al., MICCAI 2025) as plain torch: no nnU-Net imports.

Probability label maps (MoDiff §1, §3): the diffused variable x_0 is not a one-hot mask but the mean of the raters'
one-hot maps. A multi-rater dataset stores, per voxel, the number k of raters who marked it (0..R, see
``dataset_conversion/multirater.py``); the probability of foreground is P = k/R and the probability label map over
(background, foreground) is [1 − P, P]. nnU-Net sizes the network by the R + 1 vote-count labels, so x_0 has R + 1
channels: [1 − P, P, 0, …, 0] (the vote-count classes 2..R exist only so that nnU-Net resamples and augments the
counts; their channels are empty). With R = 1, or on a single-rater label dataset, this is exactly the one-hot map;
single-rater region datasets (BraTS) diffuse their region maps (``heads.common.target_channels``).

- eq. 8 (training): L_total = L_simple + λ1 L_LDF + λ2 L_MCA, λ1 = λ2 = 0.5            (``training_losses``)
  * L_simple: DDPM's ||ε − ε_θ(x_t, c_t, t)||² (paper §3.3); ``prediction_type="sample"``: ||x_0 − x̂_0||² (ours)
  * L_LDF (eq. 7): ||LDF(y^B) − y^B_target||², "to ensure the generated feature map preserves the original image's
    morphological details" (§3.3). y^B = [f(B) ‖ S'] (eq. 3) is MCA's token map; the paper leaves y^B_target
    undefined ("the ideal morphological feature map"). Ours, the nearest faithful reading (``nets.modiff.MCA``): a
    learned 1×1 read-out of LDF(y^B) against the image's morphology M(B) (per-channel morphological gradient scaled
    to [0, 1], averaged over each query patch); in the "LDF only" ablation (no y^B), LDF(B) itself against M(B).
  * L_MCA: "attention regularisation ... prevents bias toward specific patches" (§3.3, no formula). Ours:
    KL(ū ‖ uniform) where ū_k is the attention label patch k receives, averaged over all query patches, after a
    softmax over the keys of eq. 2's (softmax-free) scores. 0 when every label patch gets the same attention.
- sampling (§4.1): n samples from noise per image (16 and 32 in the paper)                (``sample_probabilities``),
  each binarised (``binarize_sample``): by default as the paper does, every sampled map cut at 0.9 ("retaining only
  the pixels with a probability of 0.9 or higher", §4.1; ``sample_reading = "threshold"``); ours,
  ``sample_reading = "raters"``: sample i keeps the voxels that at least k_i = 1 + (i mod R) of the R raters mark in
  its sampled map (our reading of the abstract's "presence of individual radiologist labels").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..diffusion import NoiseSchedule, masked_mse, noise_prediction_loss
from ..spec import DiffusionSpec, key
from ..nets.modiff import morphological_gradient, morphology_target  # noqa: F401  (re-exported)
from .medsegdiff import mask_to_x0, sample_masks

PAPER_THRESHOLD = 0.9  # MoDiff §4.1
SAMPLE_READINGS = ("raters", "threshold")  # how a sampled probability map becomes a binary sample (binarize_sample)


# ------------------------------------------------------------------------------------------------ targets
def vote_counts_to_probability(counts: torch.Tensor, raters: int) -> torch.Tensor:
    """P = k / R: the mean of R raters' binary masks from the vote-count map k (any shape, values 0..R)."""
    if raters < 1:
        raise ValueError(f"raters must be >= 1; got {raters}")
    return counts.float().clamp(0, raters) / float(raters)


def probability_label_map(p: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 1, …) foreground probability P → (B, channels, …) probability label map [1 − P, P, 0, …]: the mean of the
    raters' one-hot (background, foreground) maps, padded with empty channels to the network's ``channels``."""
    if channels < 2:
        raise ValueError(f"a probability label map needs >= 2 channels; got {channels}")
    p = p.float()
    pad = p.new_zeros((p.shape[0], channels - 2, *p.shape[2:]))
    return torch.cat([1.0 - p, p, pad], 1)


def foreground_probability(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`probability_label_map`: P from a (possibly sampled) map, the mean of channel 1 and
    1 − channel 0, clipped to [0, 1]; shape (…, 1, *spatial)."""
    return ((y[:, 1:2].float() + 1.0 - y[:, 0:1].float()) / 2.0).clamp(0.0, 1.0)


def ldf_target(image: torch.Tensor, patch) -> torch.Tensor:
    """y^B_target of MoDiff eq. 7 (our reading, see the module docstring): the image's morphology on MCA's query grid
    (``nets.modiff.morphology_target``)."""
    return morphology_target(image, patch)


def attention_balance_loss(scores: Optional[torch.Tensor]) -> torch.Tensor:
    """L_MCA (ours, see module docstring): KL(ū ‖ U) = Σ_k ū_k log(N_k ū_k), ū = mean over queries of softmax over
    keys of the (B, N_q, N_k) scores of eq. 2. ≥ 0; 0 iff all label patches receive equal attention."""
    if scores is None:
        return torch.zeros(())
    u = torch.softmax(scores.float(), dim=-1).mean(1)                      # (B, N_k)
    n_k = scores.shape[-1]
    return (u * torch.log(u.clamp_min(1e-12) * n_k)).sum(-1).mean()


# ------------------------------------------------------------------------------------------------ training
def training_losses(denoiser, schedule: NoiseSchedule, image: torch.Tensor, y: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                    prediction_type: str = "epsilon", lambda_ldf: float = 0.5, lambda_mca: float = 0.5) -> dict:
    """MoDiff eq. 8: {"loss": L_simple + λ1 L_LDF + λ2 L_MCA, "simple", "ldf", "mca"} for a batch of images and
    probability label maps ``y`` ∈ [0, 1]. L_LDF is 0 without LDF, L_MCA 0 without MCA (Table 3 ablations).

    Eq. 7: L_LDF = E‖LDF(y^B) − y^B_target‖², computed as the mean of (aux["ldf_pred"] − aux["ldf_target"])² over
    MCA's query grid: r(LDF(y^B)) against the image's morphology M(B) (our reading; ``nets.modiff.MCA``)."""
    x0 = mask_to_x0(y)
    t = schedule.sample_timesteps(x0.shape[0], x0.device, generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=torch.float32, generator=generator)
    x_t = schedule.q_sample(x0, noise, t)
    predicted, aux = denoiser(x_t, image, t, return_aux=True)
    if prediction_type == "sample":
        simple = masked_mse(x0, predicted, mask)
    else:
        simple = noise_prediction_loss(noise, predicted, mask)
    zero = simple.new_zeros(())
    ldf = masked_mse(aux["ldf_target"], aux["ldf_pred"]) if aux.get("ldf_pred") is not None else zero  # eq. 7
    mca = attention_balance_loss(aux.get("scores")).to(simple) if aux.get("scores") is not None else zero
    total = simple + float(lambda_ldf) * ldf + float(lambda_mca) * mca                       # eq. 8
    return {"loss": total, "simple": simple, "ldf": ldf, "mca": mca}


# ------------------------------------------------------------------------------------------------ sampling
# n probability label maps drawn by the reverse process with K steps, (n, B, C, *spatial) in [0, 1], draw i seeded
# with seed + i: the same loop as MedSegDiff's (the denoiser is called as denoiser(x_t, image, t) in both)
sample_probabilities = sample_masks


def binarize(p: torch.Tensor, threshold: float = PAPER_THRESHOLD) -> torch.Tensor:
    """MoDiff §4.1: a sample's binary mask keeps the voxels with probability ≥ ``threshold`` (paper: 0.9)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"binarisation threshold must be in (0, 1]; got {threshold}")
    return p >= threshold


def rater_level(i: int, raters: int) -> int:
    """k_i = 1 + (i mod R): the number of raters whose label sample i (0-based) reads as present ("raters" reading).
    Cycling through 1..R makes every R consecutive samples cover all consensus levels."""
    return 1 + int(i) % max(int(raters), 1)


def sample_threshold(i: int, raters: int, reading: str = "threshold", threshold: float = PAPER_THRESHOLD) -> float:
    """The foreground-probability cut of sample i (0-based) under a ``reading`` (see :func:`binarize_sample`)."""
    if reading == "threshold":
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"binarisation threshold must be in (0, 1]; got {threshold}")
        return float(threshold)
    if reading == "raters":
        r = max(int(raters), 1)
        return (rater_level(i, r) - 0.5) / r
    raise ValueError(f"sample_reading must be one of {SAMPLE_READINGS}; got {reading!r}")


def binarize_sample(p: torch.Tensor, i: int, raters: int, reading: str = "threshold",
                    threshold: float = PAPER_THRESHOLD) -> torch.Tensor:
    """Sample i's binary mask from its sampled foreground probability map P̂ (values ≈ k/R).

    MoDiff abstract: "By determining the presence of individual radiologist labels, MoDiff enables diverse
    sampling"; §4.1: "the binary masks for each image were generated by thresholding the predicted probability maps
    at 0.9, retaining only the pixels with a probability of 0.9 or higher". Two readings (``reading``):

    * "threshold" (§4.1, the default): P̂ ≥ ``threshold`` (0.9) for every sample. A P̂ of k/R passes only when
      k/R ≥ 0.9, i.e. where (nearly) all raters agree: the samples differ only where the sampled maps themselves
      differ, and a model that has learned P = k/R well returns the raters' intersection every time.
    * "raters" (ours, our reading of "determining the presence of individual radiologist labels"): P̂ is read as the
      mean of R rater masks, and sample i decides how many raters' labels are present: k_i = 1 + (i mod R)
      (:func:`rater_level`), mask = P̂ ≥ (k_i − ½)/R, i.e. "at least k_i of the R raters marked the voxel" (the ½/R
      margin absorbs the sampling noise of P̂ around k/R). Over the k_i, a voxel is in the fraction ≈ P̂ of the
      samples, so the samples' mean is the raters' mean and they vary where the raters disagree; that diversity
      comes from the index i, not from the model's draws (measured in trainer_configs/modiff.toml and
      benchmarks/modiff_diversity.py). With R = 1 it is the cut P̂ ≥ 0.5. The variant ``_raters``.
    """
    return p >= sample_threshold(i, raters, reading, threshold)


def vote_count_probabilities(p: torch.Tensor, raters: int) -> torch.Tensor:
    """(B, 1, …) foreground probability P → (B, R + 1, …) probabilities of the vote counts k = 0..R, taken as
    Binomial(R, P) (ours: R raters each marking the voxel with probability P). Its mode is the vote count nearest
    R·P, so nnU-Net's argmax exports the predicted number of raters; for R = 1 it is [1 − P, P]."""
    p = p.float().clamp(1e-6, 1 - 1e-6)
    k = torch.arange(raters + 1, device=p.device, dtype=torch.float32).view(1, -1, *([1] * (p.ndim - 2)))
    log_binom = torch.tensor([math.lgamma(raters + 1) - math.lgamma(i + 1) - math.lgamma(raters - i + 1)
                              for i in range(raters + 1)], device=p.device).view_as(k)
    return torch.exp(log_binom + k * torch.log(p) + (raters - k) * torch.log1p(-p))


# ------------------------------------------------------------------------------------------------ trainer config
@dataclass(frozen=True, kw_only=True)
class MoDiffSpec(DiffusionSpec):
    """trainer_configs/modiff.toml."""
    HEAD: ClassVar[str] = "modiff"
    PREDICT_ONLY: ClassVar[frozenset] = DiffusionSpec.PREDICT_ONLY | {"binarize_threshold", "sample_reading"}
    use_mca: bool = key()
    use_ldf: bool = key()
    heads: int = key(min=1)
    embed_dim: int = key(min=1)
    model_dim: int = key(min=1)
    cond_channels: int = key(min=1)
    max_tokens: int = key(min=1)
    ldf_width: int = key(min=1)
    width: float = key(min=0, min_open=True)
    levels: int = key(min=1)
    num_res_blocks: int = key(min=0)
    lambda_ldf: float = key(min=0)
    lambda_mca: float = key(min=0)
    num_epochs: int = key(min=1)
    lr: float = key(min=0, min_open=True)
    weight_decay: Optional[float] = key(default=None, min=0)
    plateau_factor: float = key(min=0, max=1, min_open=True, max_open=True)
    plateau_patience: int = key(min=0)
    grad_clip: float = key(min=0, min_open=True)
    sample_reading: str = key(choices=SAMPLE_READINGS)
    binarize_threshold: float = key(min=0, max=1, min_open=True)

    def check(self) -> None:
        super().check()
        if self.model_dim % self.heads:
            self.fail("model_dim", f"{self.model_dim} must be divisible by heads ({self.heads})")
