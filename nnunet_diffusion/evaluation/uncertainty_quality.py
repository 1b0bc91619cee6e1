"""Is an uncertainty map any good? Voxel- and case-level measures of how well it finds a segmentation's errors,
and the calibration of the fused probabilities behind it. Pure numpy / SciPy / scikit-learn on arrays; reading
prediction folders is the caller's job.

Per region (BraTS region datasets: nnU-Net's region channels, e.g. whole tumour (1, 2, 3); label datasets: each
foreground class), for one case or pooled over cases:

* **error map** (:func:`error_map`): prediction ≠ reference for that region's mask;
* **margin** (:func:`margin_mask`): the voxels within ``margin`` voxels (default :data:`DEFAULT_MARGIN` = 3,
  Euclidean distance in voxel units) of the union of the reference's and the prediction's foreground. Every error
  lies inside that union, so the margin keeps all errors and drops only the far background, which is right almost
  everywhere and would otherwise dominate every voxel-level measure. All voxel-level measures below are taken inside
  the margin;
* **AUROC** of the uncertainty for the error map (:func:`error_auroc`, scikit-learn's ``roc_auc_score``): the
  probability that a wrong voxel is more uncertain than a right one (ties count ½); 1 = uncertainty separates them
  perfectly, 0.5 = no better than chance. NaN with a reason when every voxel is right or every voxel is wrong;
* **AURC** (:func:`aurc`, :func:`risk_coverage_curve`): the area under the risk–coverage curve (Geifman &
  El-Yaniv 2017), with its optimum for the same error map (:func:`optimal_aurc`) and their difference E-AURC; lower
  is better;
* **calibration** of the fused probabilities (:func:`calibration_bins`, :func:`expected_calibration_error`,
  :func:`brier_score`, :func:`reliability_diagram`): the region's probability against its presence in the
  reference;
* **case level** (:func:`case_spearman`): Spearman's ρ between the cases' mean uncertainty (inside the margin) and
  their Dice; negative when the uncertainty ranks the cases by their Dice (more uncertain, worse).

Baseline maps measured the same way: :func:`entropy_map` (the entropy of nnU-Net's fused softmax/sigmoid, the same
as ``nndiff predict --uncertainty`` writes, see :mod:`nnunet_diffusion.inference.uncertainty`) and
:func:`mirror_variance` (the variance over nnU-Net's mirror test-time augmentation).

Typical use: ``per_case = [case_voxels(pred, ref, unc, probs, regions) for ... in cases]`` then
``pooled_quality(per_case)`` → ``{region: RegionQuality}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import NNDiffError
from .metrics import region_mask

DEFAULT_MARGIN = 3
"""Voxels (Euclidean, voxel units) around the union of reference and prediction kept by :func:`margin_mask`."""
DEFAULT_BINS = 15
"""Equal-width probability bins of the expected calibration error and the reliability diagram."""

class UncertaintyQualityError(NNDiffError, ValueError):
    """Inputs that do not fit together (shapes, channels, values out of range)."""


# --------------------------------------------------------------------------------------------------------------
# masks


def is_region_dataset(regions: Sequence[tuple[str, object]]) -> bool:
    """True when ``regions`` ([(name, label or region tuple)], as :func:`.evaluate.regions_from_dataset_json`
    returns) are nnU-Net regions (some entry is a tuple): then probability channel k is the k-th region; for label
    datasets channel c is label c (nnU-Net's labels are consecutive from 0)."""
    return any(isinstance(r, (tuple, list)) for _, r in regions)


def error_map(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The wrong voxels of one region: ``prediction != reference`` for two boolean masks of the same shape."""
    reference, prediction = np.asarray(reference, bool), np.asarray(prediction, bool)
    if reference.shape != prediction.shape:
        raise UncertaintyQualityError(f"reference {reference.shape} and prediction {prediction.shape} differ in "
                                      f"shape")
    return reference != prediction


def margin_mask(reference: np.ndarray, prediction: np.ndarray, margin: float | None = DEFAULT_MARGIN) -> np.ndarray:
    """The voxels within ``margin`` voxels of the union of the two boolean masks.

    Exactly: voxel v is kept when the Euclidean distance, in voxel units (every axis's step 1, whatever the image
    spacing), from v's centre to the nearest voxel of ``reference | prediction`` is ≤ ``margin``
    (``scipy.ndimage.distance_transform_edt`` of the union's complement). The union itself has distance 0 and is
    always kept; ``margin=0`` keeps the union only; in 3-D ``margin=3`` adds a ball of radius 3 around it (not the
    7×7×7 cube of three dilations with a full structuring element). An empty union gives an empty mask;
    ``margin=None`` keeps every voxel (no margin)."""
    reference, prediction = np.asarray(reference, bool), np.asarray(prediction, bool)
    if reference.shape != prediction.shape:
        raise UncertaintyQualityError(f"reference {reference.shape} and prediction {prediction.shape} differ in "
                                      f"shape")
    union = reference | prediction
    if margin is None:
        return np.ones(union.shape, bool)
    if margin < 0 or not math.isfinite(margin):
        raise UncertaintyQualityError(f"margin must be a finite number of voxels ≥ 0; got {margin!r}")
    if not union.any():
        return np.zeros(union.shape, bool)
    from scipy.ndimage import distance_transform_edt
    return distance_transform_edt(~union) <= margin


def fp_fn_map(reference: np.ndarray, prediction: np.ndarray, regions) -> np.ndarray:
    """Per voxel over all ``regions`` of two label maps: 0 right in every region, 1 false positive (in some
    predicted region, not in the reference's, and no region missed), 2 false negative (missed in some region, no
    region added), 3 both (e.g. one foreground class predicted for another in a label dataset; BraTS's nested
    regions never give it). uint8, the maps' shape."""
    fp = np.zeros(np.shape(reference), bool)
    fn = np.zeros_like(fp)
    for _, region in regions:
        r, p = region_mask(reference, region), region_mask(prediction, region)
        fp |= p & ~r
        fn |= r & ~p
    return (fp.astype(np.uint8) + 2 * fn.astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------
# voxel level: errors found by the uncertainty


def _flat_pair(uncertainty, errors) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(uncertainty, np.float64).ravel()
    e = np.asarray(errors, bool).ravel()
    if u.shape != e.shape:
        raise UncertaintyQualityError(f"uncertainty ({u.size} values) and error map ({e.size} values) differ in "
                                      f"size")
    if not np.isfinite(u).all():
        raise UncertaintyQualityError("the uncertainty map has non-finite values inside the margin")
    return u, e


def auroc_undefined_reason(errors) -> str | None:
    """Why the AUROC of an error map is undefined (None when it is defined)."""
    e = np.asarray(errors, bool)
    if e.size == 0:
        return "no voxel in the margin"
    if not e.any():
        return "every voxel in the margin is right (no error to find)"
    if e.all():
        return "every voxel in the margin is wrong (no right voxel to separate)"
    return None


def error_auroc(uncertainty, errors) -> float:
    """Area under the ROC curve of ``uncertainty`` as a score for ``errors`` (``sklearn.metrics.roc_auc_score``):
    P(u(wrong voxel) > u(right voxel)) + ½ P(tie). NaN when undefined (:func:`auroc_undefined_reason`)."""
    u, e = _flat_pair(uncertainty, errors)
    if auroc_undefined_reason(e) is not None:
        return float("nan")
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(e, u))


def risk_coverage_curve(uncertainty, errors) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk), one point per voxel: the voxels sorted by uncertainty ascending (the most certain first);
    at coverage k/n the risk is the error rate among the k most certain voxels. Voxels of equal uncertainty cannot
    be ordered, so within a tie the expected risk over every order is used (the errors of the tied group counted
    in proportion): a constant map gives the overall error rate at every coverage, whatever the voxel order."""
    u, e = _flat_pair(uncertainty, errors)
    n = u.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(u, kind="stable")
    us, es = u[order], e[order].astype(np.float64)
    new_group = np.r_[True, us[1:] != us[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.r_[starts, n])
    group_errors = np.add.reduceat(es, starts)
    before = np.r_[0.0, np.cumsum(group_errors)[:-1]]
    k = np.arange(1, n + 1)
    expected_errors = before[group] + group_errors[group] * (k - starts[group]) / sizes[group]
    return k / n, expected_errors / k


def aurc(uncertainty, errors) -> float:
    """Area under the risk–coverage curve (Geifman & El-Yaniv, "Selective classification for deep neural
    networks", NeurIPS 2017; the AURC of Geifman et al., ICLR 2019): the voxels sorted by uncertainty ascending,
    risk(k) = error rate among the k most certain, AURC = (1/n) Σ_{k=1..n} risk(k), the integral over coverage
    k/n in steps of 1/n (ties: :func:`risk_coverage_curve`). In [0, 1], lower is better; NaN without voxels."""
    _, risk = risk_coverage_curve(uncertainty, errors)
    return float(risk.mean()) if risk.size else float("nan")


def optimal_aurc(errors) -> float:
    """The AURC of a map that ranks every right voxel before every wrong one (the least any map can reach on this
    error map): with n voxels and m errors, (1/n) Σ_{k=n−m+1..n} (k − (n − m)) / k. E-AURC = AURC − this.
    NaN without voxels."""
    e = np.asarray(errors, bool).ravel()
    n, m = e.size, int(e.sum())
    if n == 0:
        return float("nan")
    k = np.arange(n - m + 1, n + 1, dtype=np.float64)
    return float(((k - (n - m)) / k).sum() / n)


# --------------------------------------------------------------------------------------------------------------
# calibration of the fused probabilities


@dataclass
class CalibrationBins:
    """Equal-width bins of [0, 1]: bin i holds the probabilities in [edges[i], edges[i+1]) (the last bin also 1).
    ``mean_probability`` and ``frequency`` (the fraction of the bin's voxels in the reference) are NaN for empty
    bins."""
    edges: np.ndarray
    counts: np.ndarray
    mean_probability: np.ndarray
    frequency: np.ndarray

    @property
    def ece(self) -> float:
        """Σ_bins (count / N) · |mean probability − frequency|; NaN without voxels."""
        n = self.counts.sum()
        if n == 0:
            return float("nan")
        full = self.counts > 0
        return float((self.counts[full] / n * np.abs(self.mean_probability[full] - self.frequency[full])).sum())

    def as_dict(self) -> dict:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "mean_probability": self.mean_probability.tolist(), "frequency": self.frequency.tolist()}


def _flat_probabilities(probability, target) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probability, np.float64).ravel()
    y = np.asarray(target, bool).ravel()
    if p.shape != y.shape:
        raise UncertaintyQualityError(f"probabilities ({p.size} values) and reference ({y.size} values) differ in "
                                      f"size")
    if p.size and not (np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
        raise UncertaintyQualityError("probabilities must lie in [0, 1]")
    return p, y


def calibration_bins(probability, target, bins: int = DEFAULT_BINS) -> CalibrationBins:
    """The reliability table of ``probability`` (a region's fused probability per voxel) against ``target`` (the
    voxel is in the region in the reference), in ``bins`` equal-width bins (see :class:`CalibrationBins`)."""
    if int(bins) != bins or bins < 1:
        raise UncertaintyQualityError(f"bins must be a positive integer; got {bins!r}")
    bins = int(bins)
    p, y = _flat_probabilities(probability, target)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.searchsorted(edges[1:-1], p, side="right")  # p == an inner edge goes to the bin above it
    counts = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(counts > 0, sum_p / np.maximum(counts, 1), np.nan)
        freq = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
    return CalibrationBins(edges, counts, mean_p, freq)


def expected_calibration_error(probability, target, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins: Σ_b (n_b / N) · |mean probability in b − fraction
    of b's voxels in the reference| (Guo et al. 2017, for the region's probability as in a reliability diagram).
    0 for perfectly calibrated probabilities; NaN without voxels."""
    return calibration_bins(probability, target, bins).ece


def brier_score(probability, target) -> float:
    """Mean squared difference between the probability and the reference's 0/1
    (``sklearn.metrics.brier_score_loss``); NaN without voxels."""
    p, y = _flat_probabilities(probability, target)
    if p.size == 0:
        return float("nan")
    from sklearn.metrics import brier_score_loss
    return float(brier_score_loss(y.astype(np.int64), p, labels=[0, 1]))


def reliability_diagram(curves: Mapping[str, Mapping[str, CalibrationBins]], path: str | Path,
                        title: str | None = None) -> Path:
    """A reliability-diagram PNG: one panel per region, one line per series (``curves``: {series: {region:
    CalibrationBins}}, e.g. a head or stock nnU-Net), the mean probability of each non-empty bin against the
    fraction of its voxels in the reference, with the diagonal of perfect calibration and each series' ECE in the
    legend. Written atomically; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..atomic import atomic_path
    regions = list(dict.fromkeys(r for per_region in curves.values() for r in per_region))
    if not regions:
        raise UncertaintyQualityError("reliability diagram: no calibration curve given")
    fig, axes = plt.subplots(1, len(regions), figsize=(3.6 * len(regions), 3.8), squeeze=False)
    for ax, region in zip(axes[0], regions):
        ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
        for series, per_region in curves.items():
            b = per_region.get(region)
            if b is None:
                continue
            full = b.counts > 0
            ax.plot(b.mean_probability[full], b.frequency[full], marker="o", ms=3, label=f"{series} (ECE "
                    f"{b.ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(region)
        ax.set_xlabel("fused probability (bin mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("fraction in the reference")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# case level


def spearman_undefined_reason(mean_uncertainty, dice) -> str | None:
    """Why Spearman's ρ of the cases is undefined (None when it is defined); cases with a NaN are left out."""
    u, d = np.asarray(mean_uncertainty, np.float64), np.asarray(dice, np.float64)
    ok = np.isfinite(u) & np.isfinite(d)
    if ok.sum() < 3:
        return f"{int(ok.sum())} case(s) with both a mean uncertainty and a Dice; Spearman needs at least 3"
    if np.ptp(u[ok]) == 0:
        return "every case has the same mean uncertainty"
    if np.ptp(d[ok]) == 0:
        return "every case has the same Dice"
    return None


def case_spearman(mean_uncertainty: Sequence[float], dice: Sequence[float]) -> tuple[float, float]:
    """(ρ, two-sided p) of ``scipy.stats.spearmanr`` between the cases' mean uncertainty and their Dice, cases with
    a NaN in either left out; (NaN, NaN) when undefined (:func:`spearman_undefined_reason`). ρ < 0: the more
    uncertain cases are the worse ones."""
    u, d = np.asarray(mean_uncertainty, np.float64), np.asarray(dice, np.float64)
    if u.shape != d.shape:
        raise UncertaintyQualityError(f"{u.size} mean uncertainties but {d.size} Dice values")
    if spearman_undefined_reason(u, d) is not None:
        return float("nan"), float("nan")
    from scipy.stats import spearmanr
    ok = np.isfinite(u) & np.isfinite(d)
    res = spearmanr(u[ok], d[ok])
    return float(res.statistic), float(res.pvalue)


# --------------------------------------------------------------------------------------------------------------
# baseline uncertainty maps


def entropy(p: np.ndarray, regions: bool) -> np.ndarray:
    """Entropy of fused probabilities ``p`` (channels first), in [0, 1]: region datasets (sigmoids) one binary entropy
    per region channel; label datasets (softmax) the class entropy divided by log₂ C, shape (1, ...). What
    ``nndiff predict --uncertainty`` writes (:mod:`nnunet_diffusion.inference.uncertainty` calls this)."""
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    if regions:
        return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    p = p / p.sum(0, keepdims=True)
    return -(p * np.log2(p)).sum(0, keepdims=True) / np.log2(p.shape[0])


def entropy_map(probabilities: np.ndarray, region_dataset: bool) -> np.ndarray:
    """The entropy of nnU-Net's fused probabilities (channels first), exactly as ``nndiff predict --uncertainty``
    writes it (:mod:`nnunet_diffusion.inference.uncertainty`): region datasets (sigmoids) one binary entropy per
    region channel, shape (R, ...); label datasets (softmax) the class entropy divided by log₂ C, shape (1, ...).
    In [0, 1]."""
    return entropy(np.asarray(probabilities), region_dataset).astype(np.float32)


def mirror_variance(per_mirror: Sequence[np.ndarray]) -> np.ndarray:
    """The variance (population, ddof 0) over nnU-Net's mirror test-time augmentation: ``per_mirror`` is the list
    of probability maps (channels first, each already flipped back to the image's orientation; nnU-Net's 3-D
    mirroring gives 8), the result one variance per channel, the maps' shape, float32. Region datasets: channel k
    is region k; label datasets: channel c is class c (:func:`region_channel` picks a region's)."""
    maps = [np.asarray(m, np.float32) for m in per_mirror]
    if len(maps) < 2:
        raise UncertaintyQualityError(f"mirror variance needs at least 2 mirrored predictions; got {len(maps)}")
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise UncertaintyQualityError(f"mirrored predictions differ in shape: {sorted(shapes)}")
    return np.var(np.stack(maps), axis=0, dtype=np.float64).astype(np.float32)


def region_channel(array: np.ndarray, spatial_shape: tuple[int, ...], index: int, region, region_dataset: bool,
                   what: str = "uncertainty") -> np.ndarray:
    """The map of the ``index``-th region from ``array``: a single map (the spatial shape, or one channel) serves
    every region; otherwise channels first, the ``index``-th channel for region datasets, channel ``region`` (the
    label) for label datasets."""
    a = np.asarray(array)
    if a.shape == tuple(spatial_shape):
        return a
    if a.ndim != len(spatial_shape) + 1 or a.shape[1:] != tuple(spatial_shape):
        raise UncertaintyQualityError(f"{what} of shape {a.shape} does not fit the segmentation's {spatial_shape} "
                                      f"(expected it, or channels first)")
    if a.shape[0] == 1:
        return a[0]
    channel = index if region_dataset else int(region)
    if channel >= a.shape[0]:
        raise UncertaintyQualityError(f"{what} has {a.shape[0]} channels, none for region {region!r} (channel "
                                      f"{channel})")
    return a[channel]


# --------------------------------------------------------------------------------------------------------------
# per case, pooled


@dataclass
class RegionVoxels:
    """One case and region, the voxels inside its margin: uncertainty, wrong or right, fused probability (None
    without probabilities) and presence in the reference; plus the case's Dice (NaN when reference and prediction
    are both empty) and mean uncertainty inside the margin (NaN for an empty margin)."""
    uncertainty: np.ndarray
    errors: np.ndarray
    probability: np.ndarray | None
    target: np.ndarray
    dice: float
    mean_uncertainty: float


def case_voxels(prediction: np.ndarray, reference: np.ndarray, uncertainty: np.ndarray,
                probabilities: np.ndarray | None, regions: Sequence[tuple[str, object]],
                margin: float | None = DEFAULT_MARGIN, ignore_label: int | None = None) -> dict[str, RegionVoxels]:
    """{region name: :class:`RegionVoxels`} of one case.

    ``prediction``, ``reference``: label maps of one shape (nnU-Net's segmentation and the ground truth);
    ``regions``: [(name, label or region tuple)] (:func:`.evaluate.regions_from_dataset_json`); ``uncertainty`` and
    ``probabilities`` (nnU-Net's fused probabilities, channels first, or None): as :func:`region_channel` reads
    them. Voxels whose reference is ``ignore_label`` are left out of the margin and the Dice."""
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape:
        raise UncertaintyQualityError(f"prediction {prediction.shape} and reference {reference.shape} differ in "
                                      f"shape")
    shape = reference.shape
    region_dataset = is_region_dataset(regions)
    keep = np.ones(shape, bool) if ignore_label is None else reference != ignore_label
    out = {}
    for k, (name, region) in enumerate(regions):
        r, p = region_mask(reference, region) & keep, region_mask(prediction, region) & keep
        m = margin_mask(r, p, margin) & keep
        u = region_channel(uncertainty, shape, k, region, region_dataset)[m].astype(np.float64)
        prob = None
        if probabilities is not None:
            prob = region_channel(probabilities, shape, k, region, region_dataset, "probabilities")[m]
            prob = prob.astype(np.float64)
        den = int(r.sum() + p.sum())
        dice = 2.0 * int((r & p).sum()) / den if den else float("nan")
        out[name] = RegionVoxels(uncertainty=u, errors=(r != p)[m], probability=prob, target=r[m], dice=dice,
                                 mean_uncertainty=float(u.mean()) if u.size else float("nan"))
    return out


@dataclass
class RegionQuality:
    """The measures of one region pooled over cases (the voxels of every case's margin together). ``notes`` says
    why a NaN is NaN."""
    n_cases: int
    n_voxels: int
    n_errors: int
    auroc: float
    aurc: float
    optimal_aurc: float
    ece: float
    brier: float
    spearman_rho: float
    spearman_p: float
    calibration: CalibrationBins | None
    notes: list[str] = field(default_factory=list)

    @property
    def e_aurc(self) -> float:
        """AURC − optimal AURC (0 for a perfect ranking)."""
        return self.aurc - self.optimal_aurc

    @property
    def error_rate(self) -> float:
        return self.n_errors / self.n_voxels if self.n_voxels else float("nan")

    def as_dict(self) -> dict:
        return {"n_cases": self.n_cases, "n_voxels": self.n_voxels, "n_errors": self.n_errors,
                "error_rate": self.error_rate, "auroc": self.auroc, "aurc": self.aurc,
                "optimal_aurc": self.optimal_aurc, "e_aurc": self.e_aurc, "ece": self.ece, "brier": self.brier,
                "spearman_rho": self.spearman_rho, "spearman_p": self.spearman_p,
                "calibration": self.calibration.as_dict() if self.calibration is not None else None,
                "notes": list(self.notes)}


def pooled_quality(per_case: Sequence[Mapping[str, RegionVoxels]], bins: int = DEFAULT_BINS
                   ) -> dict[str, RegionQuality]:
    """{region: :class:`RegionQuality`} over the cases (:func:`case_voxels` of each; one case gives that case's
    voxel-level measures, its Spearman NaN). Calibration is NaN, with a note, when a case came without
    probabilities."""
    if not per_case:
        raise UncertaintyQualityError("no case to measure")
    regions = list(dict.fromkeys(r for c in per_case for r in c))
    out = {}
    for region in regions:
        items = [c[region] for c in per_case if region in c]
        u = np.concatenate([i.uncertainty for i in items])
        e = np.concatenate([i.errors for i in items])
        notes = []
        why = auroc_undefined_reason(e)
        if why is not None:
            notes.append(f"AUROC: {why}")
        if e.size == 0:
            notes.append("AURC: no voxel in the margin")
        if any(i.probability is None for i in items):
            notes.append("calibration: no probabilities for some case")
            ece, brier, cal = float("nan"), float("nan"), None
        else:
            p = np.concatenate([i.probability for i in items])
            y = np.concatenate([i.target for i in items])
            cal = calibration_bins(p, y, bins)
            ece, brier = cal.ece, brier_score(p, y)
        mu, dice = [i.mean_uncertainty for i in items], [i.dice for i in items]
        why = spearman_undefined_reason(mu, dice)
        if why is not None:
            notes.append(f"Spearman: {why}")
        rho, pval = case_spearman(mu, dice)
        out[region] = RegionQuality(n_cases=len(items), n_voxels=int(e.size), n_errors=int(e.sum()),
                                    auroc=error_auroc(u, e), aurc=aurc(u, e), optimal_aurc=optimal_aurc(e), ece=ece,
                                    brier=brier, spearman_rho=rho, spearman_p=pval, calibration=cal, notes=notes)
    return out


# --------------------------------------------------------------------------------------------------------------
# from files: nnU-Net's prediction folders


def read_label_map(path: str | Path) -> np.ndarray:
    """A label map (segmentation or reference) as a numpy array, SimpleITK's axis order (the order of nnU-Net's
    probabilities in ``<case>.npz``)."""
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load_probabilities(path: str | Path) -> np.ndarray:
    """The fused probabilities nnU-Net writes with ``--save_probabilities`` (or a validation run with ``--npz``):
    ``<case>.npz``'s ``probabilities`` array, channels first, on the original image grid."""
    path = Path(path)
    try:
        with np.load(path) as f:
            return f["probabilities"]
    except KeyError:
        raise UncertaintyQualityError(f"{path}: no 'probabilities' array (not an nnU-Net probabilities file)") from None
    except (OSError, ValueError) as e:
        raise UncertaintyQualityError(f"{path}: cannot read it as .npz ({e})") from None


def case_voxels_from_files(prediction: str | Path, reference: str | Path, probabilities: str | Path,
                           regions: Sequence[tuple[str, object]], margin: float | None = DEFAULT_MARGIN,
                           ignore_label: int | None = None, uncertainty: np.ndarray | None = None
                           ) -> dict[str, RegionVoxels]:
    """:func:`case_voxels` of one case of an nnU-Net prediction folder: the segmentation ``prediction`` and the
    reference label map (image files), the fused probabilities ``probabilities`` (``<case>.npz``, see
    :func:`load_probabilities`) and the uncertainty map: ``uncertainty`` (an array as :func:`region_channel` reads
    it, e.g. :func:`mirror_variance`) or, None, :func:`entropy_map` of the probabilities (what ``nndiff predict
    --uncertainty`` writes). Probabilities of another shape than the segmentation are an error naming the file."""
    seg, ref = read_label_map(prediction), read_label_map(reference)
    probs = load_probabilities(probabilities)
    if probs.ndim != seg.ndim + 1 or probs.shape[1:] != seg.shape:
        raise UncertaintyQualityError(f"{probabilities}: probabilities of shape {probs.shape} do not fit the "
                                      f"segmentation {Path(prediction).name} of shape {seg.shape} (expected channels "
                                      f"first on the same grid)")
    if uncertainty is None:
        uncertainty = entropy_map(probs, is_region_dataset(regions))
    return case_voxels(seg, ref, uncertainty, probs, regions, margin, ignore_label)


def bins_from_dict(d: Mapping) -> CalibrationBins:
    """A :class:`CalibrationBins` back from its :meth:`CalibrationBins.as_dict` (e.g. read from a JSON file; NaN
    written as null by some JSON writers reads back as NaN)."""
    def arr(key, dtype=np.float64):
        return np.array([np.nan if v is None else v for v in d[key]], dtype=dtype)
    return CalibrationBins(edges=arr("edges"), counts=arr("counts", np.int64), mean_probability=arr("mean_probability"),
                           frequency=arr("frequency"))
