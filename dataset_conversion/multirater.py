"""Multi-rater datasets -> nnU-Net raw: the ISBI 2015 longitudinal MS lesion challenge and the LIDC-IDRI lesion crops.

The multi-rater convention (used by ``nnUNetTrainerMoDiff``):

* ``labelsTr/<case>.nii.gz`` is a **vote-count map**: voxel value k = the number of raters (0..R) who marked it.
  dataset.json has the labels ``{"background": 0, "1 rater": 1, …, "R raters": R}`` and ``"nndiff_raters": R``.
  nnU-Net crops, transposes, resamples (label by label, so counts stay whole numbers) and augments it exactly like
  any label map, i.e. in step with the image; the trainer turns k into the probability P = k/R (the mean of the
  raters' masks). Datasets without ``nndiff_raters`` train on their one-hot / region maps.
* each rater's own mask lies beside it: ``labelsRaters/<case>_rater<r>.nii.gz`` (r = 1..R, values 0/1, the label's
  geometry), and for test cases with annotations ``labelsTsRaters/`` (+ the vote counts in ``labelsTs/``). They are
  the reference set of the sample-set metrics (GED, HM-IoU, NCC, CI; ``inference/modiff_samples.py``).

Source layouts:

* ISBI 2015 (Carass et al. 2017), the challenge's training download: ``trainingNN/preprocessed/
  trainingNN_TT_{flair,mprage,pd,t2}_pp.nii`` and ``trainingNN/masks/trainingNN_TT_mask{1,2}.nii`` (two raters).
  One nnU-Net case per subject and time point (``trainingNN_TT``); channels 0 FLAIR, 1 MPRAGE, 2 PD, 3 T2 (ours).
  Folders ``testNN/preprocessed/`` without masks (the challenge's test data) go to imagesTs.
* LIDC-IDRI 128×128 lesion crops with four raters:
  - the pickle of the Probabilistic U-Net PyTorch ports (e.g. ``data_lidc.pickle``): a dict ``{key: {"image":
    (128, 128), "masks": [4 × (128, 128)], "series_uid": …}}``, or a list of such dicts / of ``(image, masks)``
    pairs; cases are named ``lidc_NNNNN`` in the pickle's order, and ``conversion_report.json`` maps them back to
    the keys;
  - per-rater PNG folders as in Kohl et al.'s crops: ``[train|val|test/]images/<patient>/<crop>.png`` with
    ``gt/<patient>/<crop>_l{0,1,2,3}.png``; ``test/`` goes to imagesTs + labelsTs + labelsTsRaters.
  Crops are stored as one-slice NIfTI volumes (1 × 128 × 128, 1 mm spacing: the crops carry no spacing); train them
  with nnU-Net's ``2d`` configuration.

Everything is validated before it is written (files present and readable, one geometry per case, finite voxels,
binary rater masks, the same number of raters everywhere); a bad case stops the run with one line naming the case
and the file. The dataset is assembled in a hidden folder and moved into place at the end (``--overwrite`` replaces
an existing one); the source is only read.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from nnunet_diffusion.errors import NNDiffError

from .brats import (BratsCaseError, _check_data, _check_target, _fmt, _gzip_copy, _header, _is_floating, _raw_root,
                    _read, atomic_folder)

RATERS_KEY = "nndiff_raters"
RATER_FOLDER = "labelsRaters"
TEST_RATER_FOLDER = "labelsTsRaters"
REPORT_NAME = "conversion_report.json"
ISBI_MODALITIES = ("flair", "mprage", "pd", "t2")
LIDC_RATERS = 4


class MultiRaterConversionError(NNDiffError):
    """The multi-rater input (or the output location) cannot be converted as asked."""


class MultiRaterCaseError(MultiRaterConversionError):
    def __init__(self, case: str, file: Optional[str], reason: str):
        self.case, self.file, self.reason = case, file, reason
        super().__init__(f"case {case}" + (f": file {file}" if file else "") + f": {reason}")


def vote_count_labels(raters: int) -> dict:
    """dataset.json labels of a vote-count map with R raters."""
    return {"background": 0, **{f"{k} rater{'s' if k > 1 else ''}": k for k in range(1, raters + 1)}}


def multirater_dataset_json(channel_names: dict, raters: int, num_training: int, name: str, description: str,
                            **extra) -> dict:
    return {"channel_names": channel_names, "labels": vote_count_labels(raters), "numTraining": num_training,
            "file_ending": ".nii.gz", RATERS_KEY: raters, "nndiff_rater_folder": RATER_FOLDER,
            "name": name, "description": description, **extra}


def rater_file(folder: os.PathLike, case: str, rater: int) -> Path:
    """``<folder>/<case>_rater<r>.nii.gz`` (r from 1)."""
    return Path(folder) / f"{case}_rater{rater}.nii.gz"


def _target(raw_root, dataset_id: int, name: str, overwrite: bool) -> Path:
    if not 1 <= int(dataset_id) <= 999:
        raise MultiRaterConversionError(f"dataset id must be in 1..999 (nnU-Net's DatasetNNN naming); got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-_]*", name):
        raise MultiRaterConversionError(f"dataset name {name!r}: use letters, digits, '.', '-' and '_' only")
    try:
        raw = _raw_root(raw_root)
    except NNDiffError as e:
        raise MultiRaterConversionError(str(e)) from None
    target = raw / f"Dataset{int(dataset_id):03d}_{name}"
    _check_target(raw, target, dataset_id, overwrite, MultiRaterConversionError)
    return target


def _write_mask(arr: np.ndarray, ref, path: Path) -> None:
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(path), True)


def _check_binary(case: str, file: str, arr: np.ndarray) -> np.ndarray:
    values = np.unique(arr)
    bad = [v for v in values.tolist() if v not in (0, 1)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:6])
        raise MultiRaterCaseError(case, file, f"a rater mask must be binary (0/1); found value(s) {shown}")
    return arr.astype(np.uint8)


def _same_geometry(case: str, ref_name: str, ref, name: str, img) -> None:
    for what, a, b, tol in (("size", ref.GetSize(), img.GetSize(), None),
                            ("spacing", ref.GetSpacing(), img.GetSpacing(), 1e-4),
                            ("origin", ref.GetOrigin(), img.GetOrigin(), 1e-3),
                            ("direction", ref.GetDirection(), img.GetDirection(), 1e-4)):
        same = tuple(a) == tuple(b) if tol is None else np.allclose(a, b, rtol=1e-5, atol=tol)
        if not same:
            raise MultiRaterCaseError(case, name, f"{what} {_fmt(b)} differs from {ref_name} {_fmt(a)}")


# ------------------------------------------------------------------------------------------------------ ISBI 2015
@dataclass
class IsbiCase:
    name: str
    images: tuple[Path, ...]
    masks: tuple[Path, ...]     # empty: unlabelled (test) case


def discover_isbi2015(input_dir: os.PathLike) -> list[IsbiCase]:
    """The cases of the ISBI 2015 challenge folders under ``input_dir`` (which holds ``trainingNN``/``testNN``
    folders, or is one of them)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise MultiRaterConversionError(f"input folder {root} does not exist or is not a folder")
    subjects = [root] if (root / "preprocessed").is_dir() else \
        sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"(training|test)\d+", p.name))
    if not subjects:
        raise MultiRaterConversionError(f"no ISBI 2015 subject folders (training01, …, each with preprocessed/ and "
                                        f"masks/) in {root}")
    cases = []
    for subj in subjects:
        pre = subj / "preprocessed"
        if not pre.is_dir():
            raise MultiRaterCaseError(subj.name, None, f"no preprocessed/ folder in {subj}")
        stems = sorted({m.group(1) for f in pre.iterdir()
                        if (m := re.fullmatch(rf"({re.escape(subj.name)}_\d+)_[a-z]+_pp\.nii(\.gz)?", f.name))})
        if not stems:
            raise MultiRaterCaseError(subj.name, None, f"no {subj.name}_TT_<modality>_pp.nii files in {pre}")
        masks_dir = subj / "masks"
        for case in stems:
            images = []
            for mod in ISBI_MODALITIES:
                f = next((pre / f"{case}_{mod}_pp{e}" for e in (".nii", ".nii.gz")
                          if (pre / f"{case}_{mod}_pp{e}").is_file()), None)
                if f is None:
                    raise MultiRaterCaseError(case, f"{case}_{mod}_pp.nii", f"missing modality file in {pre}")
                images.append(f)
            masks = []
            if masks_dir.is_dir():
                for r in (1, 2):
                    f = next((masks_dir / f"{case}_mask{r}{e}" for e in (".nii", ".nii.gz")
                              if (masks_dir / f"{case}_mask{r}{e}").is_file()), None)
                    if f is None:
                        raise MultiRaterCaseError(case, f"{case}_mask{r}.nii", f"missing rater mask in {masks_dir} "
                                                                               "(ISBI 2015 has two raters per scan)")
                    masks.append(f)
            cases.append(IsbiCase(case, tuple(images), tuple(masks)))
    return cases


