"""Evaluate a folder of predicted label maps against a folder of references, per case and per region.

``evaluate_folder(pred_dir, ref_dir, output_dir, dataset=ID)`` (or ``nndiff evaluate PRED REF -d ID -o OUT``)
writes into ``output_dir``:

* ``per_case.csv`` — one row per case and region: case, region, dice, iou (the region's own IoU), miou (DDMD's
  mIoU: the mean of the region's and the background's IoU), hd95, vs, pa, sensitivity, specificity, volume_pred,
  volume_ref (volumes in mm³, HD95 in mm with the images' spacing);
* ``summary.json`` — mean, std (sample, ddof = 1), median and count per region and metric, plus a
  "mean over regions" entry (per case the mean over regions, then summarised), and the conventions used;
* ``table.md`` — a Markdown table shaped like the papers' (DSC %, HD95 mm, VS %, IoU %, mIoU %, PA %, …);
* with lesion-wise evaluation (on by default for BraTS region datasets, ``lesionwise=True/False`` to choose):
  per_case.csv and summary.json also carry lesionwise_dice, lesionwise_hd95, n_ref_lesions, lesion_tp,
  lesion_fn, lesion_fp per case and region, table.md the lesion-wise means (LW DSC, LW HD95) beside the
  whole-region ones, and ``per_lesion.csv`` has one row per lesion (rules and conventions:
  :mod:`nnunet_diffusion.evaluation.lesionwise`).

Regions and labels come from the dataset's ``dataset.json`` exactly as nnU-Net reads them
(``LabelManager``): a label whose value is a list is a region (BraTS: whole tumour (1, 2, 3), tumour core (2, 3),
enhancing (3)), and a voxel belongs to a region when its label is in the region's tuple; datasets without regions
are evaluated per foreground label. ``nndiff convert-brats`` writes the label groups each BraTS edition is scored
on as regions: for the 2024/2025 cluster the groups of brats-evaluation's config (post-treatment glioma: ET, NETC,
SNFH, RC, TC, WT; paediatric: ET, NETC, CC, ED, TC, WT; ...), which are then the regions evaluated here, and the
lesion-wise rule defaults to the one dataset.json names (``brats_lesionwise_convention``: "panoptica", the
evaluator's own, for that cluster; else "brats2023").
Voxels of an ignore label in the reference are left out. A label map with
a value that dataset.json does not define, or prediction and reference of different geometry, stop the evaluation
with a one-line message naming the case and the files.
Metric definitions and empty-mask conventions: :mod:`nnunet_diffusion.evaluation.metrics`.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..atomic import write_text_atomic
from ..errors import NNDiffError
from .lesionwise import (BRATS2023_COHORTS, DEFAULT_LESIONWISE_CONVENTION, LESIONWISE_METRICS, PER_LESION_COLUMNS,
                         lesionwise_case, lesionwise_rule)
from .metrics import BRATS_EMPTY_HD95, EMPTY_MASK_CONVENTIONS, HD95_MODES, METRIC_NAMES, mask_metrics, region_mask

UNCERTAINTY_DIR = "uncertainty"
"""``nndiff predict --uncertainty`` writes a case's uncertainty map to ``<prediction folder>/uncertainty/<case>
<file_ending>`` (see nnunet_diffusion/inference/uncertainty.py): a subfolder, so listing predictions never
picks it up."""

PERCENT_METRICS = ("dice", "iou", "miou", "vs", "pa", "sensitivity", "specificity", "lesionwise_dice")
TABLE_COLUMNS = (("dice", "DSC (%)"), ("hd95", "HD95 (mm)"), ("vs", "VS (%)"), ("iou", "IoU (%)"),
                 ("miou", "mIoU (%)"), ("pa", "PA (%)"), ("sensitivity", "Sensitivity (%)"),
                 ("specificity", "Specificity (%)"))
LESIONWISE_TABLE_COLUMNS = (("lesionwise_dice", "LW DSC (%)"), ("lesionwise_hd95", "LW HD95 (mm)"))
"""Shown right after DSC and HD95 when the evaluation is lesion-wise."""
ALL_REGIONS = "mean over regions"
BRATS_REGION_ABBREVIATIONS = {"whole tumor": "WT", "tumor core": "TC", "enhancing tumor": "ET",
                              "non-enhancing tumor core": "NETC",
                              "surrounding non-enhancing FLAIR hyperintensity": "SNFH", "resection cavity": "RC",
                              "cystic component": "CC", "edema": "ED", "gross tumor volume": "GTV"}


def short_region(name: str) -> str:
    """WT / TC / ET (NETC, SNFH, RC, CC, ED, GTV) for nndiff convert-brats' region names (table columns); any other
    name unchanged."""
    return BRATS_REGION_ABBREVIATIONS.get(name, name)


class EvaluationError(NNDiffError, ValueError):
    """Evaluation inputs are missing or inconsistent (files, cases, geometry, dataset)."""


# --------------------------------------------------------------------------------------------------------------
# dataset.json: regions and labels


def unknown_dataset_message(dataset, error: Exception) -> str:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    if "more than one" in str(error).lower():
        return f"dataset id {dataset} is ambiguous: {str(error).splitlines()[0]}"
    where = ", ".join(f"{v.env_var_name}={v.get()}" for v in (nnUNet_raw, nnUNet_preprocessed, nnUNet_results))
    return (f"unknown dataset {dataset}: no Dataset{str(dataset).zfill(3)}_* folder found ({where})"
            if str(dataset).isdigit() else f"unknown dataset {dataset}: {str(error).splitlines()[0]}")


def find_dataset_json(dataset: int | str) -> Path:
    """dataset.json of an nnU-Net dataset given by id or name, from nnUNet_raw, nnUNet_preprocessed or
    nnUNet_results (first found)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise EvaluationError(unknown_dataset_message(dataset, e)) from None
    candidates = []
    for root in (nnUNet_raw, nnUNet_preprocessed):
        if root.is_set():
            candidates.append(Path(root.get()) / name / "dataset.json")
    if nnUNet_results.is_set():
        candidates += sorted((Path(nnUNet_results.get()) / name).glob("*/dataset.json"))
    for c in candidates:
        if c.is_file():
            return c
    raise EvaluationError(f"dataset {name} has no dataset.json in {', '.join(str(c) for c in candidates) or '-'}")


