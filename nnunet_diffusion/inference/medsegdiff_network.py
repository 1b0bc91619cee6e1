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
from .mirror_cache import MirrorCache
from .options import SamplingOptions


class MedSegDiffNetwork(nn.Module):
    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, sampling: SamplingOptions,
                 mask_channels: int, region_based: bool = False):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule
        self.sampling = sampling
        self.mask_channels = mask_channels
        self.register_buffer("region_based", torch.tensor(int(region_based), dtype=torch.uint8))
        self._mirror_cache = MirrorCache()

    @property
    def has_regions(self) -> bool:
        return bool(self.region_based.item())

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        if y is not None:
            return medsegdiff.training_loss(self.denoiser, self.schedule, x, y, mask)
        opts = self.sampling
        p = self._mirror_cache.get_or_compute(x, lambda: self.fused_probabilities(x),
                                              enabled=opts.tta_refine == "window")
        if not self.has_regions:
            p = p / p.sum(1, keepdim=True).clamp_min(1e-6)
        return probabilities_to_logits(p, self.has_regions).to(x.dtype)

    def fused_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        opts = self.sampling
        samples = medsegdiff.sample_masks(self.denoiser, self.schedule, x, self.mask_channels, opts.steps,
                                          opts.sampler, opts.samples, opts.seed)
        return medsegdiff.fuse(samples, opts.fusion)

    def set_sampling(self, sampling: SamplingOptions) -> None:
        self.sampling = sampling
        self._mirror_cache.clear()

    def train(self, mode: bool = True):
        self._mirror_cache.clear()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._mirror_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