def _convert_isbi_case(case: IsbiCase, out: Path) -> None:
    import SimpleITK as sitk
    ref_name = case.images[0].name
    headers = []
    for f in case.images + case.masks:
        try:
            headers.append(_header(case.name, f))
            _check_data(case.name, f, _is_floating(headers[-1]))
        except BratsCaseError as e:
            raise MultiRaterCaseError(e.case, e.file, e.reason) from None
    for f, h in zip(case.images[1:] + case.masks, headers[1:]):
        _same_geometry(case.name, ref_name, headers[0], f.name, h)
    split = "Tr" if case.masks else "Ts"
    for ch, src in enumerate(case.images):
        dst = out / f"images{split}" / f"{case.name}_{ch:04d}.nii.gz"
        if src.name.endswith(".gz"):
            shutil.copyfile(src, dst)
        else:
            _gzip_copy(src, dst)
    if not case.masks:
        return
    imgs = [_read(case.name, f) for f in case.masks]
    arrs = [_check_binary(case.name, f.name, sitk.GetArrayFromImage(i)) for f, i in zip(case.masks, imgs)]
    for r, (arr, img) in enumerate(zip(arrs, imgs), start=1):
        _write_mask(arr, img, rater_file(out / RATER_FOLDER, case.name, r))
    _write_mask(np.sum(arrs, 0), imgs[0], out / "labelsTr" / f"{case.name}.nii.gz")


