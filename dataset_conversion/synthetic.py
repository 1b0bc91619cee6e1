"""A small synthetic 4-channel brain-tumour dataset in nnU-Net's raw format (for tests and the demo).

This is *synthetic*, not MRI: an ellipsoidal "brain" with white matter, grey matter and ventricles, one
irregular tumour per case (necrotic core, enhancing rim, oedema that spreads further in white matter),
four contrasts with the characteristic relative intensities of T1, T1ce, T2 and FLAIR, a smooth bias
field and Rician noise. It exists because no labelled tumour MRI can be downloaded on the machines this
project is tested on. Labels follow nnU-Net's BraTS convention (1 oedema, 2 necrosis/non-enhancing core,
3 enhancing) and dataset.json declares the three BraTS regions, exactly like nnU-Net's own BraTS 2021
converter (Dataset137_BraTS21), so everything region-related is exercised.

Deterministic per seed: case ``i`` of seed ``s`` is the same on every machine and in every run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from .conventions import BRATS_REGIONS_DATASET_JSON, CHANNELS  # noqa: F401 (re-exported)
from .conventions import TISSUE_INTENSITY as _INTENSITY


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-8)


def make_case(rng: np.random.Generator, shape=(32, 40, 36)) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return ({channel: float32 array}, uint8 label array), arrays in SimpleITK (z, y, x) order."""
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    rel = (grid - centre[:, None, None, None]) / (np.array(shape, dtype=np.float32)[:, None, None, None] / 2)

    # brain, white matter and ventricles: ellipsoids with smoothly perturbed boundaries
    radius = np.sqrt((rel ** 2).sum(0))
    wobble = 0.06 * _smooth_noise(rng, shape, 3.0)
    brain = radius + wobble < 0.86
    wm = (radius + 1.5 * wobble < 0.55) & brain
    ventricle_rel = rel * np.array([1.6, 2.6, 1.2], dtype=np.float32)[:, None, None, None]
    csf = (np.sqrt((ventricle_rel ** 2).sum(0)) < 0.45) & brain

    # tumour: a noisy distance field around a random centre inside the brain
    t_centre = centre + (rng.uniform(-0.35, 0.35, 3) * np.array(shape) / 2)
    t_radius = rng.uniform(0.16, 0.26) * min(shape)
    dist = np.sqrt(((grid - t_centre[:, None, None, None]) ** 2).sum(0)) / t_radius
    dist = dist + 0.25 * _smooth_noise(rng, shape, 2.0)
    necrosis = dist < rng.uniform(0.3, 0.5)
    enhancing = (dist < 0.72) & ~necrosis
    edema_reach = np.where(wm, rng.uniform(1.35, 1.6), rng.uniform(1.0, 1.15))  # spreads along white matter
    edema = (dist < edema_reach) & ~necrosis & ~enhancing
    label = np.zeros(shape, np.uint8)
    label[edema] = 1
    label[necrosis] = 2
    label[enhancing] = 3
    label[~brain] = 0

    tissue = np.full(shape, 1, np.int8)  # grey matter by default
    tissue[wm] = 2
    tissue[csf] = 0
    tissue[label == 1] = 3
    tissue[label == 3] = 4
    tissue[label == 2] = 5

    bias = np.exp(0.12 * _smooth_noise(rng, shape, 8.0))
    images = {}
    for name in CHANNELS:
        values = np.asarray(_INTENSITY[name], np.float32)
        img = gaussian_filter(values[tissue], 0.6)  # partial-volume blur
        img *= bias * rng.uniform(0.8, 1.2)
        sigma = 0.03
        img = np.sqrt((img + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)  # Rician
        img[~brain] = 0.0
        images[name] = (img * 1000).astype(np.float32)
    return images, label


def _write(array: np.ndarray, path: Path, spacing) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, str(path), useCompression=True)


def make_synthetic_dataset(raw_root: str | os.PathLike, dataset_id: int = 990, name: str = "NNDiffSynthetic",
                           num_train: int = 8, num_test: int = 2, shape=(32, 40, 36), spacing=(1.0, 1.0, 1.0),
                           seed: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``raw_root/DatasetNNN_Name`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json).

    The dataset is assembled in a temporary folder next to the target and moved into place at the end,
    so an interrupted run leaves nothing half-written behind. Returns the dataset folder.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset id must be in 1..999 (nnU-Net's DatasetNNN naming); got {dataset_id}")
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1; got {num_train}")
    raw_root = Path(raw_root)
    target = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=raw_root))
    try:
        cases = [("Tr", i) for i in range(num_train)] + [("Ts", i) for i in range(num_test)]
        from tqdm import tqdm
        for split, i in tqdm(cases, desc=f"synthetic {target.name}", disable=not progress):
            rng = np.random.default_rng([seed, 0 if split == "Tr" else 1, i])
            images, label = make_case(rng, shape)
            case = f"synth_{split.lower()}_{i:03d}"
            (tmp / f"images{split}").mkdir(exist_ok=True)
            (tmp / f"labels{split}").mkdir(exist_ok=True)
            for c, ch in enumerate(CHANNELS):
                _write(images[ch], tmp / f"images{split}" / f"{case}_{c:04d}.nii.gz", spacing)
            _write(label, tmp / f"labels{split}" / f"{case}.nii.gz", spacing)
        dataset_json = dict(BRATS_REGIONS_DATASET_JSON, numTraining=num_train,
                            name=name, description="synthetic 4-channel tumour phantoms (nnunet_diffusion)")
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
