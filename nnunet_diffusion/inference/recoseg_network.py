"""The nn.Module nnU-Net trains, checkpoints and predicts with for ReCoSeg: T1ce synthesiser + segmenter.

Calls:
- ``forward(x, mode="synthesis_loss")`` (stage 1): the DDPM loss of the synthesiser on the C input channels.
- ``forward(x)`` with C + 1 channels (stage 2 training and online validation): the last channel is the
  residual map the trainer computed once after stage 1 and nnU-Net's data pipeline cropped and augmented with
  the image; the segmenter alone runs.
- ``forward(x)`` with C channels in eval mode (``nnUNetv2_predict``, the final validation): synthesise T1ce with
  K reverse steps, r = |synthetic − real|, segment x ⊕ r. Once per window: the mirrored passes of nnU-Net's
  test-time augmentation reuse the window's x ⊕ r, flipped (NNDIFF_TTA_REFINE=window, the default).

The synthesis target's channel index is a persistent buffer (``build_network_architecture`` is not given
dataset.json; the trainer fills it from the channel names and the checkpoint carries it to the predictor).
"""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion import PREDICTION_TYPES, NoiseSchedule
from ..errors import NNDiffConfigError
from ..heads import recoseg
from .options import SamplingOptions
from .sampling_network import SamplingNetwork


class ReCoSegNetwork(SamplingNetwork):
    supports_missing = True
    supports_samples = False  # one synthetic T1ce per window (the paper's); several would need a fusion rule

    def __init__(self, synthesizer: nn.Module, segmenter: nn.Module, schedule: NoiseSchedule,
                 sampling: SamplingOptions, num_input_channels: int, prediction_type: str = "epsilon",
                 clip: float | None = None, region_based: bool = False):
        super().__init__(schedule, sampling, region_based)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        self.synthesizer = synthesizer
        self.segmenter = segmenter
        self.num_input_channels = int(num_input_channels)
        self.prediction_type = prediction_type
        self.clip = clip
        self.register_buffer("target_channel", torch.tensor(-1, dtype=torch.long))

    # nnU-Net's set_deep_supervision_enabled reaches for ``network.decoder``
    @property
    def decoder(self):
        return self.segmenter.decoder

    @property
    def target(self) -> int:
        t = int(self.target_channel)
        if not 0 <= t < self.num_input_channels:
            raise NNDiffConfigError("ReCoSeg network: the synthesis target channel was never set (the trainer sets "
                                    "it from dataset.json when it initialises); these weights are not from a "
                                    "ReCoSeg training")
        return t

    def _check_missing(self) -> tuple:
        bad = [m for m in self.sampling.missing if m >= self.num_input_channels]
        if bad:
            raise NNDiffConfigError(f"NNDIFF_MISSING: channel(s) {bad} do not exist; this model has "
                                    f"{self.num_input_channels} input channels (0..{self.num_input_channels - 1})")
        return tuple(self.sampling.missing)

    def forward(self, x: torch.Tensor, mode: str | None = None, tie_frozen: bool = False):
        if mode == "synthesis_loss":
            loss = recoseg.synthesis_loss(self.synthesizer, self.schedule, x, self.target,
                                          prediction_type=self.prediction_type)
            return loss + (_zero(self.segmenter, x) if tie_frozen else 0.0)
        if mode == "segment":
            out = self.segmenter(x)
            return out, (_zero(self.synthesizer, x) if tie_frozen else x.new_zeros((), dtype=torch.float32))
        if mode is not None:
            raise ValueError(f"unknown mode {mode!r}")
        c = x.shape[1]
        if c == self.num_input_channels + 1:
            return self.segmenter(x)
        if c != self.num_input_channels:
            raise NNDiffConfigError(f"ReCoSeg network: input has {c} channels, expected {self.num_input_channels} "
                                    f"(images) or {self.num_input_channels + 1} (images + residual map)")
        if self.training:
            raise RuntimeError("ReCoSeg trains the segmenter on precomputed residual maps (C + 1 channels); "
                               "synthesising inside a training step is not supported")
        return self.segmenter(self.cached(x, lambda: self.segmenter_input(x)))

    @torch.no_grad()
    def segmenter_input(self, x: torch.Tensor) -> torch.Tensor:
        """x ⊕ r for one window (missing channels handled as ``heads.recoseg`` describes)."""
        x_seg, r = self.residual(x)
        return recoseg.segmenter_input(x_seg, r)

    @torch.no_grad()
    def residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x as the segmenter sees it, r = |synthetic T1ce − T1ce|) for one window (ReCoSeg §2)."""
        opts = self.sampling
        return recoseg.residual_for_window(self.synthesizer, self.schedule, x, self.target, opts.steps,
                                           opts.sampler, opts.seed, self.prediction_type, self.clip,
                                           self._check_missing())


def _zero(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """0 · Σ parameters: ties a module that takes no part in this stage into the graph, as DDP (nnU-Net wraps
    without find_unused_parameters) needs every parameter in every backward."""
    zero = like.new_zeros((), dtype=torch.float32)
    for p in module.parameters():
        zero = zero + 0.0 * p.float().sum()
    return zero
