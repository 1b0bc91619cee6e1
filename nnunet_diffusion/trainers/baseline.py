"""Shortened variants of nnU-Net's stock ``nnUNetTrainer`` (e.g. ``nnUNetTrainer_tiny``), declared in
trainer_configs/nnunet.toml. Only the training length changes: same network, loss, optimiser and data
pipeline as nnUNetTrainer, so a baseline trained with them shares plans and splits with every head."""
from __future__ import annotations

from .base import ConfiguredTrainer, make_variants


class nnUNetTrainerConfigured(ConfiguredTrainer):
    head = "nnunet"


VARIANTS = make_variants(nnUNetTrainerConfigured, class_prefix="nnUNetTrainer")
globals().update(VARIANTS)
__all__ = sorted(VARIANTS)
