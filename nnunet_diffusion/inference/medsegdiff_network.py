"""The nn.Module nnU-Net trains, checkpoints and predicts with for MedSegDiff.

Training: ``forward(I, y=target)`` returns the eq. 7 loss. Inference (eval mode, what nnU-Net's predictor
calls per window): n masks are sampled from noise with K reverse steps (eq. 1), fused (mean or STAPLE) and
returned as logits, so nnU-Net's sliding window, Gaussian weighting, export and ``--save_probabilities``
work unchanged; ``nndiff predict --uncertainty`` turns those saved probabilities into an uncertainty map.
With NNDIFF_TTA_REFINE=window (default) the samples of a window serve its mirrored passes (flipped).

With the authors' ``cal`` output (``cal_head``) each draw is read as the trainer config's ``output`` says (the
authors' blend of cal and the sample by default); the checkpoint records that choice beside the sampler, so a model
keeps predicting as it was trained to even after trainer_configs/medsegdiff.toml changed.
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
    weights_name = "MedSegDiff"
    weights_hint = ("A checkpoint trained before the authors' cal output existed (issue 33) has no cal weights: "
                    "predict it with a trainer variant that sets cal_head = false, cal_weight = 0 and output = "
                    "\"sample\" (e.g. nnUNetTrainerMedSegDiff_paperText, after renaming its result folder), or retrain.")

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, sampling: SamplingOptions,
                 mask_channels: int, region_based: bool = False, prediction_type: str = "epsilon", overrides=None,
                 output: str = "sample", cal_weight: float = 0.0):
        super().__init__(schedule, sampling, region_based, overrides)
        self.denoiser = denoiser
        self.mask_channels = mask_channels
        self.prediction_type = prediction_type
        self.output = output
        self.cal_weight = cal_weight

    def get_extra_state(self) -> dict:
        return dict(super().get_extra_state(), medsegdiff_output=self.output)

    def set_extra_state(self, state) -> None:
        if isinstance(state, dict) and "medsegdiff_output" in state:
            self.output = state["medsegdiff_output"]
        super().set_extra_state(state)

    def losses(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
        """The loss terms (eq. 7's "diffusion"; the authors' "cal" with a cal output) and their weighted "total"."""
        terms = medsegdiff.training_losses(self.denoiser, self.schedule, x, y, mask,
                                           prediction_type=self.prediction_type, has_regions=self.has_regions)
        terms["total"] = terms["diffusion"] + self.cal_weight * terms["cal"] if "cal" in terms else terms["diffusion"]
        return terms

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        if y is not None:
            return self.losses(x, y, mask)["total"]
        p = self.cached(x, lambda: self.fused_probabilities(x))
        if not self.has_regions:
            p = p / p.sum(1, keepdim=True).clamp_min(1e-6)
        return probabilities_to_logits(p, self.has_regions).to(x.dtype)

    def fused_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        opts = self.sampling
        samples = medsegdiff.sample_masks(self.denoiser, self.schedule, x, self.mask_channels, opts.steps,
                                          opts.sampler, opts.samples, opts.seed, self.prediction_type,
                                          self.output, self.has_regions)
        return medsegdiff.fuse(samples, opts.fusion)
