"""Learning-rate schedule helpers shared by the staged trainers (NNDM's ``StagedPolyLR``, ReCoSeg's ``StagedLR``)."""
from __future__ import annotations


def poly_lr(lr0: float, step: int, total: int) -> float:
    """nnU-Net's poly decay (``PolyLRScheduler``): lr0 · (1 − step/total)^0.9, for ``step`` counted from the start
    of the stage that decays over ``total`` epochs (a ``total`` of 0 counts as 1)."""
    return lr0 * (1 - step / max(total, 1)) ** 0.9
