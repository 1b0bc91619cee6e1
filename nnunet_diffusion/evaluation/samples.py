"""Sample-set metrics: n segmentation samples of one image against a set of m reference annotations.

MoDiff (Tables 1–2) reports GED_n, HM-IoU_n, NCC_n and CI_n "computed over n samples" and cites their definitions
(MoDiff §4.1, "Evaluation Metrics"); DDMD and MedSegDiff ensembles produce such sample sets too. Implemented here:

* :func:`generalized_energy_distance` — GED with d = 1 − IoU (MoDiff refs. [17–19]; Kohl et al. 2018,
  Probabilistic U-Net, eq. for D²_GED), estimated over all pairs as in CCDM's and PHiSeg's evaluation code.
* :func:`hungarian_matched_iou` — HM-IoU (MoDiff refs. [20, 21]; Kohl et al. 2019, HPU-Net; CCDM [8]): both sets
  replicated to lcm(n, m) members, matched one-to-one by the Hungarian algorithm on 1 − IoU
  (``scipy.optimize.linear_sum_assignment``), mean IoU of the matched pairs.
* :func:`variance_ncc` — S_NCC (MoDiff ref. [22]; Baumgartner et al. 2019, PHiSeg): the mean over annotations y of
  NCC(E_s[CE(s̄, s)], E_s[CE(y, s)]). For binary masks E_s[CE(s̄, s)] is an affine function of the per-voxel
  sample variance s̄(1 − s̄) and E_s[CE(y, s)] of the per-voxel disagreement between rater y and the samples, so
  this is the correlation between the sample-variance map and each rater's disagreement map.
* :func:`collective_insight` — the CI score of CIMD (MoDiff ref. [2]; Rahman et al., CVPR 2023): combined
  sensitivity S_c, maximum Dice matching D_max and diversity agreement D_a, combined as
  CI = 3 · S_c · D_max · D_a / (S_c + D_max + D_a).

Empty masks: IoU(∅, ∅) = Dice(∅, ∅) = 1 (CCDM's and CIMD's convention), so two empty masks are at distance 0.

Sources, honestly: GED, HM-IoU and S_NCC follow the published evaluation code of CCDM and PHiSeg, read for this
implementation. The CIMD paper's text was not available where this was written; S_c, D_max, D_a and the CI
formula follow its definitions as cited by MoDiff and as independent re-implementations of CIMD transcribe them.
Two points of D_a are not pinned down by those sources: the "pairwise variance" of two masks is taken here as the
variance over voxels of their difference image, Var(a_i − a_j), over all unordered pairs i < j; with fewer than
two masks in a set its variance set is {0}. (Note that CIMD's CI formula is not the harmonic mean of the three
terms it calls by that name; we implement the formula.)
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_mask_stack(masks, name: str) -> np.ndarray:
    """(k, ...) boolean stack from a sequence of masks or an array whose first axis indexes the masks."""
    if isinstance(masks, np.ndarray):
        stack = masks.astype(bool, copy=False)
    else:
        masks = list(masks)
        if not masks:
            raise ValueError(f"{name}: need at least one mask")
        stack = np.stack([np.asarray(m, dtype=bool) for m in masks])
    if stack.ndim < 2 or stack.shape[0] < 1:
        raise ValueError(f"{name}: expected a stack (k, ...) of k >= 1 masks, got shape {stack.shape}")
    return stack


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"samples and references have different image shapes: {a.shape[1:]} vs {b.shape[1:]}")


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _popcount_rows(packed: np.ndarray) -> np.ndarray:
    """Number of set bits per row of a uint8 array (np.bitwise_count needs numpy >= 2)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(packed).sum(axis=-1, dtype=np.int64)
    return _POPCOUNT[packed].sum(axis=-1)


def _packed(stack: np.ndarray) -> np.ndarray:
    return np.packbits(stack.reshape(stack.shape[0], -1), axis=1)