def load_dataset_json(dataset: int | str | None = None, dataset_json: str | os.PathLike | dict | None = None
                      ) -> tuple[dict, str]:
    """(dataset.json content, where it came from) from a dataset id/name or a dataset.json path (or dict)."""
    if isinstance(dataset_json, dict):
        return dataset_json, "<dict>"
    if dataset_json is not None:
        path = Path(dataset_json)
        if path.is_dir():
            path = path / "dataset.json"
        if not path.is_file():
            raise EvaluationError(f"dataset.json not found: {path}")
    elif dataset is not None:
        path = find_dataset_json(dataset)
    else:
        raise EvaluationError("say which labels/regions to evaluate: give a dataset id (-d ID) or --dataset-json")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON: {e}") from None


def regions_from_dataset_json(dataset_json: dict) -> tuple[list[tuple[str, int | tuple[int, ...]]], int | None]:
    """([(name, label or region tuple), ...], ignore label) as nnU-Net's LabelManager defines them."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise EvaluationError("dataset.json has no 'labels' dictionary")
    try:
        lm = LabelManager(labels, dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError) as e:
        raise EvaluationError(f"dataset.json labels are not usable by nnU-Net: {e}") from None

    def norm(v):
        return tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else int(v)

    names = {}
    for k, v in labels.items():
        if k in ("background", "ignore"):
            continue
        names.setdefault(norm(v), k)
        if isinstance(v, (list, tuple)) and len(v) == 1:
            names.setdefault(int(v[0]), k)
    items = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    out = []
    for r in items:
        key = norm(r)
        out.append((names.get(key, str(key)), key))
    return out, lm.ignore_label


def dataset_labels(dataset_json: dict) -> set[int]:
    """Every label value dataset.json defines (background, foreground labels, region members, ignore): what a
    label map of the dataset may contain."""
    values: set[int] = set()
    for v in (dataset_json.get("labels") or {}).values():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            values.add(int(x))
    return values


_BRATS_REGION_NAMES = {"wholetumor", "tumorcore", "enhancingtumor", "wt", "tc", "et"}


def is_brats_region_dataset(dataset_json: dict) -> bool:
    """True for a dataset written by ``nndiff convert-brats`` ("brats_edition" in dataset.json; a one-label edition
    such as MEN-RT has no list-valued regions) and for a BraTS dataset with nnU-Net regions: dataset.json has
    regions (labels given as lists) and either has "brats" in its name or names its regions whole tumor / tumor
    core / enhancing tumor."""
    if "brats_edition" in dataset_json:
        return True
    labels = dataset_json.get("labels") or {}
    regions = [k for k, v in labels.items() if isinstance(v, (list, tuple)) and k not in ("background", "ignore")]
    if not regions:
        return False
    if "brats" in str(dataset_json.get("name", "")).lower():
        return True
    return {"".join(ch for ch in k.lower() if ch.isalnum()) for k in regions} <= _BRATS_REGION_NAMES


def brats_cohort(dataset_json: dict) -> str | None:
    """The BraTS 2023 cohort (GLI, SSA, PED, MEN, MET) whose lesion-wise parameters apply: the cohort part of
    dataset.json's "brats_edition" ("2023-met" → MET, "2024-gli" → GLI); GLI (the adult glioma rule, also used for
    the BraTS 2020/2021 data) when the edition names no cohort or there is none; None when it names a cohort the
    2023 rule has no parameters for (MEN-RT, GoAT)."""
    edition = str(dataset_json.get("brats_edition", ""))
    if "-" not in edition:
        return "GLI"
    cohort = edition.split("-", 1)[1].upper()
    return cohort if cohort in BRATS2023_COHORTS else None


def default_lesionwise_convention(dataset_json: dict) -> str:
    """The lesion-wise convention dataset.json asks for ("brats_lesionwise_convention", written by ``nndiff
    convert-brats`` for the editions brats-evaluation scores: "panoptica"), else :data:`.lesionwise.
    DEFAULT_LESIONWISE_CONVENTION`."""
    return str(dataset_json.get("brats_lesionwise_convention", DEFAULT_LESIONWISE_CONVENTION))


# --------------------------------------------------------------------------------------------------------------
# files and cases


def list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    """{case: file} of the label maps in ``folder`` (files only: the uncertainty/ subfolder is not listed)."""
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(file_ending)}


def _few(names: Iterable[str], k: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def match_cases(pred_dir: Path, ref_dir: Path, file_ending: str, only_predicted: bool = False,
                cases: Sequence[str] | None = None) -> list[tuple[str, Path, Path]]:
    """[(case, prediction, reference)]; explains missing folders and unmatched cases."""
    for what, d in (("prediction", pred_dir), ("reference", ref_dir)):
        if not d.is_dir():
            raise EvaluationError(f"{what} folder does not exist: {d}")
    preds = list_cases(pred_dir, file_ending)
    refs = list_cases(ref_dir, file_ending)
    if cases is not None:
        wanted = set(cases)
        missing = wanted - set(preds)
        if missing:
            raise EvaluationError(f"no prediction for case(s) {_few(missing)} in {pred_dir}")
        preds = {c: p for c, p in preds.items() if c in wanted}
        only_predicted = True
    if not preds:
        raise EvaluationError(f"no prediction files (*{file_ending}) in {pred_dir}")
    no_ref = set(preds) - set(refs)
    if no_ref:
        raise EvaluationError(f"{len(no_ref)} prediction(s) without a reference in {ref_dir}: {_few(no_ref)}")
    no_pred = set(refs) - set(preds)
    if no_pred and not only_predicted:
        raise EvaluationError(f"{len(no_pred)} reference(s) without a prediction in {pred_dir}: {_few(no_pred)} "
                              f"(pass --only-predicted / only_predicted=True to evaluate just the predicted cases)")
    return [(c, preds[c], refs[c]) for c in sorted(preds)]


def _read(path: Path):
    import SimpleITK as sitk
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise EvaluationError(f"cannot read {path}: {str(e).strip().splitlines()[-1]}") from None


def _check_geometry(case: str, pred, ref, pred_path=None, ref_path=None) -> None:
    files = f" (prediction {pred_path}, reference {ref_path})" if pred_path is not None else ""
    if pred.GetSize() != ref.GetSize():
        raise EvaluationError(f"geometry mismatch in case {case}: prediction size {pred.GetSize()} vs reference "
                              f"size {ref.GetSize()} (x, y, z){files}")
    checks = (("spacing", pred.GetSpacing(), ref.GetSpacing(), 1e-4),
              ("origin", pred.GetOrigin(), ref.GetOrigin(), 1e-3),
              ("direction", pred.GetDirection(), ref.GetDirection(), 1e-4))
    for what, a, b, tol in checks:
        a, b = np.asarray(a, float), np.asarray(b, float)
        scale = np.maximum(1.0, np.abs(b)) if what == "spacing" else 1.0
        if a.shape != b.shape or np.any(np.abs(a - b) > tol * scale):
            raise EvaluationError(f"geometry mismatch in case {case}: prediction {what} "
                                  f"{tuple(round(float(x), 6) for x in a)} vs reference "
                                  f"{tuple(round(float(x), 6) for x in b)}{files}")


def _check_labels(case: str, what: str, path, array: np.ndarray, allowed: set[int]) -> None:
    present = np.unique(array)
    bad = sorted(int(v) for v in present if int(v) not in allowed or v != int(v))
    if bad:
        raise EvaluationError(f"case {case}: the {what} {path} has label(s) {', '.join(map(str, bad))} that "
                              f"dataset.json does not define (its labels: {', '.join(map(str, sorted(allowed)))})")


def evaluate_case_lesions(case: str, pred_path, ref_path, regions: Sequence[tuple[str, int | tuple[int, ...]]],
                          ignore_label: int | None = None, hd95_mode: str = "brats",
                          empty_hd95: float = BRATS_EMPTY_HD95, lesionwise: tuple[str, str] | None = None,
                          labels: set[int] | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, lesion rows) for one case: both files read with SimpleITK, geometry checked, label values checked
    against ``labels`` (dataset.json's, when given), spacing taken from the reference (SimpleITK's (x, y, z)
    spacing, reversed to the array's (z, y, x) order). Rows are (case, region, metrics...); with ``lesionwise`` =
    (convention, cohort) they also carry the lesion-wise metrics and the lesion rows are filled
    (:func:`.lesionwise.lesionwise_case`)."""
    import SimpleITK as sitk
    pred_img, ref_img = _read(Path(pred_path)), _read(Path(ref_path))
    _check_geometry(case, pred_img, ref_img, pred_path, ref_path)
    pred = sitk.GetArrayViewFromImage(pred_img)
    ref = sitk.GetArrayViewFromImage(ref_img)
    if pred.ndim != ref.ndim or pred.shape != ref.shape:
        raise EvaluationError(f"geometry mismatch in case {case}: array shapes {pred.shape} vs {ref.shape} "
                              f"(prediction {pred_path}, reference {ref_path})")
    if labels is not None:
        _check_labels(case, "prediction", pred_path, pred, labels)
        _check_labels(case, "reference", ref_path, ref, labels)
    spacing = tuple(float(s) for s in ref_img.GetSpacing())[::-1]
    ignore = (ref == ignore_label) if ignore_label is not None else None
    rows = []
    for name, region in regions:
        m = mask_metrics(region_mask(pred, region), region_mask(ref, region), spacing, ignore=ignore,
                         hd95_mode=hd95_mode, empty_hd95=empty_hd95)
        rows.append({"case": case, "region": name, **m})
    lesion_rows: list[dict] = []
    if lesionwise is not None:
        convention, cohort = lesionwise
        lw_rows, lesion_rows = lesionwise_case(case, pred, ref, regions, spacing, convention, cohort, hd95_mode,
                                               ignore)
        for row, lw in zip(rows, lw_rows):
            row.update({k: lw[k] for k in LESIONWISE_METRICS})
    return rows, lesion_rows


