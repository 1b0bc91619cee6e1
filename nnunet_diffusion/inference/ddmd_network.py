"""The nn.Module nnU-Net trains, checkpoints and predicts with for DDMD: AE-1, AE-2 and the denoiser.

nnU-Net's predictor builds it through the trainer's ``build_network_architecture``, strict-loads
``network_weights`` and calls ``forward`` per window and mirror, so everything the prediction needs is in
here: both autoencoder ensembles (they give X and Y for every window), the denoiser, the persistent
``region_based`` flag and the sampling options (trainer config + NNDIFF_* variables).

Training (the trainer picks the stage):
- ``forward(b, mode="ae", normal=…, ae2_voxels=…, ae1_weights=…)`` → (L_AE-1, L_AE-2 or None, per-model MSEs,
  zero): eqs. 9–10, on the autoencoders' images (patches, or with ``ae_input = "slices"`` their slices);
- ``forward(b, y=…, mode="diffusion")`` → (eq. 16 loss, zero), X and Y from the frozen AEs (no gradient).
``zero`` is a 0-valued term that, with ``tie_frozen`` (under DDP), ties the parameters a stage does not train
into the graph: nnU-Net wraps without ``find_unused_parameters``.

Inference (eval mode): X, Y from the AEs (eqs. 11–13), n masks by Algorithm 2 conditioned on b ⊕ X ⊕ Y,
averaged (§5.1: five masks), returned as logits (``heads.common.probabilities_to_logits``). The paper's
threshold 0.5 on the averaged mask is nnU-Net's own decision rule on these logits: sigmoid > 0.5 per region
(BraTS regions) or, for label datasets, argmax of the averaged one-hot probabilities (for two classes the
same as 0.5). Once per window: the mirrored passes of nnU-Net's test-time augmentation reuse the samples
(flipped) unless NNDIFF_TTA_REFINE=mirror.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..diffusion import PREDICTION_TYPES, NoiseSchedule
from ..heads import ddmd
from ..heads.common import probabilities_to_logits
from ..heads.medsegdiff import fuse
from ..nets.ddmd import AutoencoderEnsemble
from .options import SamplingOptions
from .sampling_network import SamplingNetwork


class DDMDNetwork(SamplingNetwork):
    def __init__(self, ae1: Optional[AutoencoderEnsemble], ae2: Optional[AutoencoderEnsemble], denoiser: nn.Module,
                 schedule: NoiseSchedule, sampling: SamplingOptions, mask_channels: int, use_inter: bool = True,
                 use_intra: bool = True, region_based: bool = False, prediction_type: str = "epsilon",
                 overrides=None):
        super().__init__(schedule, sampling, region_based, overrides)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
        if use_inter and (ae1 is None or ae2 is None):
            raise ValueError("the inter-discrepancy X needs AE-1 and AE-2")
        if use_intra and ae2 is None:
            raise ValueError("the intra-discrepancy Y needs AE-2")
        self.ae1, self.ae2, self.denoiser = ae1, ae2, denoiser
        self.use_inter, self.use_intra = bool(use_inter), bool(use_intra)
        self.mask_channels = int(mask_channels)
        self.prediction_type = prediction_type
        # persistent: optimiser steps the denoiser has had (0 = the checkpoint is from the autoencoder stage)
        self.register_buffer("denoiser_updates", torch.zeros((), dtype=torch.long))
        self._warned = False

    @property
    def autoencoders(self) -> list[AutoencoderEnsemble]:
        return [m for m in (self.ae1, self.ae2) if m is not None]

    @property
    def condition_channels(self) -> int:
        """Channels of X and Y in the denoiser's input (0, 1 or 2) — the variant's switch."""
        return int(self.use_inter) + int(self.use_intra)

    # ------------------------------------------------------------------ discrepancy features
    def sliced(self, b: torch.Tensor) -> bool:
        """True when the autoencoders are 2D and ``b`` a batch of 3D windows (``ae_input = "slices"``): their images
        are the windows' slices along the first axis (``heads.ddmd.to_slices``)."""
        ae = self.ae2 if self.ae2 is not None else self.ae1
        return ae is not None and b.ndim == ae.dim + 3

    def ae_images(self, b: torch.Tensor) -> torch.Tensor:
        """The autoencoders' images of a batch of windows ``b``: the windows, or their slices (``sliced``)."""
        return ddmd.to_slices(b) if self.sliced(b) else b

    @torch.no_grad()
    def discrepancy(self, b: torch.Tensor, per_channel: bool = False):
        """(X, Y) of DDMD eqs. 11–13 for a batch of windows, (B, 1, …) each (X is None without AE-1); no
        gradient. ``per_channel``: per-modality maps (B, C, …). 2D autoencoders on 3D windows (``ae_input =
        "slices"``) give each slice's maps, stacked back along the first axis, as the paper's per-slice X and Y."""
        if self.ae2 is None:
            raise ValueError("this DDMD variant (DDMD-mini) has no autoencoders, so no discrepancy features")
        images = self.ae_images(b)
        r1 = self.ae1(images) if self.ae1 is not None else None  # plain convolutions: no train/eval difference
        x, y = ddmd.discrepancy(r1, self.ae2(images), per_channel=per_channel)
        if images is not b:
            x = None if x is None else ddmd.from_slices(x, b.shape[0])
            y = ddmd.from_slices(y, b.shape[0])
        return x, y

    def condition(self, b: torch.Tensor) -> torch.Tensor:
        """b ⊕ X ⊕ Y (what the variant uses)."""
        if not (self.use_inter or self.use_intra):
            return b
        inter, intra = self.discrepancy(b)
        return ddmd.condition(b, inter if self.use_inter else None, intra if self.use_intra else None)

    # ------------------------------------------------------------------ training
    def _zero(self, b: torch.Tensor, frozen) -> torch.Tensor:
        zero = b.new_zeros((), dtype=torch.float32)
        for m in frozen:
            for p in m.parameters():
                zero = zero + 0.0 * p.float().sum()
        return zero

    def ae_forward(self, b: torch.Tensor, normal: Optional[torch.Tensor], ae2_voxels: Optional[torch.Tensor],
                   tie_frozen: bool, ae1_weights: Optional[torch.Tensor] = None):
        """Stage 1: L_AE-1 on every image (eq. 9; each weighted by ``ae1_weights`` (B,) if given, e.g. the
        balanced mixture of §4.1); L_AE-2 (eq. 10) on the normal images (``normal``, (B,) bool) or, with
        ``ae2_voxels`` (B, 1, …), on those voxels of every image; None when there is nothing to learn from in
        this batch. ``b`` holds the autoencoders' images: patches, or slices (the trainer cuts them,
        ``ae_images``)."""
        l1, mse1 = ddmd.ae_loss(self.ae1, b, weights=ae1_weights) if self.ae1 is not None else (None, None)
        l2, mse2 = None, None
        if ae2_voxels is not None:
            if ae2_voxels.any():
                l2, mse2 = ddmd.ae_loss(self.ae2, b, ae2_voxels)
        elif normal is not None and bool(normal.any()):
            l2, mse2 = ddmd.ae_loss(self.ae2, b[normal])
        frozen = ([self.denoiser] + ([self.ae2] if l2 is None else [])) if tie_frozen else []
        return l1, l2, (mse1, mse2), self._zero(b, frozen)

    def diffusion_forward(self, b: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor], tie_frozen: bool):
        """Stage 2: DDMD Algorithm 1 (eqs. 14–16) with X, Y from the frozen autoencoders."""
        loss = ddmd.training_loss(self.denoiser, self.schedule, self.condition(b), y, mask,
                                  prediction_type=self.prediction_type)
        return loss, self._zero(b, self.autoencoders if tie_frozen else [])

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                mode: Optional[str] = None, normal: Optional[torch.Tensor] = None,
                ae2_voxels: Optional[torch.Tensor] = None, tie_frozen: bool = False,
                ae1_weights: Optional[torch.Tensor] = None):
        if mode == "ae":
            return self.ae_forward(x, normal, ae2_voxels, tie_frozen, ae1_weights)
        if mode == "diffusion" or y is not None:
            return self.diffusion_forward(x, y, mask, tie_frozen)
        self._warn_untrained()
        p = self.cached(x, lambda: self.fused_probabilities(x))
        if not self.has_regions:
            p = p / p.sum(1, keepdim=True).clamp_min(1e-6)
        return probabilities_to_logits(p, self.has_regions).to(x.dtype)

    # ------------------------------------------------------------------ inference
    def fused_probabilities(self, b: torch.Tensor) -> torch.Tensor:
        """Algorithm 2, n times, averaged (§5.1) (NNDIFF_FUSION=staple: STAPLE of the thresholded samples)."""
        opts = self.sampling
        samples = ddmd.sample_masks(self.denoiser, self.schedule, self.condition(b), self.mask_channels,
                                    opts.steps, opts.sampler, opts.samples, opts.seed, self.prediction_type)
        return fuse(samples, opts.fusion)

    def _warn_untrained(self) -> None:
        if self._warned or self.training:
            return
        problems = []
        if int(self.denoiser_updates) == 0:
            problems.append("its diffusion model has never been trained (a checkpoint from the autoencoder stage)")
        if self.condition_channels and any(int(m.updates) == 0 for m in self.autoencoders):
            problems.append("an autoencoder module has never been trained")
        if problems:
            warnings.warn("DDMD: " + "; ".join(problems) + ": its predictions mean nothing.", stacklevel=3)
        self._warned = True

    # ------------------------------------------------------------------ checkpoints
    weights_name = "DDMD"
    weights_hint = "The checkpoint was written by a different DDMD variant (mini/light/full, widths, ensemble size " \
                   "L), plans or configuration."

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._warned = False  # new weights: say again if they are untrained
        return result
