"""Voxel-wise uncertainty maps next to nnU-Net's predictions.

nnU-Net's predictor writes, with ``--save_probabilities``, each case's fused probabilities (``<case>.npz``,
already resampled to the original image grid) next to ``<case>.nii.gz``. For heads that segment by sampling
(MedSegDiff) those are the mean over the samples, and their entropy is the uncertainty map: per region the
binary entropy H(p) = −p log₂ p − (1−p) log₂(1−p), for label datasets the entropy over the classes divided by
log₂ C; both in [0, 1]. Maps are written to ``<prediction folder>/uncertainty/<case>.nii.gz`` with the
prediction's geometry (a subfolder, so nnU-Net's evaluators never mistake them for predictions); for region
datasets one map per region, as extra volumes ``<case>_<region>.nii.gz``, and their maximum in ``<case>.nii.gz``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import NNDiffError
from ..evaluation.uncertainty_quality import entropy as _entropy  # the one definition (evaluation sits below)


def write_uncertainty_maps(pred_dir, remove_probabilities: bool = False) -> list[Path]:
    """Write the uncertainty maps of every ``<case>.npz`` in ``pred_dir``; return the files written."""
    pred_dir = Path(pred_dir)
    dataset_json = json.loads((pred_dir / "dataset.json").read_text())
    labels = dataset_json["labels"]
    regions = [k for k, v in labels.items() if isinstance(v, (list, tuple)) and len(v) > 1]
    has_regions = bool(regions)
    region_names = [k for k, v in labels.items() if k != "background"] if has_regions else []
    ending = dataset_json["file_ending"]
    out_dir = pred_dir / "uncertainty"
    out_dir.mkdir(exist_ok=True)
    written = []
    npz_files = sorted(pred_dir.glob("*.npz"))
    if not npz_files:
        raise NNDiffError(f"{pred_dir}: no <case>.npz probabilities found (predict with --save_probabilities)")
    for npz in npz_files:
        case = npz.stem
        seg_file = pred_dir / f"{case}{ending}"
        if not seg_file.is_file():
            raise NNDiffError(f"{npz}: no prediction {seg_file.name} beside it")
        ref = sitk.ReadImage(str(seg_file))
        probs = np.load(npz)["probabilities"]
        maps = _entropy(probs, has_regions).astype(np.float32)
        if maps.shape[1:] != sitk.GetArrayViewFromImage(ref).shape:
            raise NNDiffError(f"{npz}: probabilities of shape {maps.shape[1:]} do not match {seg_file.name}")
        targets = [(out_dir / f"{case}{ending}", maps.max(0))]
        for name, m in zip(region_names, maps):
            targets.append((out_dir / f"{case}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}{ending}", m))
        for path, arr in targets:
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(ref)
            sitk.WriteImage(img, str(path), useCompression=True)
            written.append(path)
        if remove_probabilities:
            npz.unlink()
            pkl = pred_dir / f"{case}.pkl"
            if pkl.exists():
                pkl.unlink()
    return written