def convert_isbi2015(input_dir: os.PathLike, raw_root: Optional[os.PathLike] = None, dataset_id: int = 520,
                     name: str = "ISBI2015MS", overwrite: bool = False, progress: bool = True) -> Path:
    """ISBI 2015 MS challenge folders → ``raw_root/DatasetNNN_Name`` with vote-count labels (R = 2) and
    ``labelsRaters/``. Returns the dataset folder."""
    from tqdm import tqdm
    target = _target(raw_root, dataset_id, name, overwrite)
    cases = discover_isbi2015(input_dir)
    if target.parent.resolve().is_relative_to(Path(input_dir).resolve()):
        raise MultiRaterConversionError(f"the nnU-Net raw folder {target.parent} lies inside the source {input_dir}")
    n_tr = sum(bool(c.masks) for c in cases)
    if not n_tr:
        raise MultiRaterConversionError(f"no case with rater masks (trainingNN/masks/) in {input_dir}")
    with atomic_folder(target, overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", RATER_FOLDER, "imagesTs"):
            (tmp / sub).mkdir()
        for case in tqdm(cases, desc=f"convert {target.name}", unit="case", disable=not progress):
            _convert_isbi_case(case, tmp)
        if n_tr == len(cases):
            (tmp / "imagesTs").rmdir()
        dj = multirater_dataset_json({"0": "FLAIR", "1": "MPRAGE", "2": "PD", "3": "T2"}, 2, n_tr, name,
                                     "ISBI 2015 longitudinal MS lesion segmentation, two raters as vote counts "
                                     "(nndiff convert-isbi2015)",
                                     reference="https://doi.org/10.1016/j.neuroimage.2016.12.064")
        (tmp / "dataset.json").write_text(json.dumps(dj, indent=2))
        (tmp / REPORT_NAME).write_text(json.dumps({"source": str(Path(input_dir).resolve()), "num_training": n_tr,
                                                   "num_test": len(cases) - n_tr,
                                                   "cases": [c.name for c in cases]}, indent=2))
    return target


# ------------------------------------------------------------------------------------------------------ LIDC-IDRI
@dataclass
class LidcCase:
    name: str
    image: np.ndarray
    masks: list
    split: str                   # "Tr" or "Ts"
    source: str                  # pickle key / PNG path, for the report


def _lidc_entry(key: str, entry, index: int) -> tuple[np.ndarray, list]:
    case = f"lidc_{index:05d}"
    if isinstance(entry, dict):
        if "image" not in entry or "masks" not in entry:
            raise MultiRaterCaseError(case, None, f"pickle entry {key!r} has keys {sorted(entry)[:6]}; expected "
                                                  "'image' and 'masks'")
        image, masks = entry["image"], entry["masks"]
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        image, masks = entry
    else:
        raise MultiRaterCaseError(case, None, f"pickle entry {key!r} is a {type(entry).__name__}; expected a dict "
                                              "with 'image' and 'masks' or an (image, masks) pair")
    return np.asarray(image), [np.asarray(m) for m in masks]


def read_lidc_pickle(path: os.PathLike) -> list[LidcCase]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except Exception as e:
        raise MultiRaterConversionError(f"{path}: cannot be read as a pickle ({type(e).__name__}: {str(e)[:160]})") \
            from None
    items = list(data.items()) if isinstance(data, dict) else \
        [(str(i), e) for i, e in enumerate(data)] if isinstance(data, (list, tuple)) else None
    if items is None:
        raise MultiRaterConversionError(f"{path}: expected a dict or list of LIDC entries; found "
                                        f"{type(data).__name__}")
    if not items:
        raise MultiRaterConversionError(f"{path}: the pickle holds no entries")
    cases = []
    for i, (key, entry) in enumerate(items):
        image, masks = _lidc_entry(key, entry, i)
        cases.append(LidcCase(f"lidc_{i:05d}", image, masks, "Tr", f"{path.name}:{key}"))
    return cases


def _read_png(path: Path, case: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "F") else im)
    except Exception as e:
        raise MultiRaterCaseError(case, path.name, f"cannot be read as a PNG image ({type(e).__name__})") from None