def evaluate_case(case: str, pred_path, ref_path, regions: Sequence[tuple[str, int | tuple[int, ...]]],
                  ignore_label: int | None = None, hd95_mode: str = "brats",
                  empty_hd95: float = BRATS_EMPTY_HD95, lesionwise: tuple[str, str] | None = None,
                  labels: set[int] | None = None) -> list[dict]:
    """Rows (case, region, metrics...) for one case (:func:`evaluate_case_lesions` without the lesion rows)."""
    return evaluate_case_lesions(case, pred_path, ref_path, regions, ignore_label, hd95_mode, empty_hd95,
                                 lesionwise, labels)[0]


def _evaluate_task(task):
    """A task is ``(tags, case, prediction, reference, regions, ignore_label, hd95_mode, empty_hd95[, options])``
    with ``options`` = {"lesionwise": (convention, cohort) or None, "labels": set or None}; returns (rows, lesion
    rows), both tagged."""
    tags, case, pred_path, ref_path, regions, ignore_label, hd95_mode, empty_hd95 = task[:8]
    options = task[8] if len(task) > 8 else {}
    rows, lesions = evaluate_case_lesions(case, pred_path, ref_path, regions, ignore_label, hd95_mode, empty_hd95,
                                          options.get("lesionwise"), options.get("labels"))
    return [{**tags, **row} for row in rows], [{**tags, **row} for row in lesions]


