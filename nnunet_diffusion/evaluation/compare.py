"""Compare trainers (heads) across folds on their nnU-Net validation predictions: tables, paired tests, pictures.

``compare_trainers(dataset, ["nnUNetTrainer", "nnUNetTrainerNNDM"], "cmp", folds=[0, 1, 2, 3, 4])`` (or
``nndiff compare -d ID -tr nnUNetTrainer nnUNetTrainerNNDM -f 0 1 2 3 4 -o cmp``) reads
``$nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>/fold_<f>/validation/*`` for every trainer and
fold, evaluates each against ``$nnUNet_preprocessed/<Dataset>/gt_segmentations`` (what nnU-Net's own validation
uses) and writes into the output folder:

* ``<trainer>/fold_<f>/`` — that folder's per_case.csv, summary.json and table.md (as ``nndiff evaluate``);
* ``per_case.csv`` — all rows, with trainer and fold columns (and the per-case mean over regions);
* ``table.md`` — per region "Method | DSC | HD95 | VS | IoU | mIoU": mean ± std over cases (all folds pooled) and, in a
  second table, mean ± std over folds (of the per-fold means); then the paired per-case differences of every
  trainer against the baseline (same fold, same case) with the Wilcoxon signed-rank p-value;
* ``paired.csv``, ``summary.json`` — the same numbers;
* with lesion-wise evaluation (on by default for BraTS region datasets): the lesion-wise columns (LW DSC, LW HD95)
  in every table, paired test and box plot, and ``per_lesion.csv`` (all folders, with trainer and fold columns);
* ``figures/box_<metric>.png`` — box plots per metric, one panel per region, one box per trainer;
* ``figures/case_<case>.png`` — for chosen cases, axial/coronal/sagittal slices through the tumour showing FLAIR
  and T1ce (as named in dataset.json; else the first channel) with the reference, baseline and other trainers'
  contours; where a trainer wrote an uncertainty map ``uncertainty/<case><file_ending>`` beside its prediction
  (``nndiff predict --uncertainty``), per view the error map (false positives and negatives in two colours) right
  above the uncertainty map on the same slice;
* where a trainer's folders hold nnU-Net's fused probabilities for every case (``<case>.npz``: validation run with
  ``--npz``, or ``nndiff predict --save_probabilities``), how good their uncertainty is: the entropy of the fused
  probabilities (the map ``nndiff predict --uncertainty`` writes) against the errors, inside a margin around reference
  and prediction (:mod:`.uncertainty_quality`: voxel AUROC, AURC, ECE, Brier, case-level Spearman of mean uncertainty
  vs Dice), pooled over the trainer's cases, in ``table.md`` beside its Dice, ``uncertainty_quality.csv``,
  ``summary.json`` (``uncertainty_quality``) and ``figures/reliability.png``.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .evaluate import (ALL_REGIONS, LESIONWISE_TABLE_COLUMNS, PERCENT_METRICS, UNCERTAINTY_DIR, EvaluationError,
                       build_result, conventions, dataset_labels, describe, fmt, lesions_to_frame, lesionwise_note,
                       lesionwise_settings, lesionwise_summary, load_dataset_json, match_cases, metric_columns,
                       per_case_region_mean, regions_from_dataset_json, rows_to_frame, run_cases, table_notes,
                       to_json, unknown_dataset_message, write_text_atomic)
from .metrics import BRATS_EMPTY_HD95, HD95_MODES, region_mask
from .uncertainty_quality import DEFAULT_MARGIN

COMPARE_METRICS = (("dice", "DSC (%)"), ("hd95", "HD95 (mm)"), ("vs", "VS (%)"), ("iou", "IoU (%)"),
                   ("miou", "mIoU (%)"))
LESIONWISE_COMPARE_METRICS = COMPARE_METRICS[:2] + LESIONWISE_TABLE_COLUMNS + COMPARE_METRICS[2:]
"""COMPARE_METRICS with the lesion-wise Dice and HD95 after DSC and HD95 (lesion-wise evaluation)."""


def compare_metrics(df) -> tuple[tuple[str, str], ...]:
    """The (metric, label) columns of the tables, paired tests and box plots for a per-case frame."""
    return LESIONWISE_COMPARE_METRICS if "lesionwise_dice" in df.columns else COMPARE_METRICS


_SOURCE_COLOURS = ("#1f77b4", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_REGION_COLOURS = ("#ffd700", "#ff3030", "#00e5ff", "#7CFC00", "#ff69b4")  # one per region, every panel


@dataclass
class CompareResult:
    per_case: "object"       # DataFrame: trainer, fold, case, region, metrics (incl. 'mean over regions' rows)
    paired: "object"         # DataFrame: trainer, baseline, region, metric, mean/std/median of the differences, n, p
    summary: dict
    table: str
    output_dir: Path
    figures: list[Path] = field(default_factory=list)


def parse_folds(folds: Sequence[int | str]) -> list[str]:
    """nnU-Net fold names: non-negative integers or 'all'."""
    out = []
    for f in folds:
        f = str(f).strip()
        if f != "all" and not f.isdigit():
            raise EvaluationError(f"a fold is a non-negative integer or 'all'; got {f!r}")
        if f not in out:
            out.append(f)
    if not out:
        raise EvaluationError("no fold given")
    return out


def _dataset_name(dataset: int | str, results_dir: Path | None = None) -> str:
    """DatasetNNN_Name from an id or name, as nnU-Net resolves it (also looking into ``results_dir``)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if str(dataset).startswith("Dataset"):
        return str(dataset)
    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        if results_dir is not None and str(dataset).isdigit():
            hits = sorted(p.name for p in results_dir.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
            if len(hits) == 1:
                return hits[0]
        raise EvaluationError(unknown_dataset_message(dataset, e)) from None


def _env_dir(var: str, given, *parts: str) -> Path:
    if given is not None:
        return Path(given)
    value = os.environ.get(var)
    if not value:
        raise EvaluationError(f"{var} is not set; set it (as for nnU-Net) or pass the folder explicitly")
    return Path(value, *parts)


def validation_folder(results_dir: Path, dataset_name: str, trainer: str, plans: str, configuration: str,
                      fold: str) -> Path:
    return results_dir / dataset_name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}" / "validation"


