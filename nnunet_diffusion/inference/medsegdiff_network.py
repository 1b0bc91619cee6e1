"""The nn.Module nnU-Net trains, checkpoints and predicts with for MedSegDiff.

Training: ``forward(I, y=target)`` returns the eq. 7 loss. Inference (eval mode, what nnU-Net's predictor
calls per window): n masks are sampled from noise with K reverse steps (eq. 1), fused (mean or STAPLE) and
returned as logits, so nnU-Net's sliding window, Gaussian weighting, export and ``--save_probabilities``
work unchanged; ``nndiff predict --uncertainty`` turns those saved probabilities into an uncertainty map.
With NNDIFF_TTA_REFINE=window (default) the samples of a window serve its mirrored passes (flipped).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..heads import medsegdiff
from ..heads.common import probabilities_to_logits
from .options import SamplingOptions
from .sampling_network import SamplingNetwork


class MedSegDiffNetwork(SamplingNetwork):
    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, sampling: SamplingOptions,
                 mask_channels: int, region_based: bool = False, prediction_type: str = "epsilon", overrides=None):
        super().__init__(schedule, sampling, region_based, overrides)
        self.denoiser = denoiser
        self.mask_channels = mask_channels
        self.prediction_type = prediction_type

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        if y is not None:
            return medsegdiff.training_loss(self.denoiser, self.schedule, x, y, mask,
                                            prediction_type=self.prediction_type)
        p = self.cached(x, lambda: self.fused_probabilities(x))
        if not self.has_regions:
            p = p / p.sum(1, keepdim=True).clamp_min(1e-6)
        return probabilities_to_logits(p, self.has_regions).to(x.dtype)

    def fused_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        opts = self.sampling
        samples = medsegdiff.sample_masks(self.denoiser, self.schedule, x, self.mask_channels, opts.steps,
                                          opts.sampler, opts.samples, opts.seed, self.prediction_type)
        return medsegdiff.fuse(samples, opts.fusion)
