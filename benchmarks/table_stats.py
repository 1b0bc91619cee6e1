"""The statistics and formatting the comparison table's sections share (benchmarks/table.py and
benchmarks/table_uncertainty.py): bootstrap intervals, the paired test and its verdict against stock, the rows' scores,
and the labels and numbers as the tables print them. It imports no other module of ``benchmarks``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (SciPy's ``bootstrap``). One value, or values that
    are all equal, give the degenerate interval (value, value); NaNs are an error (score every case first)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0 or np.isnan(v).any():
        raise ValueError(f"bootstrap_interval needs finite values, got {v.tolist()}")
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    from scipy.stats import bootstrap
    res = bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass(frozen=True)
class Paired:
    """A head against stock on the same cases: mean difference (head − stock), its bootstrap interval and the
    two-sided Wilcoxon signed-rank p-value."""
    n: int
    mean_difference: float
    interval: tuple[float, float]
    p_value: float


def paired_test(head: Sequence[float], stock: Sequence[float], seed: int = 0) -> Paired:
    """``head`` and ``stock`` are one metric per case, in the same case order. All differences zero: p = 1."""
    h, s = np.asarray(head, dtype=float), np.asarray(stock, dtype=float)
    if h.shape != s.shape or h.ndim != 1:
        raise ValueError(f"paired_test needs one value per case for both, in the same order; got {h.shape} and "
                         f"{s.shape}")
    d = h - s
    if np.all(d == 0):
        p = 1.0
    else:
        from scipy.stats import wilcoxon
        p = float(wilcoxon(h, s).pvalue)
    return Paired(n=int(d.size), mean_difference=float(d.mean()), interval=bootstrap_interval(d, seed=seed),
                  p_value=p)


def verdict(p: Paired, higher_is_better: bool = True, alpha: float = 0.05) -> str:
    """"better" / "worse" than stock when the paired test rejects at ``alpha`` and the difference's interval
    excludes 0 on that side; otherwise "no significant difference" (which is a result, not a failure)."""
    lo, hi = p.interval
    sign = 1 if higher_is_better else -1
    if p.p_value < alpha and sign * lo > 0 and sign * hi > 0:
        return "better"
    if p.p_value < alpha and sign * lo < 0 and sign * hi < 0:
        return "worse"
    return "no significant difference"


LEARNED_FLOOR = 50.0
"""Mean Dice over regions (percent, fold 0's validation cases) that a head's best measured setting must reach for
the table to choose its default sampler: below it the model has not learned to segment in the table's budget (a
diffusion head whose denoiser ignores the image samples random masks, Dice near the foreground fraction), every
setting is as bad as every other, and the cheapest-within-1-point rule would pick the cheapest on no evidence."""


def learned(d: dict, floor: float = LEARNED_FLOOR) -> bool:
    """Did the head's best steps-accuracy setting (``d``: a ``defaults`` record of table.json) reach ``floor``?"""
    return max(float(r["dice"]) for r in d["rows"]) >= floor


def setting_label(setting: tuple) -> str:
    """A (sampler, steps, samples) setting as the table names it (state keys, rows, RESULTS.md)."""
    sampler, steps, samples = setting
    return f"{sampler} {steps} steps x {samples} samples"


def _ci(stats: dict, scale: float = 1.0, digits: int = 1) -> str:
    lo, hi = stats["interval"]
    return f"{scale * stats['mean']:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def p_text(p: float) -> str:
    """A p-value as the table prints it: three decimals, or "p<0.001" below that (never "p=0.000")."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def per_case(res, metric: str) -> dict:
    """{region: [value per case, in case order]} of an evaluation result (``nndiff evaluate``'s per-case frame)."""
    frame = res.per_case.sort_values("case")
    return {region: [float(v) for v in part[metric]] for region, part in frame.groupby("region", sort=False)}


def score_against(rows: dict, stock: dict, regions: Sequence[str]) -> dict:
    """Per region the mean and interval of Dice and HD95 of ``rows`` and, unless it is the stock row itself, the
    paired test of its Dice against ``stock``'s (HD95's test beside it)."""
    out = {"dice": {}, "hd95": {}, "against_stock": {}}
    for r in regions:
        for metric in ("dice", "hd95"):
            v = rows[metric][r]
            out[metric][r] = {"mean": float(np.mean(v)), "interval": bootstrap_interval(v)}
        if rows is not stock:
            d, h = paired_test(rows["dice"][r], stock["dice"][r]), paired_test(rows["hd95"][r], stock["hd95"][r])
            out["against_stock"][r] = {"verdict": verdict(d), "mean_difference": d.mean_difference,
                                       "interval": d.interval, "p_value": d.p_value,
                                       "hd95_verdict": verdict(h, higher_is_better=False),
                                       "hd95_mean_difference": h.mean_difference, "hd95_p_value": h.p_value}
    return out
