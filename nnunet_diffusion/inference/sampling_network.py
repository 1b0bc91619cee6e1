"""What every module nnU-Net's predictor calls for a diffusion head shares: the sampling options, the
persistent ``region_based`` flag (``build_network_architecture`` is not told whether the dataset has regions;
the checkpoint is), and the :class:`MirrorCache` that is cleared whenever the result could change."""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..errors import NNDiffCheckpointError, NNDiffConfigError
from .mirror_cache import MirrorCache
from .options import SamplingOptions


class SamplingNetwork(nn.Module):
    supports_missing = False  # whether the head can predict with input channels missing (NNDIFF_MISSING)
    supports_samples = True   # whether the head can draw several samples per window (NNDIFF_SAMPLES > 1)

    def __init__(self, schedule: NoiseSchedule, sampling: SamplingOptions, region_based: bool = False):
        super().__init__()
        self.schedule = schedule
        self.sampling = self._checked(sampling)
        self.register_buffer("region_based", torch.tensor(int(region_based), dtype=torch.uint8))
        self._mirror_cache = MirrorCache()

    @property
    def has_regions(self) -> bool:
        return bool(self.region_based.item())

    def cached(self, x: torch.Tensor, compute):
        """``compute()`` once per window; its mirrored passes reuse it when tta_refine is 'window'."""
        return self._mirror_cache.get_or_compute(x, compute, enabled=self.sampling.tta_refine == "window")

    def _checked(self, sampling: SamplingOptions) -> SamplingOptions:
        if sampling.missing and not self.supports_missing:
            raise NNDiffConfigError(f"NNDIFF_MISSING={','.join(map(str, sampling.missing))}: "
                                    f"{type(self).__name__} cannot predict with missing input channels (only "
                                    f"ReCoSeg can); unset NNDIFF_MISSING")
        if sampling.samples > 1 and not self.supports_samples:
            raise NNDiffConfigError(f"NNDIFF_SAMPLES={sampling.samples}: {type(self).__name__} draws one sample per "
                                    f"window (one synthesis, as in its paper); set NNDIFF_SAMPLES=1 or unset it")
        return sampling

    def set_sampling(self, sampling: SamplingOptions) -> None:
        self.sampling = self._checked(sampling)
        self._mirror_cache.clear()

    def train(self, mode: bool = True):
        self._mirror_cache.clear()
        return super().train(mode)

    # a subclass that sets these explains weights that do not fit with an NNDiffCheckpointError instead of
    # torch's key list: "<weights_name> weights do not fit this network: <what differs>. <weights_hint>"
    weights_name: str | None = None
    weights_hint: str = ""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._mirror_cache.clear()  # e.g. nnU-Net's predictor loading the next fold's weights
        if strict and self.weights_name is not None:
            own = self.state_dict()
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
            if missing or unexpected or wrong:
                raise NNDiffCheckpointError(self.describe_weight_mismatch(missing, unexpected, wrong))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe_weight_mismatch(self, missing: list, unexpected: list, wrong: list) -> str:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) have other shapes (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} expected key(s) missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
        return f"{self.weights_name} weights do not fit this network: " + "; ".join(parts) + ". " + self.weights_hint
