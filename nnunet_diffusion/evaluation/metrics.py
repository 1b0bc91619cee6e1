"""Per-mask segmentation metrics: the ones the papers report, for one binary prediction against one reference.

Definitions (``tp, fp, fn, tn`` are voxel counts; ``V_p = tp + fp`` and ``V_r = tp + fn`` are the predicted and
reference volumes):

==============  =======================================================  =====================================
metric          definition                                               reported by
==============  =======================================================  =====================================
dice            2 tp / (2 tp + fp + fn)                                  NNDM Table 1 (DSC), DDMD Table 1,
                                                                         MedSegDiff, ReCoSeg
iou             tp / (tp + fp + fn): the lesion's (foreground) IoU,     ReCoSeg
                Jaccard index
miou            (tp / (tp + fp + fn) + tn / (tn + fp + fn)) / 2: mean    DDMD Table 1 ("Miou", §4.2)
                IoU over the two classes, lesion and background
hd95            95th percentile of the symmetric surface distances, mm   NNDM Table 1 (HD95)
vs              1 - |V_p - V_r| / (V_p + V_r)                            NNDM Table 1 (VS); Taha & Hanbury 2015
pa              (tp + tn) / (tp + fp + fn + tn)                          DDMD Table 1 (PA: correctly classified
                                                                         pixels over all pixels)
sensitivity     tp / (tp + fn)
specificity     tn / (tn + fp)
volume_pred/ref V_p, V_r times the voxel volume, mm³
==============  =======================================================  =====================================

DDMD's "Miou" is the semantic-segmentation mIoU, not the lesion's IoU: its Table 1 has Miou above Dice in every row,
which the lesion's IoU can never be (IoU = Dice / (2 − Dice) <= Dice for every mask pair), while the mean of the
lesion's and the background's IoU is, on images that are mostly background. The background's IoU is the IoU of
the two complements, |¬P ∩ ¬R| / |¬P ∪ ¬R| = tn / (tn + fp + fn); it counts every evaluated voxel of the image (the
paper: the 256 × 256 slice), so mIoU rises with the share of background in the field of view: compare it only
between predictions of the same images.

Empty masks (the BraTS challenge conventions; see :data:`EMPTY_MASK_CONVENTIONS`):

* both empty (a correct "no tumour"): dice = iou = vs = 1, hd95 = 0, sensitivity undefined (NaN, there is
  nothing to find), pa / specificity / miou as computed (miou = 1: both classes' IoU are 1);
* only the prediction empty, or only the reference empty: dice = iou = vs = 0 and hd95 =
  :data:`BRATS_EMPTY_HD95` = 373 mm, the value the official BraTS package ``brats-evaluation`` (0.0.10,
  ``metrics_parser.parse_seg_results``) substitutes for the infinite distance ("diameter of the cube in SRI
  space"; the legacy BraTS toolkits used 373.13 mm, the diagonal of 240×240×155 voxels at 1 mm).
  sensitivity is 0 when only the prediction is empty and NaN (undefined) when only the reference is empty;
  miou = the background's IoU / 2. (The background's IoU of two empty backgrounds, every voxel lesion on both
  sides, is 1 as well.)

``brats-evaluation`` itself reports NaN Dice and NaN HD95 for a region empty on both sides (its panoptica
edge-case handler, "no instances"); we follow the BraTS challenge ranking convention (1 and 0) instead, so that a
correctly empty region is not dropped from the means. Summaries skip NaN values and report how many were used.

HD95 uses MONAI for what MONAI does (edges by erosion, Euclidean distance transforms with the voxel spacing):
``monai.metrics.utils.get_edge_surface_distance``. Two reductions of the two directed distance sets exist in the
literature and give different numbers; ``hd95_mode`` chooses:

* ``"brats"`` (default): the 95th percentile of the pooled distances of both directions, as ``brats-evaluation``
  (through panoptica's ``_compute_hausdorff_distance95``) and medpy's ``hd95`` compute it;
* ``"monai"``: the larger of the two directed 95th percentiles, i.e. ``monai.metrics.compute_hausdorff_distance(...,
  percentile=95)`` (called as such).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

BRATS_EMPTY_HD95 = 373.0
"""HD95 (mm) when exactly one of prediction and reference is empty: brats-evaluation 0.0.10's penalty."""