def _worker_init():
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def default_num_processes(n_tasks: int) -> int:
    from nnunetv2.configuration import default_num_processes as nnunet_default
    return max(1, min(int(nnunet_default), os.cpu_count() or 1, n_tasks))


def run_cases(tasks: list[tuple], num_processes: int | None, progress: bool, desc: str,
              lesion_rows: list | None = None) -> list[dict]:
    """Evaluate the case tasks ``(tags, case, prediction, reference, regions, ignore_label, hd95_mode,
    empty_hd95[, options])`` (see :func:`_evaluate_task`), in parallel worker processes when num_processes > 1,
    with a progress bar; returns all rows (each row carries its task's ``tags``) and appends the per-lesion rows
    to ``lesion_rows`` when given. Workers are spawned, as nnU-Net's own evaluation does: a script that calls this
    must guard its entry point with ``if __name__ == "__main__":``."""
    from tqdm import tqdm
    n = len(tasks)
    num_processes = default_num_processes(n) if num_processes is None else max(1, min(int(num_processes), n))
    rows: list[dict] = []
    lesions: list[dict] = []
    if num_processes == 1:
        for t in tqdm(tasks, desc=desc, disable=not progress, unit="case"):
            r, les = _evaluate_task(t)
            rows += r
            lesions += les
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(num_processes, initializer=_worker_init) as pool:
            for r, les in tqdm(pool.imap_unordered(_evaluate_task, tasks), total=n, desc=desc,
                               disable=not progress, unit="case"):
                rows += r
                lesions += les
    if lesion_rows is not None:
        lesion_rows += lesions
    return rows


