"""Evaluation: the papers' metrics per case and region, tables across heads and folds, pictures.

* :func:`evaluate_folder` — one prediction folder against its references (``nndiff evaluate``);
* :func:`compare_trainers` — trainers × folds from nnU-Net result folders (``nndiff compare``);
* :func:`mask_metrics` — Dice, IoU, mIoU (DDMD), HD95 (mm), VS, PA, sensitivity, specificity, volumes of one mask pair;
* :func:`sample_set_metrics` — GED, HM-IoU, NCC and CI of n samples against m annotations (MoDiff Tables 1–2).
"""
from .compare import compare_trainers
from .evaluate import EvaluationError, evaluate_folder
from .metrics import hd95, mask_metrics
from .samples import sample_set_metrics

__all__ = ["compare_trainers", "evaluate_folder", "EvaluationError", "hd95", "mask_metrics", "sample_set_metrics"]