HD95_MODES = ("brats", "monai")

METRIC_NAMES = ("dice", "iou", "miou", "hd95", "vs", "pa", "sensitivity", "specificity", "volume_pred", "volume_ref")

EMPTY_MASK_CONVENTIONS = {
    "both_empty": "dice = iou = vs = 1, hd95 = 0 mm, sensitivity = NaN (undefined), pa/specificity/miou computed "
                  "(BraTS challenge convention for a correctly empty region)",
    "only_prediction_empty": "dice = iou = vs = 0, hd95 = {empty_hd95} mm, sensitivity = 0, miou = background "
                             "IoU / 2",
    "only_reference_empty": "dice = iou = vs = 0, hd95 = {empty_hd95} mm, sensitivity = NaN (undefined), miou = "
                            "background IoU / 2",
    "hd95_one_side_empty_source": "brats-evaluation 0.0.10 (metrics_parser.parse_seg_results) replaces the "
                                  "infinite HD95 by 373 (diameter of the SRI-space cube); legacy BraTS toolkits "
                                  "used 373.13",
}


def overlap_counts(pred: np.ndarray, ref: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) voxel counts of two boolean masks; voxels where ``ignore`` is True are not counted."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {ref.shape}")
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        pred = pred & keep
        ref = ref & keep
        total = int(np.count_nonzero(keep))
    else:
        total = int(pred.size)
    tp = int(np.count_nonzero(pred & ref))
    p = int(np.count_nonzero(pred))
    r = int(np.count_nonzero(ref))
    fp, fn = p - tp, r - tp
    return tp, fp, fn, total - tp - fp - fn


def _ratio(num: float, den: float, if_zero: float) -> float:
    return float(num) / float(den) if den else float(if_zero)


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice = 2 tp / (2 tp + fp + fn) (NNDM Table 1 DSC; DDMD Table 1); 1 when both masks are empty (BraTS)."""
    return _ratio(2 * tp, 2 * tp + fp + fn, 1.0)


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """The lesion's (foreground) IoU = tp / (tp + fp + fn) (Jaccard index); 1 when both masks are empty. Not DDMD's
    "Miou": that is :func:`miou_from_counts`."""
    return _ratio(tp, tp + fp + fn, 1.0)


def background_iou_from_counts(tp: int, fp: int, fn: int, tn: int) -> float:
    """The background's IoU = |¬P ∩ ¬R| / |¬P ∪ ¬R| = tn / (tn + fp + fn); 1 when neither mask has background."""
    return _ratio(tn, tn + fp + fn, 1.0)


def miou_from_counts(tp: int, fp: int, fn: int, tn: int) -> float:
    """DDMD Table 1 / §4.2 "Miou", the mean intersection over union over the classes (lesion, background):
    mIoU = (tp / (tp + fp + fn) + tn / (tn + fp + fn)) / 2, each class's IoU with the conventions of
    :func:`iou_from_counts` and :func:`background_iou_from_counts`."""
    return 0.5 * (iou_from_counts(tp, fp, fn) + background_iou_from_counts(tp, fp, fn, tn))


def volumetric_similarity_from_counts(tp: int, fp: int, fn: int) -> float:
    """NNDM Table 1: VS = 1 − |V_p − V_r| / (V_p + V_r) = 1 − |fn − fp| / (2 tp + fp + fn) (Taha & Hanbury 2015);
    1 when both masks are empty."""
    return 1.0 - _ratio(abs(fn - fp), 2 * tp + fp + fn, 0.0)


def pixel_accuracy_from_counts(tp: int, fp: int, fn: int, tn: int) -> float:
    """DDMD Table 1: PA = correctly classified voxels / all voxels = (tp + tn) / (tp + fp + fn + tn)."""
    return _ratio(tp + tn, tp + fp + fn + tn, float("nan"))


def sensitivity_from_counts(tp: int, fn: int) -> float:
    """Sensitivity (recall) = tp / (tp + fn); NaN (undefined) when the reference is empty."""
    return _ratio(tp, tp + fn, float("nan"))


def specificity_from_counts(tn: int, fp: int) -> float:
    """Specificity = tn / (tn + fp); NaN (undefined) when there is no reference-negative voxel."""
    return _ratio(tn, tn + fp, float("nan"))