def read_lidc_png_folders(root: os.PathLike) -> list[LidcCase]:
    root = Path(root)
    splits = [(root / s, "Ts" if s == "test" else "Tr") for s in ("train", "val", "test") if (root / s).is_dir()]
    if not splits:
        splits = [(root, "Tr")]
    cases = []
    for folder, split in splits:
        img_dir, gt_dir = folder / "images", folder / "gt"
        if not img_dir.is_dir() or not gt_dir.is_dir():
            raise MultiRaterConversionError(f"{folder}: expected images/ and gt/ folders (LIDC crops: "
                                            "images/<patient>/<crop>.png, gt/<patient>/<crop>_l0..l3.png)")
        pngs = sorted(img_dir.rglob("*.png"))
        if not pngs:
            raise MultiRaterConversionError(f"{img_dir}: no PNG images")
        for png in pngs:
            rel = png.relative_to(img_dir)
            case = re.sub(r"[^A-Za-z0-9]+", "_", str(rel.with_suffix(""))).strip("_")
            masks = []
            for r in range(LIDC_RATERS):
                m = gt_dir / rel.parent / f"{png.stem}_l{r}.png"
                if not m.is_file():
                    raise MultiRaterCaseError(case, str(m.relative_to(folder)),
                                              f"missing rater mask (LIDC crops have {LIDC_RATERS} raters, _l0.._l3)")
                masks.append(_read_png(m, case))
            cases.append(LidcCase(case, _read_png(png, case), masks, split, str(png.relative_to(root))))
    return cases


