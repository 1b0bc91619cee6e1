"""The nn.Module nnU-Net trains, checkpoints and predicts with for ReCoSeg: T1ce synthesiser + segmenter.

Calls:
- ``forward(x, mode="synthesis_loss")`` (stage 1): the DDPM loss of the synthesiser on the C input channels.
- ``forward(x)`` with C + 1 channels (stage 2 training and online validation): the last channel is the
  residual map the trainer computed once after stage 1 and nnU-Net's data pipeline cropped and augmented with
  the image; the segmenter alone runs.
- ``nnUNetv2_predict``, the final validation and ``nndiff predict``: before nnU-Net's sliding window runs, the
  predictor hands the whole case to ``nnunet_predictor_case_input`` (the hook ``nnunet_compat.install_case_input_hook``,
  installed when a ReCoSeg network is built, not when the package is imported), which replaces it by x ⊕ r of the
  whole case (``case_input`` → ``recoseg_residuals.case_residual``: T1ce synthesised per window with K reverse steps,
  Gaussian-blended over the case, r = |synthetic − real|), the very function that made stage 2's training residuals;
  nnU-Net's sliding window (and its mirroring) then runs the segmenter on C + 1 channels, as in training. The
  predictor of any other network is nnU-Net's own.
- ``forward(x)`` with C channels in eval mode (a direct call, not from nnU-Net's predictor): each batch element is
  taken as a whole case of one window, through the same ``case_input``.

With ``synthesis_cases = "cross"`` (issue 32) the network also holds ``cross_synthesizers``: synthesiser k ≥ 1,
each blind to one chunk of the fold's training cases, which makes only the training residual maps of that chunk
(``using``); ``synthesizer`` (k = 0) makes chunk 0's and every other map, and is the one prediction uses.

The synthesis target's channel index is a persistent buffer (``build_network_architecture`` is not given
dataset.json; the trainer fills it from the channel names and the checkpoint carries it to the predictor).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch
from torch import nn

from .. import nnunet_compat
from ..diffusion import PREDICTION_TYPES, NoiseSchedule
from ..errors import NNDiffConfigError
from ..heads import recoseg
from . import recoseg_residuals
from .options import SamplingOptions
from .sampling_network import SamplingNetwork


class ReCoSegNetwork(SamplingNetwork):
    whole_case_residual = True  # nnU-Net's predictor hands it x ⊕ r of the whole case (nnunet_predictor_case_input)
    supports_missing = True
    supports_samples = False  # one synthetic T1ce per window (the paper's); several would need a fusion rule

    def __init__(self, synthesizer: nn.Module, segmenter: nn.Module, schedule: NoiseSchedule,
                 sampling: SamplingOptions, num_input_channels: int, prediction_type: str = "epsilon",
                 clip: float | None = None, region_based: bool = False, overrides=None,
                 cross_synthesizers: Sequence[nn.Module] = ()):
        super().__init__(schedule, sampling, region_based, overrides)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        self.synthesizer = synthesizer
        self.cross_synthesizers = nn.ModuleList(cross_synthesizers)
        self.active_synthesizer = 0  # which synthesiser synthesise_window uses (``using``); 0 outside training
        self.segmenter = segmenter
        self.num_input_channels = int(num_input_channels)
        self.prediction_type = prediction_type
        self.clip = clip
        self.register_buffer("target_channel", torch.tensor(-1, dtype=torch.long))
        nnunet_compat.install_case_input_hook()  # nnU-Net's predictor asks nnunet_predictor_case_input for the case

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

    def missing_channels(self) -> tuple:
        """NNDIFF_MISSING's channels, checked against this model's channels."""
        bad = [m for m in self.sampling.missing if m >= self.num_input_channels]
        if bad:
            raise NNDiffConfigError(f"NNDIFF_MISSING: channel(s) {bad} do not exist; this model has "
                                    f"{self.num_input_channels} input channels (0..{self.num_input_channels - 1})")
        return tuple(self.sampling.missing)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As many cross synthesisers as the checkpoint has (copies of synthesiser 0's architecture, which they
        share): prediction uses synthesiser 0 only, so a model trained with another ``synthesis_cases`` (e.g. one
        synthesiser, before "cross" was the default) still loads and predicts as it was trained to."""
        n = len({k.split(".")[1] for k in state_dict if k.startswith("cross_synthesizers.")})
        if n != len(self.cross_synthesizers):
            self.cross_synthesizers = nn.ModuleList(copy.deepcopy(self.synthesizer) for _ in range(n))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def synthesizers(self) -> list[nn.Module]:
        """Synthesiser 0 (``synthesizer``, the one prediction uses), then the cross synthesisers 1 .. K − 1."""
        return [self.synthesizer, *self.cross_synthesizers]

    @contextmanager
    def using(self, k: int):
        """Synthesise with synthesiser ``k`` inside the block (the training residual maps of chunk k)."""
        if not 0 <= k < len(self.synthesizers()):
            raise ValueError(f"synthesiser {k} does not exist; this network has {len(self.synthesizers())}")
        before, self.active_synthesizer = self.active_synthesizer, int(k)
        try:
            yield self
        finally:
            self.active_synthesizer = before

    def forward(self, x: torch.Tensor, mode: str | None = None, tie_frozen: bool = False, synthesizer: int = 0):
        if mode == "synthesis_loss":
            nets = self.synthesizers()
            loss = recoseg.synthesis_loss(nets[synthesizer], self.schedule, x, self.target,
                                          prediction_type=self.prediction_type)
            if tie_frozen:  # DDP: every parameter takes part in every backward
                for m in [self.segmenter, *(n for k, n in enumerate(nets) if k != synthesizer)]:
                    loss = loss + _zero(m, x)
            return loss
        if mode == "segment":
            out = self.segmenter(x)
            zero = x.new_zeros((), dtype=torch.float32)
            if tie_frozen:
                for m in self.synthesizers():
                    zero = zero + _zero(m, x)
            return out, zero
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
        # nnU-Net's predictor never gets here (``nnunet_predictor_case_input`` hands it x ⊕ r of the whole case); a
        # direct call treats each batch element as a whole case of one window, through the same function
        return self.segmenter(self.cached(x, lambda: self.segmenter_input(x)))

    @torch.no_grad()
    def synthesise_window(self, window: torch.Tensor) -> torch.Tensor:
        """ŝ_0 for one window (1, C, *patch) → (1, 1, *patch) (ReCoSeg §2 stage 1, ``heads.recoseg.synthesise``
        with the current sampling options). Missing condition channels are already zero (``case_residual``)."""
        opts = self.sampling
        return recoseg.synthesise(self.synthesizers()[self.active_synthesizer], self.schedule, window, self.target, opts.steps, opts.sampler,
                                  opts.seed, self.prediction_type, self.clip)

    @torch.no_grad()
    def case_input(self, data: torch.Tensor, patch_size, step_size: float = 0.5) -> torch.Tensor:
        """x ⊕ r (C + 1, *spatial) of one whole preprocessed case (C, *spatial): ``recoseg_residuals.case_residual``,
        the same computation that made the residual maps stage 2 trained on."""
        x_seg, r = recoseg_residuals.case_residual(self, data, patch_size, step_size)
        return torch.cat([x_seg, r.to(x_seg.dtype)], 0)

    def nnunet_predictor_case_input(self, input_image: torch.Tensor, device: torch.device, patch_size,
                                    step_size: float) -> torch.Tensor:
        """What nnU-Net's predictor tiles instead of the whole preprocessed case ``input_image`` (C, *spatial), through
        ``nnunet_compat.install_case_input_hook``: x ⊕ r (``case_input``, on the predictor's ``device``, under
        autocast on CUDA as the predictor and the trainer do, with the predictor's ``step_size``), so that nnU-Net's
        own sliding window runs the segmenter on it and its mirroring flips image and residual together, as
        training's augmentation does. A case that already has C + 1 channels is returned unchanged."""
        if input_image.shape[0] != self.num_input_channels:
            return input_image
        self.to(device).eval()
        with torch.no_grad(), (torch.autocast(device.type) if device.type == "cuda" else nullcontext()):
            both = self.case_input(input_image.to(device), patch_size, step_size)
        return both.to(input_image.device, torch.float32)

    @torch.no_grad()
    def segmenter_input(self, x: torch.Tensor) -> torch.Tensor:
        """x ⊕ r for a batch of windows, each taken as a whole case (``case_input`` with patch = window)."""
        return torch.stack([self.case_input(xi, xi.shape[1:]) for xi in x])

    @torch.no_grad()
    def residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x as the segmenter sees it, r) for a batch of windows, each taken as a whole case."""
        both = self.segmenter_input(x)
        return both[:, :-1], both[:, -1:].float()


def _zero(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """0 · Σ parameters: ties a module that takes no part in this stage into the graph, as DDP (nnU-Net wraps
    without find_unused_parameters) needs every parameter in every backward."""
    zero = like.new_zeros((), dtype=torch.float32)
    for p in module.parameters():
        zero = zero + 0.0 * p.float().sum()
    return zero

