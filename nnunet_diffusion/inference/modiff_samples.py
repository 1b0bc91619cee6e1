"""MoDiff's diverse samples as files, and their sample-set metrics against the raters.

nnU-Net's predictor returns one (fused) segmentation per case, so the n individual samples of a case are drawn in a
second pass over the whole case: nnU-Net's preprocessing, the same tiling and Gaussian blending
(``whole_case.sliding_window``) and nnU-Net's geometry revert (``whole_case.revert_to_original_geometry``).
Each sample is then binarised by :func:`sample_segmentation` with the trainer config's ``sample_reading`` (default
"threshold": the paper's probability ≥ 0.9 of §4.1, the config's ``binarize_threshold``; "raters", ours, variant
``_raters``: sample i keeps the voxels that at least k_i = 1 + ((i − 1) mod R) of the R raters mark in its sampled
map, R = 1 for single-rater models; an explicit ``threshold`` argument / ``--threshold`` means "threshold" at that
value), the same rule for multi-rater and single-rater models, and written as
``<output>/samples/<case>_sample<i>.nii.gz`` (i from 1; uint8 0/1 for multi-rater models; the label map of the
sample otherwise).

Samples of a window are drawn with seeds NNDIFF_SEED + i (so sample i is one draw per window, blended across
overlapping windows). With several folds, sample i comes from fold i mod F (all folds contribute, every sample is
one model's draw, so ensembling does not average the diversity away).

``evaluate_samples`` computes GED_n, HM-IoU_n, NCC_n and CI_n (``evaluation/samples.py``) of each case's samples
against its raters (``labelsRaters/<case>_rater<r>.nii.gz``) into a CSV, with the mean over cases.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import NNDiffConfigError, NNDiffError
from .whole_case import (input_cases, load_model, preprocess_case, revert_to_original_geometry, sliding_window,
                         write_like_input)

SAMPLES_FOLDER = "samples"
METRIC_COLUMNS = ("ged", "hm_iou", "ncc", "ci", "s_c", "d_max", "d_a")


def sample_file(folder: os.PathLike, case: str, i: int, ending: str = ".nii.gz") -> Path:
    return Path(folder) / f"{case}_sample{i}{ending}"


def _write(arr: np.ndarray, properties: dict, path: Path) -> None:
    write_like_input(arr, properties, path, np.uint8, what="samples")


def samples_of_case(network, data: torch.Tensor, patch_size: Sequence[int], num_samples: int) -> torch.Tensor:
    """n sample probability maps of a whole preprocessed case (C, *spatial) → (n, K, *spatial), K = 1 for a
    multi-rater model (foreground probability), else the network's output channels."""
    k = 1 if network.num_raters else network.mask_channels

    def window(w):
        s = network.sample_probabilities(w, num_samples)          # (n, 1, K, *patch)
        return s[:, 0].reshape(1, num_samples * k, *s.shape[3:])

    out = sliding_window(window, data, patch_size, out_channels=num_samples * k)
    return out.reshape(num_samples, k, *out.shape[1:])


def sample_segmentation(prob: np.ndarray, i: int, raters: int, reading: str, threshold: float,
                        label_manager=None) -> np.ndarray:
    """Sample i's (0-based) segmentation from its probability map ``prob`` (K, *spatial), in the input geometry.

    The cut is ``heads.modiff.sample_threshold(i, R, reading, threshold)``: with ``reading`` "threshold" the
    paper's P̂ ≥ 0.9 (§4.1, or the given threshold); with "raters" the level "at least k_i = 1 + (i mod R) of R raters",
    P̂ ≥ (k_i − ½)/R (R = 1 for a single-rater model: P̂ ≥ 0.5). Multi-rater model (``raters`` = R > 0, K = 1): the
    foreground probability cut there (0/1). Single-rater model: regions: region r is on where its probability
    passes the cut (nnU-Net's regions_class_order then paints the labels); labels: the most probable foreground
    class where its (normalised) probability passes the cut, background elsewhere.
    """
    from ..heads.modiff import sample_threshold

    cut = sample_threshold(i, raters if raters else 1, reading, threshold)
    if raters:
        return (prob[0] >= cut).astype(np.uint8)
    if label_manager is not None and label_manager.has_regions:
        return np.asarray(label_manager.convert_probabilities_to_segmentation((prob >= cut).astype(np.float32)))
    prob = prob / np.clip(prob.sum(0, keepdims=True), 1e-6, None)
    fg = prob[1:]
    return np.where(fg.max(0) >= cut, fg.argmax(0) + 1, 0).astype(np.uint8)