def _convert_lidc_case(case: LidcCase, out: Path, raters: int) -> None:
    import SimpleITK as sitk
    img = np.asarray(case.image)
    if img.ndim != 2:
        raise MultiRaterCaseError(case.name, case.source, f"expected a 2D crop, found shape {img.shape}")
    if not np.issubdtype(img.dtype, np.number) or not np.all(np.isfinite(img)):
        raise MultiRaterCaseError(case.name, case.source, "the image has non-numeric or non-finite values")
    if len(case.masks) != raters:
        raise MultiRaterCaseError(case.name, case.source, f"{len(case.masks)} rater masks; every crop needs "
                                                          f"{raters}")
    masks = []
    for r, m in enumerate(case.masks, start=1):
        if m.shape != img.shape:
            raise MultiRaterCaseError(case.name, case.source, f"rater {r}'s mask has shape {m.shape}, the image "
                                                              f"{img.shape}")
        m = np.asarray(m)
        if m.dtype == bool:
            m = m.astype(np.uint8)
        if set(np.unique(m).tolist()) <= {0, 255}:  # 8-bit PNG masks
            m = (m > 0).astype(np.uint8)
        masks.append(_check_binary(case.name, f"{case.source} (rater {r})", m))
    ref = sitk.GetImageFromArray(img.astype(np.float32)[None])
    ref.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(ref, str(out / f"images{case.split}" / f"{case.name}_0000.nii.gz"), True)
    label_dir, rater_dir = ("labelsTr", RATER_FOLDER) if case.split == "Tr" else ("labelsTs", TEST_RATER_FOLDER)
    for r, m in enumerate(masks, start=1):
        _write_mask(m[None], ref, rater_file(out / rater_dir, case.name, r))
    _write_mask(np.sum(masks, 0)[None], ref, out / label_dir / f"{case.name}.nii.gz")


def convert_lidc(source: os.PathLike, raw_root: Optional[os.PathLike] = None, dataset_id: int = 521,
                 name: str = "LIDC128", overwrite: bool = False, progress: bool = True) -> Path:
    """LIDC-IDRI 128×128 crops with four raters (a pickle file or PNG folders) → ``raw_root/DatasetNNN_Name`` with
    vote-count labels (R = 4) and the rater masks. Returns the dataset folder."""
    from tqdm import tqdm
    source = Path(source)
    if not source.exists():
        raise MultiRaterConversionError(f"{source} does not exist (give the LIDC pickle file or the crops folder)")
    target = _target(raw_root, dataset_id, name, overwrite)
    cases = read_lidc_pickle(source) if source.is_file() else read_lidc_png_folders(source)
    n_tr = sum(c.split == "Tr" for c in cases)
    if not n_tr:
        raise MultiRaterConversionError(f"{source}: no training crops (only test/)")
    with atomic_folder(target, overwrite) as tmp:
        subs = ["imagesTr", "labelsTr", RATER_FOLDER]
        if n_tr < len(cases):
            subs += ["imagesTs", "labelsTs", TEST_RATER_FOLDER]
        for sub in subs:
            (tmp / sub).mkdir()
        for case in tqdm(cases, desc=f"convert {target.name}", unit="crop", disable=not progress):
            _convert_lidc_case(case, tmp, LIDC_RATERS)
        dj = multirater_dataset_json({"0": "CT"}, LIDC_RATERS, n_tr, name,
                                     "LIDC-IDRI 128x128 lesion crops, four raters as vote counts (nndiff convert-lidc)",
                                     reference="https://doi.org/10.1148/radiol.2323032035")
        (tmp / "dataset.json").write_text(json.dumps(dj, indent=2))
        (tmp / REPORT_NAME).write_text(json.dumps({"source": str(source.resolve()), "num_training": n_tr,
                                                   "num_test": len(cases) - n_tr,
                                                   "cases": {c.name: c.source for c in cases}}, indent=2))
    return target


# ------------------------------------------------------------------------------------------------------ CLI
# ---------------------------------------------------------------------------------------------- phantom
def _phantom_blob(shape, center, radius):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2).astype(np.uint8)