def compare_trainers(dataset: int | str, trainers: Sequence[str], output_dir: str | os.PathLike,
                     folds: Sequence[int | str] = (0,), configuration: str = "3d_fullres",
                     plans: str = "nnUNetPlans", baseline: str | None = None,
                     results_dir: str | os.PathLike | None = None, reference_dir: str | os.PathLike | None = None,
                     images_dir: str | os.PathLike | None = None, dataset_json: str | os.PathLike | None = None,
                     cases: Sequence[str] | None = None, n_cases: int = 2, num_processes: int | None = None,
                     hd95_mode: str = "brats", empty_hd95: float = BRATS_EMPTY_HD95, plots: bool = True,
                     progress: bool = True, lesionwise: bool | None = None,
                     lesionwise_convention: str | None = None,
                     lesionwise_cohort: str | None = None,
                     uncertainty_margin: float | None = DEFAULT_MARGIN) -> CompareResult:
    """Evaluate the validation predictions of ``trainers`` on ``folds`` and compare them (see module docstring).

    ``baseline`` (default: the first trainer) is what paired differences are taken against. ``cases`` picks the
    cases drawn as slice figures; by default the ``n_cases`` cases whose first-region Dice changed most between
    the baseline and the second trainer (the worst cases when there is one trainer). The folders default to
    nnU-Net's: ``$nnUNet_results``, ``$nnUNet_preprocessed/<Dataset>/gt_segmentations`` and
    ``$nnUNet_raw/<Dataset>/imagesTr``. ``lesionwise``, ``lesionwise_convention``, ``lesionwise_cohort``: as
    for :func:`.evaluate.evaluate_folder`. ``uncertainty_margin``: voxels around reference and prediction inside which
    the uncertainty quality is measured (:func:`.uncertainty_quality.margin_mask`; None: every voxel), for the
    trainers whose folders hold ``<case>.npz`` probabilities for every case (:func:`uncertainty_quality_of`).
    """
    import pandas as pd
    trainers = list(dict.fromkeys(trainers))
    if not trainers:
        raise EvaluationError("give at least one trainer (-tr)")
    if hd95_mode not in HD95_MODES:
        raise EvaluationError(f"hd95 mode must be one of {', '.join(HD95_MODES)}; got {hd95_mode!r}")
    baseline = trainers[0] if baseline is None else baseline
    if baseline not in trainers:
        raise EvaluationError(f"baseline {baseline!r} is not among the trainers {trainers}")
    folds = parse_folds(folds)
    results_dir = _env_dir("nnUNet_results", results_dir)
    name = _dataset_name(dataset, results_dir)
    reference_dir = _env_dir("nnUNet_preprocessed", reference_dir, name, "gt_segmentations")
    if dataset_json is None:
        try:
            dj, dj_source = load_dataset_json(dataset)
        except EvaluationError:
            own = validation_folder(results_dir, name, trainers[0], plans, configuration, folds[0]).parents[1]
            dj, dj_source = load_dataset_json(dataset_json=own / "dataset.json")
    else:
        dj, dj_source = load_dataset_json(dataset_json=dataset_json)
    regions, ignore_label = regions_from_dataset_json(dj)
    lw = lesionwise_settings(dj, lesionwise, lesionwise_convention, lesionwise_cohort)
    options = {"lesionwise": lw, "labels": dataset_labels(dj)}
    file_ending = dj.get("file_ending", ".nii.gz")

    # every (trainer, fold) folder's cases, evaluated in one pool
    tasks, folders = [], {}
    for tr in trainers:
        for f in folds:
            vf = validation_folder(results_dir, name, tr, plans, configuration, f)
            if not vf.is_dir():
                raise EvaluationError(f"no validation predictions for {tr} fold {f}: {vf} does not exist (train "
                                      f"it with nnUNetv2_train, or re-run its validation with --val)")
            matched = match_cases(vf, reference_dir, file_ending, only_predicted=True)
            folders[(tr, f)] = (vf, matched)
            tasks += [({"trainer": tr, "fold": f}, c, str(p), str(r), regions, ignore_label, hd95_mode,
                       float(empty_hd95), options) for c, p, r in matched]
    if cases is not None:
        known = {c for _, matched in folders.values() for c, _, _ in matched}
        unknown = [c for c in cases if c not in known]
        if unknown:
            raise EvaluationError(f"case(s) {', '.join(unknown)} to draw have no prediction in the compared "
                                  f"folders")
    lesion_rows: list[dict] = []
    rows = run_cases(tasks, num_processes, progress, desc=f"evaluate {len(folders)} folder(s)",
                     lesion_rows=lesion_rows)

    out = Path(output_dir)
    region_names = [n for n, _ in regions]
    for (tr, f), (vf, _) in folders.items():
        sub = [{k: v for k, v in r.items() if k not in ("trainer", "fold")} for r in rows
               if r["trainer"] == tr and r["fold"] == f]
        sub_lesions = [{k: v for k, v in r.items() if k not in ("trainer", "fold")} for r in lesion_rows
                       if r["trainer"] == tr and r["fold"] == f]
        build_result(sub, regions, ignore_label, hd95_mode, empty_hd95,
                     {"prediction_folder": str(vf), "reference_folder": str(reference_dir),
                      "dataset_json": dj_source}, f"{tr}, fold {f}", out / tr / f"fold_{f}",
                     lesion_rows=sub_lesions if lw is not None else None, lesionwise=lw)

    df = rows_to_frame(rows, regions, extra_columns=("trainer", "fold"))
    df["trainer"] = pd.Categorical(df["trainer"], categories=trainers, ordered=True)
    df = df.sort_values(["trainer", "fold", "case"], kind="stable").reset_index(drop=True)
    df["trainer"] = df["trainer"].astype(str)
    if len(region_names) > 1:
        allr = per_case_region_mean(df)[["trainer", "fold", "case", "region", *metric_columns(df)]]
        df = pd.concat([df, allr], ignore_index=True)
    shown_regions = region_names + ([ALL_REGIONS] if len(region_names) > 1 else [])

    metrics = compare_metrics(df)
    stats = _summaries(df, trainers, shown_regions)
    paired = paired_differences(df, trainers, baseline, shown_regions, metrics=tuple(m for m, _ in metrics))
    conv = conventions(hd95_mode, empty_hd95)
    summary = {"dataset": name, "configuration": configuration, "plans": plans, "folds": folds,
               "trainers": trainers, "baseline": baseline, "reference_folder": str(reference_dir),
               "dataset_json": dj_source, "hd95_mode": hd95_mode, "empty_hd95_mm": float(empty_hd95),
               "conventions": conv,
               "n_cases": {tr: int(df[df["trainer"] == tr][["fold", "case"]].drop_duplicates().shape[0])
                           for tr in trainers},
               "metrics": stats, "paired": paired.to_dict(orient="records")}
    notes = []
    if lw is not None:
        flat = df[df["region"] != ALL_REGIONS]
        summary["lesionwise"] = lesionwise_summary(lw, flat, region_names)
        summary["lesionwise"]["lesion_counts"] = {
            tr: lesionwise_summary(lw, flat[flat["trainer"] == tr], region_names)["lesion_counts"]
            for tr in trainers}
        notes.append(lesionwise_note(summary["lesionwise"], with_counts=False))
    table = compare_table(stats, paired, trainers, baseline, shown_regions, folds, name, conv, metrics, notes)
    uq = uncertainty_quality_of(folders, trainers, regions, ignore_label, uncertainty_margin)
    if uq is not None:
        summary["uncertainty_quality"] = uncertainty_summary(uq)
        table += "\n" + uncertainty_table(uq, stats, region_names)
        write_text_atomic(out / "uncertainty_quality.csv",
                          uncertainty_frame(uq).to_csv(index=False, float_format="%.6g"))

    write_text_atomic(out / "per_case.csv", df.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(out / "paired.csv", paired.to_csv(index=False, float_format="%.6g"))
    if lw is not None:
        per_lesion = lesions_to_frame(lesion_rows, regions, extra_columns=("trainer", "fold"))
        write_text_atomic(out / "per_lesion.csv", per_lesion.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(out / "summary.json", to_json(summary) + "\n")
    write_text_atomic(out / "table.md", table)
    result = CompareResult(per_case=df, paired=paired, summary=summary, table=table, output_dir=out)

    if plots:
        figs = out / "figures"
        for metric, label in metrics:
            result.figures.append(box_plot(df, trainers, region_names, metric, label, figs / f"box_{metric}.png"))
        if uq is not None and uq["quality"]:
            from .uncertainty_quality import reliability_diagram
            curves = {tr: {r: q.calibration for r, q in per_region.items() if q.calibration is not None}
                      for tr, per_region in uq["quality"].items()}
            result.figures.append(reliability_diagram(curves, figs / "reliability.png",
                                                      "fused probabilities against the reference, inside the margin"))
        chosen = list(cases) if cases is not None else choose_cases(df, trainers, baseline, region_names[0],
                                                                     n_cases)
        images_dir = _env_dir("nnUNet_raw", images_dir, name, "imagesTr") if chosen else None
        for case in chosen:
            preds = {}
            for tr in trainers:
                for f in folds:
                    vf, matched = folders[(tr, f)]
                    hit = [p for c, p, _ in matched if c == case]
                    if hit:
                        unc = vf / UNCERTAINTY_DIR / f"{case}{file_ending}"
                        preds[tr] = (hit[0], unc if unc.is_file() else None)
                        break
            ref = reference_dir / f"{case}{file_ending}"
            result.figures.append(case_figure(case, ref, preds, baseline, regions, dj, Path(images_dir),
                                              file_ending, figs / f"case_{_safe(case)}.png"))
    return result


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _summaries(df, trainers, regions) -> dict:
    """{trainer: {region: {metric: {"cases": describe over all cases, "folds": describe of per-fold means}}}}."""
    out = {}
    for tr in trainers:
        out[tr] = {}
        for reg in regions:
            sub = df[(df["trainer"] == tr) & (df["region"] == reg)]
            out[tr][reg] = {}
            for m in metric_columns(df):
                fold_means = [describe(g[m])["mean"] for _, g in sub.groupby("fold", sort=True)]
                out[tr][reg][m] = {"cases": describe(sub[m]), "folds": describe(fold_means)}
    return out


def paired_differences(df, trainers, baseline, regions, metrics=tuple(m for m, _ in COMPARE_METRICS)):
    """Per trainer ≠ baseline, region and metric: the per-case differences trainer − baseline on the cases both
    evaluated (same fold and case; NaN pairs dropped), their mean/std/median, n, and the two-sided Wilcoxon
    signed-rank p-value (scipy.stats.wilcoxon; zero differences dropped as in Wilcoxon's original method; p = 1 when
    all differences are zero, NaN when there is no pair)."""
    import pandas as pd
    from scipy.stats import wilcoxon
    records = []
    base = df[df["trainer"] == baseline]
    for tr in trainers:
        if tr == baseline:
            continue
        other = df[df["trainer"] == tr]
        merged = other.merge(base, on=["fold", "case", "region"], suffixes=("", "_base"))
        for reg in regions:
            sub = merged[merged["region"] == reg]
            for m in metrics:
                d = (sub[m] - sub[f"{m}_base"]).to_numpy(dtype=np.float64)
                d = d[np.isfinite(d)]
                st = describe(d)
                if d.size == 0:
                    p = float("nan")
                elif np.all(d == 0):
                    p = 1.0
                else:
                    p = float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
                records.append({"trainer": tr, "baseline": baseline, "region": reg, "metric": m,
                                "mean_diff": st["mean"], "std_diff": st["std"], "median_diff": st["median"],
                                "n": st["n"], "wilcoxon_p": p})
    return pd.DataFrame(records, columns=["trainer", "baseline", "region", "metric", "mean_diff", "std_diff",
                                          "median_diff", "n", "wilcoxon_p"])


def _fmt_p(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_diff(mean, sd, metric) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    k = 100.0 if metric in PERCENT_METRICS else 1.0
    s = f"{mean * k:+.2f}"
    if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        s += f" ± {sd * k:.2f}"
    return s


def compare_table(stats, paired, trainers, baseline, regions, folds, dataset_name, conv,
                  metrics=COMPARE_METRICS, notes: Sequence[str] = ()) -> str:
    head = "| Method | " + " | ".join(lbl for _, lbl in metrics) + " | n |"
    sep = "|" + "---|" * (len(metrics) + 2)
    lines = [f"# {dataset_name}: {', '.join(trainers)} (folds {', '.join(folds)})", ""]
    for reg in regions:
        lines += [f"## {reg}", "", "Mean ± std over cases (all folds pooled):", "", head, sep]
        for tr in trainers:
            s = stats[tr][reg]
            n = s["dice"]["cases"]["n"]
            lines.append(f"| {tr} | " + " | ".join(fmt(s[m]["cases"], m) for m, _ in metrics) + f" | {n} |")
        lines += ["", "Mean ± std over folds (of the per-fold means):", "", head.replace(" n |", " folds |"), sep]
        for tr in trainers:
            s = stats[tr][reg]
            lines.append(f"| {tr} | " + " | ".join(fmt(s[m]["folds"], m) for m, _ in metrics)
                         + f" | {s['dice']['folds']['n']} |")
        lines.append("")
    if len(trainers) > 1:
        lines += [f"## Paired per-case differences against {baseline}", "",
                  "Method − baseline on the same fold and case: mean ± std of the differences, and the two-sided "
                  "Wilcoxon signed-rank p-value.", "",
                  "| Method − baseline | Region | " + " | ".join(f"Δ{lbl} | p" for _, lbl in metrics)
                  + " | n |", "|" + "---|" * (2 * len(metrics) + 3)]
        for tr in trainers:
            if tr == baseline:
                continue
            for reg in regions:
                cells, n = [], 0
                for m, _ in metrics:
                    row = paired[(paired["trainer"] == tr) & (paired["region"] == reg) & (paired["metric"] == m)]
                    r = row.iloc[0]
                    cells += [_fmt_diff(r["mean_diff"], r["std_diff"], m), _fmt_p(r["wilcoxon_p"])]
                    n = max(n, int(r["n"]))
                lines.append(f"| {tr} − {baseline} | {reg} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
    lines += ["Notes:", *[f"- {n}" for n in table_notes(conv)], *[f"- {n}" for n in notes],
              f"- '{ALL_REGIONS}': per case the mean over the regions, then summarised."]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------------
# uncertainty quality (issue 34)


def uncertainty_quality_of(folders: dict, trainers: Sequence[str], regions, ignore_label: int | None,
                           margin: float | None = DEFAULT_MARGIN) -> dict | None:
    """The uncertainty quality of every trainer whose compared folders (``folders``: {(trainer, fold): (folder,
    [(case, prediction, reference)])}) hold nnU-Net's fused probabilities ``<case>.npz`` for every case: the entropy
    of those probabilities (:func:`.uncertainty_quality.entropy_map`, what ``nndiff predict --uncertainty`` writes)
    against the errors of the segmentation beside them, inside ``margin`` (:func:`.uncertainty_quality.pooled_quality`
    over all its folds' cases). None when no folder holds any ``.npz`` (the comparison is then what it was without
    them). Returns {"margin", "quality": {trainer: {region: RegionQuality}}, "not_measured": {trainer: why}}."""
    from .uncertainty_quality import case_voxels_from_files, pooled_quality
    if not any(next(vf.glob("*.npz"), None) is not None for vf, _ in folders.values()):
        return None
    quality, not_measured = {}, {}
    for tr in trainers:
        items = [(vf / f"{c}.npz", p, r) for (t, _), (vf, matched) in folders.items() if t == tr
                 for c, p, r in matched]
        missing = [str(npz) for npz, _, _ in items if not npz.is_file()]
        if missing:
            not_measured[tr] = (f"{len(missing)} of {len(items)} cases have no probabilities (.npz), e.g. "
                                f"{missing[0]}: validate with --npz, or predict with --save_probabilities")
            continue
        per_case = [case_voxels_from_files(p, r, npz, regions, margin, ignore_label) for npz, p, r in items]
        quality[tr] = pooled_quality(per_case)
    return {"margin": margin, "quality": quality, "not_measured": not_measured}


UNCERTAINTY_MAP = "entropy of the fused probabilities"


def uncertainty_summary(uq: dict) -> dict:
    """summary.json's ``uncertainty_quality``: the map, the margin, per trainer and region every measure (with the
    reliability table) and the trainers not measured with the reason."""
    return {"map": UNCERTAINTY_MAP, "margin_voxels": uq["margin"],
            "trainers": {tr: {r: q.as_dict() for r, q in per_region.items()} for tr, per_region in uq["quality"].items()},
            "not_measured": dict(uq["not_measured"])}


def uncertainty_frame(uq: dict):
    """uncertainty_quality.csv: one row per trainer and region (no reliability table)."""
    import pandas as pd
    rows = [{"trainer": tr, "region": r, **{k: v for k, v in q.as_dict().items() if k not in ("calibration", "notes")},
             "notes": "; ".join(q.notes)} for tr, per_region in uq["quality"].items() for r, q in per_region.items()]
    return pd.DataFrame(rows)


def _num(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def uncertainty_table(uq: dict, stats: dict, regions: Sequence[str]) -> str:
    """The uncertainty section of table.md: per region one row per measured trainer, its DSC (mean over cases, as in
    the tables above) beside the voxel AUROC, AURC (optimal), E-AURC, ECE, Brier and the case-level Spearman ρ; the
    trainers without probabilities and the definitions below."""
    margin = "every voxel" if uq["margin"] is None else f"within {uq['margin']:g} voxels of reference or prediction"
    lines = [f"## Uncertainty quality ({UNCERTAINTY_MAP}, {margin})", ""]
    head = ("| Method | DSC (%) | AUROC (errors) | AURC (optimal) | E-AURC | ECE | Brier | Spearman ρ (p) | cases | "
            "voxels (errors) |")
    for reg in regions:
        rows = [(tr, q[reg]) for tr, q in uq["quality"].items() if reg in q]
        if not rows:
            continue
        lines += [f"### {reg}", "", head, "|" + "---|" * 10]
        for tr, q in rows:
            dsc = stats.get(tr, {}).get(reg, {}).get("dice", {}).get("cases", {})
            rho = "–" if math.isnan(q.spearman_rho) else f"{q.spearman_rho:+.2f} ({_fmt_p(q.spearman_p)})"
            lines.append(f"| {tr} | {fmt(dsc, 'dice', std=False) if dsc else '–'} | {_num(q.auroc)} | "
                         f"{_num(q.aurc, 4)} ({_num(q.optimal_aurc, 4)}) | {_num(q.e_aurc, 4)} | {_num(q.ece)} | "
                         f"{_num(q.brier, 4)} | {rho} | {q.n_cases} | {q.n_voxels} ({q.n_errors}) |")
        lines.append("")
    notes = [f"{tr}: not measured: {why}" for tr, why in uq["not_measured"].items()]
    notes += [f"{tr}, {reg}: {n}" for tr, q in uq["quality"].items() for reg, rq in q.items() for n in rq.notes]
    lines += ["Uncertainty notes:",
              "- AUROC: how well the uncertainty separates the wrong voxels from the right ones (1 perfect, 0.5 chance); "
              "AURC: area under the risk-coverage curve, the voxels taken from the most certain (lower is better; the "
              "optimal AURC is the least any map reaches on those errors, E-AURC the excess); ECE (15 equal-width bins) "
              "and Brier: calibration of the fused probability of each region; Spearman ρ: the cases' mean "
              "uncertainty against their Dice (negative: the uncertain cases are the worse ones). All voxel measures "
              "pooled over the trainer's cases inside the margin.",
              *[f"- {n}" for n in notes]]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------------
# pictures


def _mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    from ..atomic import atomic_path
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib picks the format by the ending
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def box_plot(df, trainers, regions, metric: str, label: str, path: Path) -> Path:
    """One panel per region, one box per trainer (all cases of all folds), points overlaid."""
    plt = _mpl()
    k = 100.0 if "%" in label else 1.0
    fig, axes = plt.subplots(1, len(regions), figsize=(max(3.2, 1.1 * len(trainers) + 1.5) * len(regions), 3.8),
                             squeeze=False)
    for ax, reg in zip(axes[0], regions):
        data = []
        for tr in trainers:
            v = df[(df["trainer"] == tr) & (df["region"] == reg)][metric].to_numpy(dtype=np.float64) * k
            data.append(v[np.isfinite(v)])
        ax.boxplot(data, showmeans=True)
        for i, v in enumerate(data, start=1):
            jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.zeros(len(v))
            ax.scatter(np.full(len(v), i) + jitter, v, s=10, alpha=0.6, color=_SOURCE_COLOURS[(i - 1) % 7],
                       zorder=3)
        ax.set_xticks(range(1, len(trainers) + 1))
        ax.set_xticklabels(trainers, rotation=20, ha="right", fontsize=8)
        ax.set_title(reg)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{label} per case")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def choose_cases(df, trainers, baseline, region: str, n: int) -> list[str]:
    """The n cases whose Dice in ``region`` changed most (|Δ|) from the baseline to the first other trainer; with
    one trainer, its n worst cases."""
    if n <= 0:
        return []
    base = df[(df["trainer"] == baseline) & (df["region"] == region)]
    others = [t for t in trainers if t != baseline]
    if not others:
        return list(base.sort_values("dice")["case"].drop_duplicates()[:n])
    other = df[(df["trainer"] == others[0]) & (df["region"] == region)]
    m = other.merge(base, on=["fold", "case"], suffixes=("", "_base"))
    m = m.assign(change=(m["dice"] - m["dice_base"]).abs()).sort_values(["change", "case"],
                                                                           ascending=[False, True])
    return list(m["case"].drop_duplicates()[:n])


def _norm_channel(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def pick_channels(dataset_json: dict) -> list[tuple[int, str]]:
    """[(channel index, name)]: FLAIR and T1ce (T1Gd, T1c) when dataset.json names them, else channel 0."""
    names = {int(k): v for k, v in (dataset_json.get("channel_names") or dataset_json.get("modality") or {}).items()}
    picked = []
    for wanted in (("flair",), ("t1ce", "t1gd", "t1c", "t1contrast", "t1post")):
        for i, v in sorted(names.items()):
            if _norm_channel(v) in wanted:
                picked.append((i, v))
                break
    return picked or [(0, names.get(0, "channel 0"))]


def _slice(volume: np.ndarray, view: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=view)


def _wrap_name(name: str, width: int = 22) -> str:
    """A trainer name broken at its underscores into lines of at most ``width`` characters (panel titles)."""
    lines, cur = [], ""
    for part in name.split("_"):
        piece = part if not cur else "_" + part
        if cur and len(cur) + len(piece) > width:
            lines.append(cur)
            cur = "_" + part
        else:
            cur += piece
    return "\n".join(lines + [cur])


ERROR_COLOURS = {1: ("#ff00ff", "false positive"), 2: ("#2f6bff", "false negative"),
                 3: ("#00b050", "false positive in one region, negative in another")}
"""The error panels' colours (uncertainty_quality.fp_fn_map's codes): magenta, blue and green, none a region's
outline colour. Code 3 occurs only in label datasets (one class predicted for another)."""


def _error_overlay(codes: np.ndarray) -> np.ndarray:
    """An RGBA image of ``fp_fn_map`` codes: each error code in its ERROR_COLOURS colour, right voxels transparent."""
    from matplotlib.colors import to_rgba
    rgba = np.zeros(codes.shape + (4,), np.float32)
    for code, (colour, _) in ERROR_COLOURS.items():
        rgba[codes == code] = to_rgba(colour)
    return rgba


def draw_case_figure(case: str, reference: Path, predictions: dict, baseline: str, regions, dataset_json: dict,
                     images_dir: Path, file_ending: str):
    """The matplotlib figure of :func:`case_figure` (the caller saves and closes it)."""
    import SimpleITK as sitk
    plt = _mpl()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from .uncertainty_quality import fp_fn_map

    def read(p):
        img = sitk.ReadImage(str(p))
        return sitk.GetArrayFromImage(img), img.GetSpacing()[::-1]

    ref, spacing = read(reference)
    others = [t for t in predictions if t != baseline]
    order = ([baseline] if baseline in predictions else []) + others
    segs = {"reference": ref, **{tr: read(predictions[tr][0])[0] for tr in order}}
    uncert = {tr: read(predictions[tr][1])[0].astype(np.float32) for tr in order if predictions[tr][1] is not None}
    errors = {tr: fp_fn_map(ref, segs[tr], regions) for tr in order} if uncert else {}
    image = None
    for ch, label in pick_channels(dataset_json):
        f = images_dir / f"{case}_{ch:04d}{file_ending}"
        if f.is_file():
            image = (label, read(f)[0].astype(np.float32))
            break
    if image is None:  # no raw image found: draw the outlines on the reference label map itself
        image = ("reference labels (image not found)", ref.astype(np.float32))

    fg = ref > 0
    if not fg.any():
        fg = np.any([s > 0 for s in segs.values()], axis=0)
    centre = (np.round(np.argwhere(fg).mean(axis=0)).astype(int) if fg.any()
              else np.array(ref.shape) // 2)
    views = (("axial", 0), ("coronal", 1), ("sagittal", 2))
    aspects = {0: spacing[1] / spacing[2], 1: spacing[0] / spacing[2], 2: spacing[0] / spacing[1]}
    region_colours = {name: _REGION_COLOURS[k % len(_REGION_COLOURS)] for k, (name, _) in enumerate(regions)}

    columns = list(segs)
    n_rows = len(views) * (3 if uncert else 1)
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(1.9 * len(columns) + 0.6, 1.9 * n_rows + 1.0),
                             squeeze=False)
    label, img = image
    lo, hi = np.percentile(img, (1, 99.5))
    for row, (vname, axis) in enumerate(views):
        origin = "upper" if axis == 0 else "lower"
        plane = _slice(img, axis, centre[axis])
        for col, src in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin=origin,
                      aspect=aspects[axis], interpolation="nearest")
            for name, region in regions:
                mask = region_mask(_slice(segs[src], axis, centre[axis]), region)
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[region_colours[name]], linewidths=1.0,
                               origin=origin)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_wrap_name(src), fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{vname} {centre[axis]}", fontsize=8)
    first_region = regions[0][1]
    error_codes = set()
    # per view, the error map right above the uncertainty map of the same slice
    for v, (vname, axis) in enumerate(views if uncert else ()):
        origin = "upper" if axis == 0 else "lower"
        err_row, unc_row = len(views) + 2 * v, len(views) + 2 * v + 1
        plane = _slice(img, axis, centre[axis])
        for col, src in enumerate(columns):
            for row in (err_row, unc_row):
                axes[row][col].set_xticks([])
                axes[row][col].set_yticks([])
            if col == 0:
                axes[err_row][col].set_ylabel(f"errors\n{vname}", fontsize=8)
                axes[unc_row][col].set_ylabel(f"uncertainty\n{vname}", fontsize=8)
            if src in errors:
                ax = axes[err_row][col]
                codes = _slice(errors[src], axis, centre[axis])
                error_codes.update(int(c) for c in np.unique(codes) if c)
                ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin=origin,
                          aspect=aspects[axis], interpolation="nearest", alpha=0.6)
                ax.imshow(_error_overlay(codes), origin=origin, aspect=aspects[axis], interpolation="nearest")
            else:  # the reference has no errors: an empty panel (the first column keeps its row label)
                axes[err_row][col].set_frame_on(False)
            if src not in uncert:
                axes[unc_row][col].set_frame_on(False)
                continue
            ax = axes[unc_row][col]
            u = uncert[src]
            finite = u[np.isfinite(u)]
            vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            ax.imshow(_slice(u, axis, centre[axis]), cmap="magma", origin=origin, aspect=aspects[axis],
                      interpolation="nearest", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
            mask = region_mask(_slice(ref, axis, centre[axis]), first_region)
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=["#ffffff"], linewidths=0.8, origin=origin)
    handles = [Line2D([], [], color=c, lw=2, label=name) for name, c in region_colours.items()]
    if uncert:  # false positives and negatives always listed; the mixed code only where it is drawn
        handles += [Patch(facecolor=ERROR_COLOURS[c][0], edgecolor="0.3", label=ERROR_COLOURS[c][1])
                    for c in (1, 2, 3) if c < 3 or c in error_codes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"case {case}: {label}, the same slices in every panel", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if not uncert else 0.03, 1, 0.96 if not uncert else 0.975))
    return fig


def case_figure(case: str, reference: Path, predictions: dict, baseline: str, regions, dataset_json: dict,
                images_dir: Path, file_ending: str, path: Path) -> Path:
    """Small multiples of one case, written to ``path`` (PNG): a column per segmentation (the reference first, then
    the baseline, then every other trainer), a row per view (axial / coronal / sagittal through the tumour's centre
    of mass), the same slice of the same image channel in every panel, each region's outline in its own colour
    (the same in every panel). When some trainer wrote an uncertainty map, every view gets two more rows, on the
    same slice: the error map of every trainer (against the reference, over all regions: false positives magenta,
    false negatives blue, see ``uncertainty_quality.fp_fn_map``), and right below it the uncertainty map of the
    trainers that wrote one (the reference's outline of the first region on top, for orientation); the legend lists
    the error colours. Without any uncertainty map the figure is the three rows alone. ``predictions``: {trainer:
    (prediction file, uncertainty file or None)}."""
    plt = _mpl()
    fig = draw_case_figure(case, reference, predictions, baseline, regions, dataset_json, images_dir, file_ending)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