def _intersections(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    out = np.empty((pa.shape[0], pb.shape[0]), dtype=np.int64)
    for i in range(pa.shape[0]):
        out[i] = _popcount_rows(pa[i][None] & pb)
    return out


def iou_matrix(a, b) -> np.ndarray:
    """Pairwise IoU (Jaccard) between two stacks of binary masks, shape (len(a), len(b)); IoU(∅, ∅) = 1."""
    a = _as_mask_stack(a, "a")
    b = _as_mask_stack(b, "b")
    _check_same_shape(a, b)
    pa, pb = _packed(a), _packed(b)
    inter = _intersections(pa, pb)
    size_a = _popcount_rows(pa)
    size_b = _popcount_rows(pb)
    union = size_a[:, None] + size_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return iou.astype(np.float64)


def dice_matrix(a, b) -> np.ndarray:
    """Pairwise Dice between two stacks of binary masks, shape (len(a), len(b)); Dice(∅, ∅) = 1."""
    iou = iou_matrix(a, b)
    return 2 * iou / (1 + iou)


def generalized_energy_distance(samples, references) -> float:
    """GED_n (MoDiff Tables 1–2; Kohl et al. 2018): D²_GED = 2 E[d(S, Y)] − E[d(S, S')] − E[d(Y, Y')] with
    d = 1 − IoU, estimated as 2/(n m) Σ_ij d(s_i, y_j) − 1/n² Σ_ij d(s_i, s_j) − 1/m² Σ_ij d(y_i, y_j)
    (all pairs, i = j included, as in CCDM's and PHiSeg's code). Lower is better."""
    s = _as_mask_stack(samples, "samples")
    y = _as_mask_stack(references, "references")
    _check_same_shape(s, y)
    d_sy = 1 - iou_matrix(s, y)
    d_ss = 1 - iou_matrix(s, s)
    d_yy = 1 - iou_matrix(y, y)
    return float(2 * d_sy.mean() - d_ss.mean() - d_yy.mean())


def hungarian_matched_iou(samples, references) -> float:
    """HM-IoU_n (MoDiff Tables 1–2; Kohl et al. 2019; CCDM): replicate the n samples and the m references to
    L = lcm(n, m) members each (every member L/n resp. L/m times), find the one-to-one matching that maximises the
    total IoU (Hungarian algorithm on 1 − IoU), and return the mean IoU of the L matched pairs. Higher is better."""
    s = _as_mask_stack(samples, "samples")
    y = _as_mask_stack(references, "references")
    _check_same_shape(s, y)
    n, m = s.shape[0], y.shape[0]
    lcm = n * m // math.gcd(n, m)
    iou = iou_matrix(s, y)  # (n, m); the replicated matrix only repeats rows and columns
    big = np.repeat(np.repeat(iou, lcm // n, axis=0), lcm // m, axis=1)
    rows, cols = linear_sum_assignment(1 - big)
    return float(big[rows, cols].mean())


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-normalised cross-correlation (Pearson); NaN when either map is constant (up to rounding)."""
    a = a.ravel().astype(np.float64)
    b = b.ravel().astype(np.float64)
    if np.ptp(a) <= 1e-9 * max(1.0, float(np.abs(a).max())) or np.ptp(b) <= 1e-9 * max(1.0, float(np.abs(b).max())):
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum()) * float((b * b).sum())))


def _cross_entropy(target: np.ndarray, sample: np.ndarray, eps: float) -> np.ndarray:
    """Per-voxel two-class cross-entropy CE(target, sample) = −[t log(s + ε) + (1 − t) log(1 − s + ε)]."""
    return -(target * np.log(sample + eps) + (1 - target) * np.log(1 - sample + eps))


def variance_ncc(samples, references, eps: float = 1e-8) -> float:
    """NCC_n (MoDiff Tables 1–2; PHiSeg's S_NCC): (1/m) Σ_j NCC(E_ss, E_sy_j) with
    E_ss = mean_i CE(s̄, s_i) (s̄ the mean sample, the sample-variance map) and E_sy_j = mean_i CE(y_j, s_i) (rater
    j's disagreement with the samples); NCC is the zero-normalised cross-correlation (Pearson correlation over
    voxels). An annotation whose map, or a sample set whose variance map, is constant gives NaN (undefined), and
    such terms are left out of the mean. Higher is better."""
    s = _as_mask_stack(samples, "samples").astype(np.float64)
    y = _as_mask_stack(references, "references").astype(np.float64)
    _check_same_shape(s, y)
    mean = s.mean(axis=0)
    e_ss = np.mean([_cross_entropy(mean, si, eps) for si in s], axis=0)
    values = []
    for yj in y:
        e_sy = np.mean([_cross_entropy(yj, si, eps) for si in s], axis=0)
        values.append(_pearson(e_ss, e_sy))
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def combined_sensitivity(samples, references) -> float:
    """CIMD's S_c: sensitivity tp / (tp + fn) of the union of the samples against the union of the references;
    1 when the references' union is empty (nothing to miss)."""
    s = _as_mask_stack(samples, "samples")
    y = _as_mask_stack(references, "references")
    _check_same_shape(s, y)
    s_c, y_c = s.any(axis=0), y.any(axis=0)
    ref = int(np.count_nonzero(y_c))
    return float(np.count_nonzero(s_c & y_c)) / ref if ref else 1.0


def maximum_dice_matching(samples, references) -> float:
    """CIMD's D_max: for every reference annotation the best Dice over the samples, averaged over the
    annotations (Dice(∅, ∅) = 1)."""
    return float(dice_matrix(references, samples).max(axis=1).mean())


def _pairwise_difference_variances(stack: np.ndarray) -> np.ndarray:
    k = stack.shape[0]
    if k < 2:
        return np.zeros(1)
    flat = stack.reshape(k, -1).astype(np.int8)
    return np.array([float(np.var(flat[i] - flat[j])) for i, j in combinations(range(k), 2)])


def diversity_agreement(samples, references) -> float:
    """CIMD's D_a = 1 − (ΔV_max + ΔV_min) / 2 with ΔV_max = |max V_Y − max V_Ŷ| and ΔV_min = |min V_Y − min V_Ŷ|,
    where V_Y (V_Ŷ) is the set of pairwise variances of the references (samples), the variance of a pair being
    Var over voxels of (a_i − a_j), i < j (see the module docstring on this reading)."""
    s = _as_mask_stack(samples, "samples")
    y = _as_mask_stack(references, "references")
    _check_same_shape(s, y)
    v_s = _pairwise_difference_variances(s)
    v_y = _pairwise_difference_variances(y)
    return float(1 - (abs(v_y.max() - v_s.max()) + abs(v_y.min() - v_s.min())) / 2)


def collective_insight(samples, references) -> dict[str, float]:
    """CI_n (MoDiff Tables 1–2; CIMD): {"s_c", "d_max", "d_a", "ci"} with
    CI = 3 · S_c · D_max · D_a / (S_c + D_max + D_a) as printed in CIMD. Higher is better."""
    s_c = combined_sensitivity(samples, references)
    d_max = maximum_dice_matching(samples, references)
    d_a = diversity_agreement(samples, references)
    den = s_c + d_max + d_a
    ci = 3 * s_c * d_max * d_a / den if den > 0 else 0.0
    return {"s_c": s_c, "d_max": d_max, "d_a": d_a, "ci": float(ci)}


def sample_set_metrics(samples, references) -> dict[str, float]:
    """GED, HM-IoU, NCC and CI (with its parts) of n samples against m references, keyed like MoDiff's tables
    (``"ged"``, ``"hm_iou"``, ``"ncc"``, ``"ci"``, ``"s_c"``, ``"d_max"``, ``"d_a"``, plus ``"n"`` and ``"m"``)."""
    s = _as_mask_stack(samples, "samples")
    y = _as_mask_stack(references, "references")
    out = {"n": s.shape[0], "m": y.shape[0],
           "ged": generalized_energy_distance(s, y),
           "hm_iou": hungarian_matched_iou(s, y),
           "ncc": variance_ncc(s, y)}
    out.update(collective_insight(s, y))
    return out
