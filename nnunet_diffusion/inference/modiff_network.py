"""The nn.Module nnU-Net trains, checkpoints and predicts with for MoDiff.

Training: ``forward(I, y=probability label map)`` returns the eq. 8 loss (``losses`` returns its parts).
Inference (eval mode, nnU-Net's predictor calls it per window): n probability label maps are sampled from noise
(``sample_probabilities``) and fused (mean, or STAPLE of the samples thresholded at 0.5). For a multi-rater dataset
(persistent buffer ``raters`` = R > 0) the fused foreground probability P̄ becomes probabilities of the vote counts
0..R (Binomial(R, P̄), see ``heads.modiff.vote_count_probabilities``), so nnU-Net exports the predicted number of
raters per voxel; otherwise the fused maps are returned as MedSegDiff does. The individual binarised samples (the
paper's diverse samples; ``reading`` and ``threshold``, see ``heads.modiff.binarize_sample``) are written by
``inference/modiff_samples.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..heads import medsegdiff, modiff
from ..heads.common import probabilities_to_logits
from .options import SamplingOptions
from .sampling_network import SamplingNetwork


class MoDiffNetwork(SamplingNetwork):
    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, sampling: SamplingOptions,
                 mask_channels: int, region_based: bool = False, prediction_type: str = "epsilon",
                 lambda_ldf: float = 0.5, lambda_mca: float = 0.5, threshold: float = modiff.PAPER_THRESHOLD,
                 reading: str = "threshold", overrides=None):
        super().__init__(schedule, sampling, region_based, overrides)
        self.denoiser = denoiser
        self.mask_channels = mask_channels
        self.prediction_type = prediction_type
        self.lambda_ldf, self.lambda_mca = float(lambda_ldf), float(lambda_mca)
        self.threshold = float(threshold)
        if reading not in modiff.SAMPLE_READINGS:
            raise ValueError(f"sample_reading must be one of {modiff.SAMPLE_READINGS}; got {reading!r}")
        self.reading = reading  # how a sample's probability map is binarised (heads.modiff.binarize_sample)
        # R raters of a vote-count dataset (dataset.json "nndiff_raters"); 0 = a single-rater dataset
        self.register_buffer("raters", torch.tensor(0, dtype=torch.int64))

    @property
    def num_raters(self) -> int:
        return int(self.raters.item())

    def losses(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
        return modiff.training_losses(self.denoiser, self.schedule, x, y, mask, prediction_type=self.prediction_type,
                                      lambda_ldf=self.lambda_ldf, lambda_mca=self.lambda_mca)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        if y is not None:
            return self.losses(x, y, mask)["loss"]
        p = self.cached(x, lambda: self.fused_probabilities(x))
        if self.num_raters:
            return probabilities_to_logits(modiff.vote_count_probabilities(p, self.num_raters), False).to(x.dtype)
        if not self.has_regions:
            p = p / p.sum(1, keepdim=True).clamp_min(1e-6)
        return probabilities_to_logits(p, self.has_regions).to(x.dtype)

    def sample_probabilities(self, x: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        """n samples for the window ``x``: (n, B, 1, …) foreground probabilities for a multi-rater dataset,
        (n, B, C, …) probability maps otherwise (the config's / NNDIFF_* sampler, steps and seed)."""
        opts = self.sampling
        samples = modiff.sample_probabilities(self.denoiser, self.schedule, x, self.mask_channels, opts.steps,
                                              opts.sampler, num_samples or opts.samples, opts.seed,
                                              self.prediction_type)
        if self.num_raters:
            n, b = samples.shape[:2]
            samples = modiff.foreground_probability(samples.flatten(0, 1)).unflatten(0, (n, b))
        return samples

    def fused_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return medsegdiff.fuse(self.sample_probabilities(x), self.sampling.fusion)