def write_samples(model_folder: os.PathLike, input_folder: os.PathLike, output_folder: os.PathLike,
                  folds: Optional[Sequence] = None, checkpoint_name: str = "checkpoint_final.pth",
                  num_samples: Optional[int] = None, threshold: Optional[float] = None,
                  device: torch.device = torch.device("cpu"), progress: bool = True) -> list[Path]:
    """``<output_folder>/samples/<case>_sample<i>.nii.gz`` (i = 1..n) for every case of ``input_folder``
    (nnU-Net's ``{case}_{XXXX}`` layout), drawn by the trained MoDiff model(s) in ``model_folder`` with the
    NNDIFF_* sampling settings; n: ``num_samples`` or NNDIFF_SAMPLES or the config's ``num_samples``."""
    from .modiff_network import MoDiffNetwork

    predictor = load_model(model_folder, folds, checkpoint_name, device, MoDiffNetwork, "samples",
                           "diverse samples exist for nnUNetTrainerMoDiff*")
    network = predictor.network
    n = int(num_samples or network.sampling.samples)
    if n < 1:
        raise NNDiffConfigError(f"samples: the number of samples must be >= 1; got {n}")
    thr = network.threshold if threshold is None else float(threshold)
    reading = getattr(network, "reading", "threshold") if threshold is None else "threshold"
    if not 0.0 < thr <= 1.0:
        raise NNDiffConfigError(f"samples: the binarisation threshold must be in (0, 1]; got {thr}")
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    label_manager = predictor.label_manager
    ending = predictor.dataset_json["file_ending"]
    cases = input_cases(predictor, input_folder, "samples")
    out_dir = Path(output_folder) / SAMPLES_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    params = predictor.list_of_parameters
    per_fold = [len(range(f, n, len(params))) for f in range(len(params))]
    written = []
    for case, case_files in tqdm(cases, desc="MoDiff samples", disable=not progress):
        data, properties = preprocess_case(predictor, case_files, device)
        draws = [None] * n
        for f, (p, m) in enumerate(zip(params, per_fold)):
            if not m:
                continue
            network.load_state_dict(p)
            s = samples_of_case(network, data, cm.patch_size, m)
            for j, i in enumerate(range(f, n, len(params))):
                draws[i] = s[j]
        for i, s in enumerate(draws, start=1):
            prob = revert_to_original_geometry(s.cpu().numpy(), properties, pm, cm)
            seg = sample_segmentation(prob, i - 1, network.num_raters, reading, thr, label_manager)
            path = sample_file(out_dir, case, i, ending)
            _write(seg, properties, path)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- metrics
def _read_mask(path: Path) -> np.ndarray:
    import SimpleITK as sitk
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
    except Exception as e:
        raise NNDiffError(f"{path}: cannot be read as an image ({type(e).__name__})") from None


def evaluate_samples(samples_folder: os.PathLike, raters_folder: os.PathLike, output_csv: os.PathLike,
                     num_samples: Optional[int] = None, ending: str = ".nii.gz") -> dict:
    """Per case: GED_n, HM-IoU_n, NCC_n, CI_n (+ S_c, D_max, D_a) of ``<case>_sample<i>`` (binary: voxels > 0)
    against ``<case>_rater<r>`` in ``raters_folder``; written to ``output_csv`` (one row per case, then a row
    "mean" over cases, NaN-aware) and returned as {"cases": rows, "mean": {...}}. ``num_samples``: use the first
    n samples of each case (the paper reports n = 16 and n = 32); default all."""
    from ..evaluation.samples import sample_set_metrics

    samples_folder, raters_folder = Path(samples_folder), Path(raters_folder)
    pattern = re.compile(rf"(.+)_sample(\d+){re.escape(ending)}$")
    by_case: dict[str, dict[int, Path]] = {}
    for f in samples_folder.iterdir() if samples_folder.is_dir() else []:
        m = pattern.fullmatch(f.name)
        if m:
            by_case.setdefault(m.group(1), {})[int(m.group(2))] = f
    if not by_case:
        raise NNDiffError(f"{samples_folder}: no <case>_sample<i>{ending} files")
    rows = []
    for case in sorted(by_case):
        idx = sorted(by_case[case])
        if num_samples is not None:
            if len(idx) < num_samples:
                raise NNDiffError(f"case {case}: {len(idx)} samples in {samples_folder}, {num_samples} asked for")
            idx = idx[:num_samples]
        raters = sorted(raters_folder.glob(f"{case}_rater*{ending}"),
                        key=lambda p: int(re.search(r"_rater(\d+)", p.name).group(1)))
        if not raters:
            raise NNDiffError(f"case {case}: no rater masks {case}_rater<r>{ending} in {raters_folder}")
        samples = np.stack([_read_mask(by_case[case][i]) for i in idx])
        refs = np.stack([_read_mask(p) for p in raters])
        if samples.shape[1:] != refs.shape[1:]:
            raise NNDiffError(f"case {case}: samples of shape {samples.shape[1:]} and rater masks of shape "
                              f"{refs.shape[1:]} differ")
        rows.append({"case": case, **sample_set_metrics(samples, refs)})
    mean = {"case": "mean", "n": rows[0]["n"] if len({r["n"] for r in rows}) == 1 else "",
            "m": rows[0]["m"] if len({r["m"] for r in rows}) == 1 else ""}
    for col in METRIC_COLUMNS:
        vals = [r[col] for r in rows if not math.isnan(r[col])]
        mean[col] = float(np.mean(vals)) if vals else float("nan")
    output_csv = Path(output_csv)
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(output_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["case", "n", "m", *METRIC_COLUMNS])
        w.writeheader()
        for r in [*rows, mean]:
            w.writerow({k: r[k] for k in w.fieldnames})
    output_csv.with_suffix(".json").write_text(json.dumps({"mean": mean, "cases": rows}, indent=2, default=float))
    return {"cases": rows, "mean": mean}