def _spacing_tuple(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for a {ndim}-D mask")
    if any(not (s > 0 and math.isfinite(s)) for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """The two directed surface-distance sets (prediction edge → reference edge, reference edge → prediction
    edge) in the units of ``spacing`` (given in the array's axis order), computed by MONAI's
    ``get_edge_surface_distance``. Both masks must be non-empty."""
    from monai.metrics.utils import get_edge_surface_distance

    pred = np.ascontiguousarray(pred, dtype=bool)
    ref = np.ascontiguousarray(ref, dtype=bool)
    spacing = _spacing_tuple(spacing, pred.ndim)
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks (empty masks follow the conventions of hd95)")
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument of get_mask_edges
        warnings.simplefilter("ignore", FutureWarning)
        _, distances, _ = get_edge_surface_distance(pred, ref, distance_metric="euclidean", spacing=spacing,
                                                    symmetric=True)
    return tuple(np.asarray(d, dtype=np.float64).ravel() for d in distances)  # type: ignore[return-value]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing=None, mode: str = "brats",
         empty_value: float = BRATS_EMPTY_HD95) -> float:
    """NNDM Table 1: HD95, the 95th-percentile Hausdorff distance in mm (``spacing`` in array-axis order, mm).

    ``mode="brats"``: 95th percentile (linear interpolation) of the pooled distances of both directions, as the
    official BraTS package ``brats-evaluation`` (panoptica) computes it. ``mode="monai"``: MONAI's
    ``compute_hausdorff_distance(percentile=95)``, the larger of the two directed 95th percentiles.
    Both empty: 0; exactly one empty: ``empty_value`` (373 mm, brats-evaluation's penalty).
    """
    if mode not in HD95_MODES:
        raise ValueError(f"hd95 mode must be one of {HD95_MODES}, got {mode!r}")
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return 0.0
    if not has_p or not has_r:
        return float(empty_value)
    spacing = _spacing_tuple(spacing, pred.ndim)
    if mode == "monai":
        import torch
        from monai.metrics import compute_hausdorff_distance
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            value = compute_hausdorff_distance(torch.from_numpy(pred[None, None]), torch.from_numpy(ref[None, None]),
                                               include_background=True, percentile=95, spacing=spacing)
        return float(value.reshape(-1)[0])
    d_pred, d_ref = surface_distances(pred, ref, spacing)
    return float(np.percentile(np.concatenate([d_pred, d_ref]), 95))


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing=None, ignore: np.ndarray | None = None,
                 hd95_mode: str = "brats", empty_hd95: float = BRATS_EMPTY_HD95) -> dict[str, float]:
    """All per-mask metrics of :data:`METRIC_NAMES` for one binary prediction against one reference.

    ``spacing`` is the voxel size in mm in the array's axis order (for a SimpleITK array that is
    ``image.GetSpacing()[::-1]``); volumes are in mm³. Voxels where ``ignore`` is True are left out of every
    metric (nnU-Net's ignore label).
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    spacing = _spacing_tuple(spacing, pred.ndim)
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        pred, ref = pred & keep, ref & keep
    tp, fp, fn, tn = overlap_counts(pred, ref, ignore)
    voxel = float(np.prod(spacing))
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "miou": miou_from_counts(tp, fp, fn, tn),
        "hd95": hd95(pred, ref, spacing, mode=hd95_mode, empty_value=empty_hd95),
        "vs": volumetric_similarity_from_counts(tp, fp, fn),
        "pa": pixel_accuracy_from_counts(tp, fp, fn, tn),
        "sensitivity": sensitivity_from_counts(tp, fn),
        "specificity": specificity_from_counts(tn, fp),
        "volume_pred": (tp + fp) * voxel,
        "volume_ref": (tp + fn) * voxel,
    }


def region_mask(segmentation: np.ndarray, region: int | Sequence[int]) -> np.ndarray:
    """nnU-Net's rule: a voxel belongs to a label if it equals it, to a region if its label is in the region's
    tuple (e.g. whole tumour (1, 2, 3))."""
    if np.isscalar(region):
        return segmentation == region
    return np.isin(segmentation, np.asarray(tuple(region)))
