"""What every module nnU-Net's predictor calls for a diffusion head shares: the sampling options, the
persistent ``region_based`` flag (``build_network_architecture`` is not told whether the dataset has regions;
the checkpoint is), and the :class:`MirrorCache` that is cleared whenever the result could change."""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..errors import NNDiffConfigError
from .mirror_cache import MirrorCache
from .options import SamplingOptions


class SamplingNetwork(nn.Module):
    supports_missing = False  # whether the head can predict with input channels missing (NNDIFF_MISSING)

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
        return sampling

    def set_sampling(self, sampling: SamplingOptions) -> None:
        self.sampling = self._checked(sampling)
        self._mirror_cache.clear()

    def train(self, mode: bool = True):
        self._mirror_cache.clear()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._mirror_cache.clear()  # e.g. nnU-Net's predictor loading the next fold's weights
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