# --------------------------------------------------------------------------------------------------------------
# summaries and tables


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _clean(x.item())
    return x


def describe(values) -> dict:
    """{mean, std (ddof=1), median, n, n_nan} of the finite values (NaN = undefined, skipped)."""
    v = np.asarray(list(values), dtype=np.float64)
    n_nan = int(np.count_nonzero(~np.isfinite(v)))
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0, "n_nan": n_nan}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            "median": float(np.median(v)), "n": int(v.size), "n_nan": n_nan}


def metric_columns(df) -> list[str]:
    """The metric columns of a per-case frame: METRIC_NAMES, then the lesion-wise ones when present."""
    return [*METRIC_NAMES, *(m for m in LESIONWISE_METRICS if m in df.columns)]


def per_case_region_mean(df):
    """Per case, the mean over regions of every metric (NaN skipped): the 'mean over regions' rows."""
    metrics = metric_columns(df)
    g = df.groupby([c for c in df.columns if c not in metrics and c != "region"], sort=True, dropna=False)
    out = g[metrics].mean().reset_index()
    out["region"] = ALL_REGIONS
    return out


def summarize(df, region_names: Sequence[str]) -> dict:
    """{region: {metric: describe(...)}} for every region and for the mean over regions."""
    metrics = metric_columns(df)
    out = {}
    for name in region_names:
        sub = df[df["region"] == name]
        out[name] = {m: describe(sub[m]) for m in metrics}
    if len(region_names) > 1:
        allr = per_case_region_mean(df[["case", "region", *metrics]])
        out[ALL_REGIONS] = {m: describe(allr[m]) for m in metrics}
    return out


