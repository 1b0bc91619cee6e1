"""Run an expensive sampler once per sliding window instead of once per test-time mirror.

nnU-Net's predictor calls ``network(x)`` for a window and then ``network(flip(x, axes))`` for every mirror
combination. A sampler result that is computed for x can serve the mirrored calls flipped, so a diffusion
head pays its sampling loop once per window. Matching is exact (``torch.equal`` on the input), never
approximate, and the cache holds one window; loading weights or switching train/eval clears it.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch


class MirrorCache:
    def __init__(self):
        self._entry: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def clear(self) -> None:
        self._entry = None

    def lookup(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The cached result, flipped like ``x`` is flipped relative to the cached input; None if no match."""
        if self._entry is None:
            return None
        cached_x, cached = self._entry
        if cached_x.shape != x.shape or cached_x.device != x.device:
            return None
        spatial = range(2, x.ndim)
        for r in range(len(spatial) + 1):
            for axes in itertools.combinations(spatial, r):
                if torch.equal(x, cached_x.flip(axes) if axes else cached_x):
                    return cached.flip([a + cached.ndim - x.ndim for a in axes]) if axes else cached
        return None

    def get_or_compute(self, x: torch.Tensor, compute: Callable[[], torch.Tensor], enabled: bool = True):
        """``compute()`` for a new window, the flipped cached result for a mirror of the last one.

        The cached tensor may have leading extra dimensions (e.g. samples × batch × channels × space); the
        spatial axes are always the last ``x.ndim − 2``."""
        if enabled:
            hit = self.lookup(x)
            if hit is not None:
                return hit
        result = compute()
        if enabled:
            self._entry = (x.detach().clone(), result)
        return result
