"""Denoisers and the papers' network modules."""
from .time_unet import TimeConditionedUNet

__all__ = ["TimeConditionedUNet"]