def table_columns(stats: dict) -> tuple[tuple[str, str], ...]:
    """TABLE_COLUMNS, with LW DSC / LW HD95 after DSC and HD95 when the summary has lesion-wise metrics."""
    first = next(iter(stats.values()), {})
    if "lesionwise_dice" not in first:
        return TABLE_COLUMNS
    return (*TABLE_COLUMNS[:2], *LESIONWISE_TABLE_COLUMNS, *TABLE_COLUMNS[2:])


def fmt(stats: dict, metric: str, std: bool = True) -> str:
    """'mean ± std' of a describe() dict, in % for overlap metrics and mm for HD95."""
    mean, sd = stats.get("mean"), stats.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    k = 100.0 if metric in PERCENT_METRICS else 1.0
    s = f"{mean * k:.2f}"
    if std and sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        s += f" ± {sd * k:.2f}"
    return s


def conventions(hd95_mode: str, empty_hd95: float) -> dict:
    conv = {k: v.format(empty_hd95=empty_hd95) for k, v in EMPTY_MASK_CONVENTIONS.items()}
    conv["hd95"] = ("95th percentile of the pooled symmetric surface distances (brats-evaluation / panoptica)"
                    if hd95_mode == "brats" else
                    "max of the two directed 95th percentiles (monai.metrics.compute_hausdorff_distance)")
    conv["hd95"] += "; surface distances from monai.metrics.utils.get_edge_surface_distance with the image spacing"
    conv["std"] = "sample standard deviation (ddof = 1) over cases; NaN values (undefined) are skipped"
    return conv


def markdown_table(summary: dict, title: str, n_cases: int, notes: Sequence[str] = ()) -> str:
    columns = table_columns(summary)
    head = "| Region | " + " | ".join(c for _, c in columns) + " |"
    lines = [f"# {title}", "", f"{n_cases} cases; mean ± std over cases.", "", head,
             "|" + "---|" * (len(columns) + 1)]
    for region, stats in summary.items():
        lines.append(f"| {region} | " + " | ".join(fmt(stats[m], m) for m, _ in columns) + " |")
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines).rstrip() + "\n"


