"""The nn.Module nnU-Net trains, checkpoints and predicts with for NNDM: planned backbone + refiner.

nnU-Net's predictor builds this module through the trainer's static ``build_network_architecture``,
strict-loads ``network_weights`` and calls ``forward`` once per window and mirror. So everything the
prediction needs lives here: the refiner's weights, whether the outputs are regions (a persistent
buffer, because ``build_network_architecture`` is not told), and the sampling options (trainer config +
NNDIFF_* environment variables, see ``options.py``). The sliding window, Gaussian weighting, mirroring
and export stay nnU-Net's.

Forward in eval mode: logits → ŷ_0 → ê = DiffRefine(ŷ_0, x) → ŷ_T = ŷ_0 + ê → logits of ŷ_T (NNDM §4.3).
With NNDIFF_REFINE=0 it returns the backbone's logits untouched.

Where the refiner's training residual e = y − ŷ comes from (``residual_source``, trainer_configs/nndm.toml):
- "backbone": ŷ is the backbone's output on the training patch (nnU-Net's augmentation), as it is at the time;
- "dropout": in stage 2 (refiner alone, backbone frozen) ŷ is the backbone's output with channel dropout of
  probability ``residual_dropout`` after every convolution except the segmentation outputs (where nnU-Net puts
  its ``dropout_op``), so that ŷ errs on training cases more the way it errs on cases it has not seen. Stage 3
  (joint) always uses the live output: there L_diff's gradient reaches the backbone through ŷ. Prediction never
  drops anything.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import PREDICTION_TYPES, NoiseSchedule
from ..heads import nndm
from .options import SamplingOptions
from .sampling_network import SamplingNetwork




class _FeatureDropout:
    """Forward hook: channel dropout (nn.Dropout2d/3d's) of probability ``p`` on a conv's output while ``active``."""

    def __init__(self, p: float):
        self.p, self.active = float(p), False

    def __call__(self, module, inputs, output):
        if not self.active:
            return None
        return (F.dropout3d if output.dim() == 5 else F.dropout2d)(output, self.p, training=True)


def add_feature_dropout(backbone: nn.Module, p: float) -> _FeatureDropout:
    """Hook channel dropout of probability ``p`` after every Conv2d/Conv3d of ``backbone`` except its segmentation
    outputs (``seg_layers``), where nnU-Net's ``dropout_op`` sits; off until the returned switch's ``active`` is set."""
    switch = _FeatureDropout(p)
    for name, m in backbone.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and "seg_layers" not in name.split("."):
            m.register_forward_hook(switch)
    return switch


class NNDMNetwork(SamplingNetwork):
    def __init__(self, backbone: nn.Module, refiner: nn.Module, schedule: NoiseSchedule,
                 sampling: SamplingOptions, region_based: bool = False, prediction_type: str = "epsilon",
                 residual_conditioning: bool = True, residual_source: str = "backbone",
                 residual_dropout: float = 0.0, overrides=None):
        super().__init__(schedule, sampling, region_based, overrides)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.residual_conditioning = bool(residual_conditioning)
        self.residual_source = residual_source
        self.backbone = backbone
        self.refiner = refiner
        # permanent hooks switched by a flag (no state-dict entries; torch.compile sees one stable set of hooks)
        self._feature_dropout = add_feature_dropout(backbone, residual_dropout) if residual_source == "dropout" \
            else None
        # persistent: number of optimiser steps the refiner has had (0 = never trained, e.g. stage 1 only)
        self.register_buffer("refiner_updates", torch.zeros((), dtype=torch.long))
        self._warned_untrained = False

    # nnU-Net's set_deep_supervision_enabled reaches for ``network.decoder``
    @property
    def decoder(self):
        return self.backbone.decoder

    # ------------------------------------------------------------------ training
    def training_forward(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor],
                         train_backbone: bool, train_refiner: bool, detach_y_hat: bool, tie_frozen: bool,
                         y_hat: Optional[torch.Tensor] = None):
        """Backbone output, L_diff (None when the refiner is not trained in this stage) and a zero-valued
        term. ``y_hat``: the ŷ the refiner learns the residual e = y − ŷ of (out-of-fold residuals: a trained
        nnU-Net's prediction of the training case by the fold model that did not train on it); default the
        backbone's own output on the patch. With ``tie_frozen`` (the trainer sets it under DDP) that term ties every frozen parameter into the
        graph: DistributedDataParallel requires every parameter to take part in every forward (nnU-Net wraps
        without find_unused_parameters). Without DDP it is skipped: it would only cost time."""
        # residual_source "dropout": the frozen backbone of stage 2 under feature dropout (see the module docstring);
        # its output then also gives stage 2's logged L_seg
        dropout = self._feature_dropout is not None and train_refiner and not train_backbone
        with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
            if dropout:
                self._feature_dropout.active = True
            try:
                out = self.backbone(x)
            finally:
                if dropout:
                    self._feature_dropout.active = False
        l_diff = None
        if train_refiner:
            if y_hat is not None:  # given (out of fold): not the backbone's, so no gradient to it
                y_hat = y_hat.float().detach()
            else:
                logits = out[0] if isinstance(out, (list, tuple)) else out
                y_hat = nndm.probabilities(logits, self.has_regions)
                if detach_y_hat or not train_backbone:
                    y_hat = y_hat.detach()
            l_diff = nndm.diffusion_loss(self.refiner, self.schedule, x, y, y_hat, mask,
                                         prediction_type=self.prediction_type,
                                         residual_conditioning=self.residual_conditioning)
        frozen = (([] if train_backbone else [self.backbone]) + ([] if train_refiner else [self.refiner])
                  if tie_frozen else [])
        zero = x.new_zeros((), dtype=torch.float32)
        for m in frozen:
            for p in m.parameters():
                zero = zero + 0.0 * p.float().sum()
        return out, l_diff, zero

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                train_backbone: bool = True, train_refiner: bool = False, detach_y_hat: bool = False,
                tie_frozen: bool = False, y_hat: Optional[torch.Tensor] = None):
        if y is not None:
            return self.training_forward(x, y, mask, train_backbone, train_refiner, detach_y_hat, tie_frozen,
                                         y_hat)
        out = self.backbone(x)
        if self.training or not self._refinement_active():
            return out
        logits = out[0] if isinstance(out, (list, tuple)) else out
        refined = self.refine_logits(x, logits)
        return [refined, *out[1:]] if isinstance(out, (list, tuple)) else refined

    # ------------------------------------------------------------------ inference
    def _refinement_active(self) -> bool:
        if not self.sampling.refine:
            return False
        if int(self.refiner_updates) == 0:
            if not self._warned_untrained:
                warnings.warn("NNDM: this network's refiner has never been trained (the checkpoint is from "
                              "stage 1, the plain nnU-Net stage); predicting with the nnU-Net backbone alone.",
                              stacklevel=2)
                self._warned_untrained = True
            return False
        return True

    def refine_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """NNDM §4.3: logits of ŷ_T = ŷ_0 + ê for one window (a fresh tensor: the predictor adds into it)."""
        regions = self.has_regions
        y_hat = nndm.probabilities(logits, regions)
        e_hat = self._residual(x, y_hat)
        p = nndm.refined_probabilities(y_hat, e_hat, regions)
        return nndm.probabilities_to_logits(p, regions).to(logits.dtype)

    def _residual(self, x: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """ê for this window. With tta_refine='window' a mirrored copy of the previous window (nnU-Net's
        test-time mirroring calls forward with flip(x) right after x) reuses that window's ê, flipped
        (:class:`MirrorCache`): the refiner runs once per window instead of once per mirror, while every mirror
        still gets its own backbone pass."""
        opts = self.sampling
        return self.cached(x, lambda: nndm.refine(self.refiner, self.schedule, x, y_hat, opts.steps, opts.sampler,
                                                  opts.samples, opts.seed, self.prediction_type,
                                                  self.residual_conditioning))

    # ------------------------------------------------------------------ checkpoints
    weights_name = "NNDM"
    weights_hint = "The checkpoint was written by a different trainer variant (refiner width/depth), plans or " \
                   "configuration."

    def describe_weight_mismatch(self, missing, unexpected, wrong) -> str:
        if missing and all(k.startswith(("refiner.", "backbone.", "region_based", "refiner_updates")) for k in missing) \
                and unexpected and not any(k.startswith(("backbone.", "refiner.")) for k in unexpected):
            return ("these weights are a plain nnU-Net network (no 'backbone.'/'refiner.' keys), not an NNDM "
                    "checkpoint. To start NNDM from a trained nnU-Net baseline, set NNDIFF_BASELINE (see "
                    "documentation/how_to/start_nndm_from_nnunet.md).")
        return super().describe_weight_mismatch(missing, unexpected, wrong)