def write_isbi2015_phantom(root, subjects=2, timepoints=3, shape=(24, 28, 24), seed=0) -> Path:
    """ISBI 2015 training folders: trainingNN/preprocessed/trainingNN_TT_{flair,mprage,pd,t2}_pp.nii and
    trainingNN/masks/trainingNN_TT_mask{1,2}.nii. Rater 1 marks a sphere, rater 2 a larger sphere around it plus a
    second lesion; FLAIR = 100 + 100 × (number of raters), so image and vote count can be compared voxel by voxel.
    Subjects differ in voxel spacing (1.0 / 1.2 / … mm on the second axis), so nnU-Net resamples them. The raters
    disagree on the shell between the two spheres and on the second lesion (used by tests/test_multirater.py,
    tests/test_e2e_modiff.py and benchmarks/modiff_diversity.py)."""
    import SimpleITK as sitk

    root = Path(root)
    rng = np.random.default_rng(seed)
    for s in range(1, subjects + 1):
        subj = root / f"training{s:02d}"
        (subj / "preprocessed").mkdir(parents=True)
        (subj / "masks").mkdir()
        for t in range(1, timepoints + 1):
            case = f"training{s:02d}_{t:02d}"
            c = [n // 2 + int(rng.integers(-3, 4)) for n in shape]
            m1 = _phantom_blob(shape, c, 4)
            m2 = np.maximum(_phantom_blob(shape, c, 6), _phantom_blob(shape, [c[0] - 7, c[1] + 6, c[2]], 3))
            votes = m1 + m2
            imgs = {"flair": 100.0 + 100.0 * votes + rng.normal(0, 2, shape),
                    "mprage": 50 + rng.normal(0, 10, shape), "pd": 80 + 20 * m2 + rng.normal(0, 10, shape),
                    "t2": 60 + 30 * m1 + rng.normal(0, 10, shape)}
            ref = None
            for mod, arr in imgs.items():
                img = sitk.GetImageFromArray(arr.astype(np.float32))
                img.SetSpacing((1.0, 1.0 + 0.2 * (s - 1), 1.0))
                img.SetOrigin((1.0, 2.0, 3.0))
                sitk.WriteImage(img, str(subj / "preprocessed" / f"{case}_{mod}_pp.nii"))
                ref = img
            for r, m in ((1, m1), (2, m2)):
                mi = sitk.GetImageFromArray(m)
                mi.CopyInformation(ref)
                sitk.WriteImage(mi, str(subj / "masks" / f"{case}_mask{r}.nii"))
    return root


def cmd_convert_isbi2015(args) -> int:
    out = convert_isbi2015(args.input_dir, args.raw, args.d, args.name, args.overwrite, not args.no_progress)
    print(f"{out}: vote-count labels (2 raters) in labelsTr, rater masks in {RATER_FOLDER}/")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.d} -c 3d_fullres --verify_dataset_integrity")
    return 0


def cmd_convert_lidc(args) -> int:
    out = convert_lidc(args.source, args.raw, args.d, args.name, args.overwrite, not args.no_progress)
    print(f"{out}: vote-count labels (4 raters) in labelsTr, rater masks in {RATER_FOLDER}/")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.d} -c 2d --verify_dataset_integrity")
    return 0


def register(sub) -> None:
    """Add ``convert-isbi2015`` and ``convert-lidc`` to the ``nndiff`` parser's subparsers object."""
    for cmd, fn, src_help, did, name in (
            ("convert-isbi2015", cmd_convert_isbi2015, "folder holding the challenge's training01..training05 "
                                                       "(and testNN) folders", 520, "ISBI2015MS"),
            ("convert-lidc", cmd_convert_lidc, "the LIDC crops pickle (Probabilistic U-Net ports) or the crops "
                                               "folder ([train|val|test/]images/, gt/)", 521, "LIDC128")):
        p = sub.add_parser(cmd, help=f"multi-rater {name} -> nnU-Net raw with vote-count labels (for "
                                     f"nnUNetTrainerMoDiff)")
        p.add_argument("input_dir" if cmd == "convert-isbi2015" else "source", help=src_help)
        p.add_argument("-d", type=int, default=did, help=f"dataset id (default {did})")
        p.add_argument("--name", default=name, help=f"dataset name (default {name})")
        p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=fn)


__all__ = ["convert_isbi2015", "convert_lidc", "discover_isbi2015", "read_lidc_pickle", "read_lidc_png_folders",
           "rater_file", "vote_count_labels", "register", "RATER_FOLDER", "TEST_RATER_FOLDER", "RATERS_KEY",
           "MultiRaterConversionError", "MultiRaterCaseError"]