def to_json(obj) -> str:
    def walk(o):
        if isinstance(o, dict):
            return {str(k): walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return _clean(o)
    return json.dumps(walk(obj), indent=2, allow_nan=False)


# --------------------------------------------------------------------------------------------------------------
# the folder evaluation


@dataclass
class EvaluationResult:
    per_case: "object"  # pandas.DataFrame: one row per case and region
    summary: dict
    table: str
    output_dir: Path | None = None
    regions: list = field(default_factory=list)
    per_lesion: "object" = None  # pandas.DataFrame: one row per lesion (lesion-wise evaluation only)


def lesionwise_settings(dataset_json: dict, lesionwise: bool | None, convention: str | None, cohort: str | None
                        ) -> tuple[str, str] | None:
    """(convention, cohort) when the evaluation is lesion-wise, else None. ``lesionwise=None``: on for BraTS
    region datasets (:func:`is_brats_region_dataset`). ``convention=None``: :func:`default_lesionwise_convention`.
    ``cohort=None``: :func:`brats_cohort` (used by "brats2023" only)."""
    if lesionwise is None:
        lesionwise = is_brats_region_dataset(dataset_json)
    if not lesionwise:
        return None
    convention = default_lesionwise_convention(dataset_json) if convention is None else convention
    if cohort is None:
        cohort = brats_cohort(dataset_json)
        if cohort is None:
            if convention != "brats2023":
                cohort = "GLI"   # not used by the other conventions
            else:
                raise EvaluationError(
                    f"the BraTS 2023 lesion-wise rule has no parameters for edition "
                    f"{dataset_json.get('brats_edition')}: choose a cohort's (--lesionwise-cohort "
                    f"{'/'.join(BRATS2023_COHORTS)}) or --lesionwise-convention panoptica (brats-evaluation's rule)")
    try:
        rule = lesionwise_rule(convention, cohort)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    return rule.convention, str(cohort).upper().removeprefix("BRATS-")


def evaluate_folder(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike,
                    output_dir: str | os.PathLike | None = None, dataset: int | str | None = None,
                    dataset_json: str | os.PathLike | dict | None = None, num_processes: int | None = None,
                    hd95_mode: str = "brats", empty_hd95: float = BRATS_EMPTY_HD95, only_predicted: bool = False,
                    cases: Sequence[str] | None = None, progress: bool = True, title: str | None = None,
                    lesionwise: bool | None = None, lesionwise_convention: str | None = None,
                    lesionwise_cohort: str | None = None) -> EvaluationResult:
    """Evaluate every prediction in ``pred_dir`` against the same-named reference in ``ref_dir``.

    Regions/labels come from ``dataset`` (id or name; its dataset.json is looked up in nnUNet_raw,
    nnUNet_preprocessed or nnUNet_results) or from ``dataset_json`` (path or dict). Every prediction needs a
    reference and, unless ``only_predicted`` (or ``cases``) is given, every reference a prediction. When
    ``output_dir`` is given, per_case.csv, summary.json and table.md (and per_lesion.csv) are written there (each
    atomically). ``lesionwise`` (None: on for BraTS region datasets) adds the lesion-wise metrics of
    ``lesionwise_convention`` (one of :data:`.lesionwise.LESIONWISE_CONVENTIONS`; None: dataset.json's
    "brats_lesionwise_convention", else "brats2023") with the parameters of ``lesionwise_cohort`` (GLI, SSA, PED,
    MEN, MET; None: from dataset.json's edition, else GLI).
    """
    if hd95_mode not in HD95_MODES:
        raise EvaluationError(f"hd95 mode must be one of {', '.join(HD95_MODES)}; got {hd95_mode!r}")
    dj, dj_source = load_dataset_json(dataset, dataset_json)
    regions, ignore_label = regions_from_dataset_json(dj)
    lw = lesionwise_settings(dj, lesionwise, lesionwise_convention, lesionwise_cohort)
    file_ending = dj.get("file_ending", ".nii.gz")
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    matched = match_cases(pred_dir, ref_dir, file_ending, only_predicted=only_predicted, cases=cases)
    options = {"lesionwise": lw, "labels": dataset_labels(dj)}
    tasks = [({}, c, str(p), str(r), regions, ignore_label, hd95_mode, float(empty_hd95), options)
             for c, p, r in matched]
    lesion_rows: list[dict] = []
    rows = run_cases(tasks, num_processes, progress, desc=f"evaluate {pred_dir.name}", lesion_rows=lesion_rows)
    meta = {"prediction_folder": str(pred_dir), "reference_folder": str(ref_dir), "dataset_json": dj_source}
    return build_result(rows, regions, ignore_label, hd95_mode, empty_hd95, meta,
                        title or f"Evaluation of {pred_dir}", output_dir,
                        lesion_rows=lesion_rows if lw is not None else None, lesionwise=lw)


def rows_to_frame(rows: list[dict], regions, extra_columns: Sequence[str] = ()):
    """DataFrame of metric rows (lesion-wise columns when the rows have them), sorted by the extra columns, case
    and the dataset's region order."""
    import pandas as pd
    order = {name: i for i, (name, _) in enumerate(regions)}
    lw = [m for m in LESIONWISE_METRICS if rows and m in rows[0]]
    df = pd.DataFrame(rows, columns=[*extra_columns, "case", "region", *METRIC_NAMES, *lw])
    keys = [*extra_columns, "case", "region"]
    return df.sort_values(keys, key=lambda s: s.map(order) if s.name == "region" else s,
                          kind="stable").reset_index(drop=True)


def lesions_to_frame(lesion_rows: list[dict], regions, extra_columns: Sequence[str] = ()):
    """DataFrame of per-lesion rows (:data:`.lesionwise.PER_LESION_COLUMNS`), sorted like the per-case rows, then
    reference lesions before false-positive components, by lesion number."""
    import pandas as pd
    order = {name: i for i, (name, _) in enumerate(regions)}
    kind = {"reference": 0, "false_positive": 1}
    df = pd.DataFrame(lesion_rows, columns=[*extra_columns, *PER_LESION_COLUMNS])
    keys = [*extra_columns, "case", "region", "kind", "lesion"]
    return df.sort_values(keys, key=lambda s: (s.map(order) if s.name == "region" else s.map(kind)
                                               if s.name == "kind" else s), kind="stable").reset_index(drop=True)


def lesion_counts(df, region_names: Sequence[str]) -> dict:
    """{region: totals over cases of n_ref_lesions, lesion_tp, lesion_fn, lesion_fp}."""
    return {name: {m: int(df[df["region"] == name][m].sum()) for m in LESIONWISE_METRICS[2:]}
            for name in region_names}


def lesionwise_summary(lesionwise: tuple[str, str], df, region_names: Sequence[str]) -> dict:
    convention, cohort = lesionwise
    rule = lesionwise_rule(convention, cohort)
    out = {"convention": convention, "rule": rule.description, "lesion_counts": lesion_counts(df, region_names)}
    if convention == "brats2023":
        out = {"convention": convention, "cohort": cohort, "dilation_voxels": rule.dilation,
               "min_volume_mm3": rule.min_volume_mm3, **{k: v for k, v in out.items() if k != "convention"}}
    return out


def build_result(rows: list[dict], regions, ignore_label, hd95_mode: str, empty_hd95: float, meta: dict,
                 title: str, output_dir: str | os.PathLike | None, lesion_rows: list[dict] | None = None,
                 lesionwise: tuple[str, str] | None = None) -> EvaluationResult:
    """per-case table, summary and Markdown table of one folder's rows (and its per-lesion table when the
    evaluation is lesion-wise); written to output_dir if given."""
    df = rows_to_frame(rows, regions)
    region_names = [n for n, _ in regions]
    stats = summarize(df, region_names)
    n_cases = int(df["case"].nunique())
    conv = conventions(hd95_mode, empty_hd95)
    summary = {
        **meta, "n_cases": n_cases,
        "regions": {n: (list(r) if isinstance(r, tuple) else r) for n, r in regions},
        "ignore_label": ignore_label, "hd95_mode": hd95_mode, "empty_hd95_mm": float(empty_hd95),
        "conventions": conv, "metrics": stats,
    }
    notes = table_notes(conv)
    if lesionwise is not None:
        summary["lesionwise"] = lesionwise_summary(lesionwise, df, region_names)
        notes.append(lesionwise_note(summary["lesionwise"]))
    table = markdown_table(stats, title, n_cases, notes)
    result = EvaluationResult(per_case=df, summary=summary, table=table, regions=list(regions))
    if lesion_rows is not None:
        result.per_lesion = lesions_to_frame(lesion_rows, regions)
    if output_dir is not None:
        out = Path(output_dir)
        write_text_atomic(out / "per_case.csv", df.to_csv(index=False, float_format="%.6g"))
        if result.per_lesion is not None:
            write_text_atomic(out / "per_lesion.csv", result.per_lesion.to_csv(index=False, float_format="%.6g"))
        write_text_atomic(out / "summary.json", to_json(summary) + "\n")
        write_text_atomic(out / "table.md", table)
        result.output_dir = out
    return result


def lesionwise_note(lw: dict, with_counts: bool = True) -> str:
    """table.md's note on the lesion-wise columns (a :func:`lesionwise_summary`)."""
    cohort = f", cohort {lw['cohort']}" if "cohort" in lw else ""
    note = f"LW DSC / LW HD95: lesion-wise means, convention {lw['convention']}{cohort} — {lw['rule']}."
    if with_counts:
        note += (" Lesion counts over all cases (reference lesions / TP / FN / FP): "
                 + "; ".join(f"{r} {c['n_ref_lesions']} / {c['lesion_tp']} / {c['lesion_fn']} / {c['lesion_fp']}"
                             for r, c in lw["lesion_counts"].items()) + ".")
    return note


def table_notes(conv: dict) -> list[str]:
    return [f"HD95: {conv['hd95']}.",
            f"Empty masks: both empty → {conv['both_empty']}; only prediction empty → "
            f"{conv['only_prediction_empty']}; only reference empty → {conv['only_reference_empty']}.",
            "VS = 1 − |V_p − V_r| / (V_p + V_r) (NNDM Table 1); PA = (TP + TN) / all voxels (DDMD Table 1); "
            "IoU = TP / (TP + FP + FN), the region's own IoU (Jaccard); mIoU = (TP / (TP + FP + FN) + "
            "TN / (TN + FP + FN)) / 2, the mean IoU over the two classes region and background (DDMD Table 1's "
            "Miou; it grows with the background in the image, so compare it only on the same images)."]
