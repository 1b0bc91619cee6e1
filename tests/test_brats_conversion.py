"""BraTS 2020 / 2021 / 2023-GLI -> nnU-Net raw, and back (dataset_conversion/brats.py, `nndiff convert-brats`).

Every test writes its own tiny BraTS-layout folders with plain numpy + SimpleITK. The expected layouts, label
values and channel order below are written down from the organisers' releases and nnU-Net's Dataset137
converter (not taken from the code under test).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.dataset_conversion import brats
from nnunet_diffusion.dataset_conversion.brats import (BratsCaseError, BratsConversionError, convert_brats,
                                                      convert_predictions_to_brats)
from nnunet_diffusion.errors import NNDiffError

NNDIFF = Path(sys.executable).parent / "nndiff"
SHAPE = (20, 24, 16)                       # numpy (z, y, x); SimpleITK size (16, 24, 20)

# what the organisers ship, and nnU-Net's conventions (channel 0 T1, 1 T1ce, 2 T2, 3 FLAIR;
# labels edema -> 1, necrosis/NETC -> 2, enhancing -> 3)
LAYOUT = {
    "2020": dict(train="MICCAI_BraTS2020_TrainingData", val="MICCAI_BraTS2020_ValidationData", sep="_",
                 ext=".nii", mods=("t1", "t1ce", "t2", "flair"), labels=(1, 2, 4), to_nn={2: 1, 1: 2, 4: 3},
                 train_cases=["BraTS20_Training_354", "BraTS20_Training_355", "BraTS20_Training_356"],
                 val_cases=["BraTS20_Validation_001", "BraTS20_Validation_002"],
                 dataset="Dataset500_BraTS2020", direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "2021": dict(train="RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021",
                 val="RSNA_ASNR_MICCAI_BraTS2021_ValidationData", sep="_", ext=".nii.gz",
                 mods=("t1", "t1ce", "t2", "flair"), labels=(1, 2, 4), to_nn={2: 1, 1: 2, 4: 3},
                 train_cases=["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"],
                 val_cases=["BraTS2021_00001"], dataset="Dataset501_BraTS2021",
                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "2023-gli": dict(train="ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
                     val="ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData", sep="-", ext=".nii.gz",
                     mods=("t1n", "t1c", "t2w", "t2f"), labels=(1, 2, 3), to_nn={2: 1, 1: 2, 3: 3},
                     train_cases=["BraTS-GLI-00000-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-001"],
                     val_cases=["BraTS-GLI-00001-000"], dataset="Dataset502_BraTS2023GLI",
                     direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)),
}
SEG_2020_CASE_355 = "W39_1998.09.19_Segm.nii"   # the 2020 training label shipped under another name


def _write(arr, path, spacing=(1.0, 1.0, 1.0), origin=(-0.0, -239.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection([float(d) for d in direction])
    sitk.WriteImage(img, str(path), useCompression=str(path).endswith(".gz"))


def make_case(root: Path, case: str, edition: str, seed: int, with_seg=True, shape=SHAPE, seg_dtype=np.uint8):
    """One case folder: 4 modalities with distinct contents (modality m has values in [1000 m, 1000 m + 999])
    and a label with all of the edition's values."""
    lay = LAYOUT[edition]
    rng = np.random.default_rng(seed)
    folder = root / case
    folder.mkdir(parents=True)
    geo = dict(spacing=(1.0, 1.2, 1.5), origin=(-0.0, -239.0, 3.0), direction=lay["direction"])
    for m, mod in enumerate(lay["mods"]):
        arr = (rng.integers(0, 1000, shape) + 1000 * m).astype(np.int16)
        _write(arr, folder / f"{case}{lay['sep']}{mod}{lay['ext']}", **geo)
    if with_seg:
        seg = rng.choice(np.array((0, *lay["labels"])), size=shape, p=(0.7, 0.1, 0.1, 0.1)).astype(seg_dtype)
        name = SEG_2020_CASE_355 if case == "BraTS20_Training_355" else f"{case}{lay['sep']}seg{lay['ext']}"
        _write(seg, folder / name, **geo)
    return folder


def make_source(root: Path, edition: str, with_val=True):
    lay = LAYOUT[edition]
    train, val = root / lay["train"], root / lay["val"]
    for i, c in enumerate(lay["train_cases"]):
        make_case(train, c, edition, seed=i, seg_dtype=np.float64 if i == 1 else np.uint8)
    if edition == "2020":  # the CSV files that sit beside the 2020 case folders
        (train / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\nHGG,BraTS20_Training_354\n")
        (train / "survival_info.csv").write_text("Brats20ID,Age,Survival_days,Extent_of_Resection\n")
    if with_val:
        for i, c in enumerate(lay["val_cases"]):
            make_case(val, c, edition, seed=100 + i, with_seg=False)
        if edition == "2020":
            (val / "survival_evaluation.csv").write_text("BraTS20ID,Age,ResectionStatus\n")
    return train, val


def source_seg_path(train: Path, case: str, edition: str) -> Path:
    lay = LAYOUT[edition]
    if case == "BraTS20_Training_355":
        return train / case / SEG_2020_CASE_355
    return train / case / f"{case}{lay['sep']}seg{lay['ext']}"


def arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def geometry(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def leftovers(raw: Path) -> list:
    return sorted(p.name for p in raw.iterdir() if p.name.startswith(".")) if raw.exists() else []


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """All three editions converted once (np=1 for 2020/2023, np=2 for 2021: both code paths)."""
    out = {}
    for edition in LAYOUT:
        root = tmp_path_factory.mktemp(f"brats{edition}")
        train, val = make_source(root / "src", edition)
        before = tree_hash(root / "src")
        res = convert_brats([train, val], edition, raw_root=root / "raw", num_processes=2 if edition == "2021" else 1,
                            progress=False)
        out[edition] = dict(root=root, train=train, val=val, res=res, before=before)
    return out


# ------------------------------------------------------------------------------------------------------------
# conversion of good input
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edition", list(LAYOUT))
def test_layout_channel_order_geometry_and_labels(converted, edition):
    c, lay = converted[edition], LAYOUT[edition]
    ds = c["root"] / "raw" / lay["dataset"]
    assert c["res"].dataset_dir == ds
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == sorted(f"{k}.nii.gz" for k in lay["train_cases"])
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == sorted(
        f"{k}_{ch:04d}.nii.gz" for k in lay["val_cases"] for ch in range(4))
    assert len(list((ds / "imagesTr").iterdir())) == 4 * len(lay["train_cases"])
    for case in lay["train_cases"]:
        for ch, mod in enumerate(lay["mods"]):   # channel ch <- the edition's file for T1, T1ce, T2, FLAIR
            src = c["train"] / case / f"{case}{lay['sep']}{mod}{lay['ext']}"
            dst = ds / "imagesTr" / f"{case}_{ch:04d}.nii.gz"
            np.testing.assert_array_equal(arr(dst), arr(src))
            assert geometry(dst) == geometry(src)
            assert 1000 * ch <= arr(dst).min() and arr(dst).max() < 1000 * (ch + 1)
        src_seg = arr(source_seg_path(c["train"], case, edition))
        out_seg = arr(ds / "labelsTr" / f"{case}.nii.gz")
        expected = np.zeros_like(src_seg)
        for brats_value, nn_value in lay["to_nn"].items():
            expected[src_seg == brats_value] = nn_value
        np.testing.assert_array_equal(out_seg, expected)
        assert set(np.unique(out_seg)) == {0, 1, 2, 3}
        assert geometry(ds / "labelsTr" / f"{case}.nii.gz") == geometry(source_seg_path(c["train"], case, edition))
    for case in lay["val_cases"]:
        np.testing.assert_array_equal(arr(ds / "imagesTs" / f"{case}_0003.nii.gz"),
                                      arr(c["val"] / case / f"{case}{lay['sep']}{lay['mods'][3]}{lay['ext']}"))


@pytest.mark.parametrize("edition", list(LAYOUT))
def test_dataset_json_declares_the_brats_regions(converted, edition):
    ds = converted[edition]["res"].dataset_dir
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    assert dj["regions_class_order"] == [1, 2, 3]
    assert dj["file_ending"] == ".nii.gz"
    assert dj["numTraining"] == len(LAYOUT[edition]["train_cases"])
    assert [dj["channel_names"][str(i)].lower() for i in range(4)] == ["t1", "t1ce", "t2", "flair"]


def test_2020_quirks_case_355_label_name_uncompressed_nii_and_csv_files(converted):
    c = converted["2020"]
    assert (c["train"] / "BraTS20_Training_355" / SEG_2020_CASE_355).is_file()
    assert not (c["train"] / "BraTS20_Training_355" / "BraTS20_Training_355_seg.nii").exists()
    ds = c["res"].dataset_dir
    assert (ds / "labelsTr" / "BraTS20_Training_355.nii.gz").is_file()
    assert c["res"].skipped == []
    # .nii inputs become .nii.gz files that are the same bytes, gzip-compressed
    import gzip
    src = c["train"] / "BraTS20_Training_354" / "BraTS20_Training_354_flair.nii"
    assert gzip.decompress((ds / "imagesTr" / "BraTS20_Training_354_0003.nii.gz").read_bytes()) == src.read_bytes()
    assert not any(p.suffix == ".csv" for p in ds.rglob("*"))


def test_2023_uses_label_3_for_enhancing(converted):
    c, lay = converted["2023-gli"], LAYOUT["2023-gli"]
    case = lay["train_cases"][0]
    src = arr(source_seg_path(c["train"], case, "2023-gli"))
    out = arr(c["res"].dataset_dir / "labelsTr" / f"{case}.nii.gz")
    assert 4 not in np.unique(src)
    np.testing.assert_array_equal(out == 3, src == 3)   # ET stays 3
    np.testing.assert_array_equal(out == 1, src == 2)   # SNFH -> 1
    np.testing.assert_array_equal(out == 2, src == 1)   # NETC -> 2


def test_nnunet_integrity_check_passes(converted, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    for edition in ("2020", "2023-gli"):
        monkeypatch.setenv("nnUNet_raw", str(converted[edition]["root"] / "raw"))
        verify_dataset_integrity(str(converted[edition]["res"].dataset_dir), num_processes=1)  # raises if not


def test_2021_is_voxel_identical_to_nnunet_dataset137(converted, tmp_path):
    """Run Dataset137_BraTS21's conversion loop (its own helper functions) on the same input and compare."""
    import nnunetv2.dataset_conversion.Dataset137_BraTS21 as d137
    c = converted["2021"]
    ref_img, ref_lab = tmp_path / "imagesTr", tmp_path / "labelsTr"
    ref_img.mkdir()
    ref_lab.mkdir()
    case_ids = sorted(p.name for p in c["train"].iterdir() if p.is_dir() and p.name.startswith("BraTS"))
    for k in case_ids:   # Dataset137's __main__ loop
        for ch, mod in enumerate(("t1", "t1ce", "t2", "flair")):
            shutil.copy(c["train"] / k / f"{k}_{mod}.nii.gz", ref_img / f"{k}_{ch:04d}.nii.gz")
        d137.copy_BraTS_segmentation_and_convert_labels_to_nnUNet(str(c["train"] / k / f"{k}_seg.nii.gz"),
                                                                  str(ref_lab / f"{k}.nii.gz"))
    ds = c["res"].dataset_dir
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == sorted(p.name for p in ref_img.iterdir())
    for p in ref_img.iterdir():
        assert (ds / "imagesTr" / p.name).read_bytes() == p.read_bytes()
    dtypes = set()
    for p in ref_lab.iterdir():
        ours, theirs = sitk.ReadImage(str(ds / "labelsTr" / p.name)), sitk.ReadImage(str(p))
        a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
        assert (ours.GetSpacing(), ours.GetOrigin(), ours.GetDirection()) == \
               (theirs.GetSpacing(), theirs.GetOrigin(), theirs.GetDirection())
        dtypes.add(str(a.dtype))
    assert dtypes == {"uint8", "float64"}   # both label pixel types of the fake input were exercised
    # back-conversion agrees with Dataset137's convert_labels_back_to_BraTS
    pred = arr(ds / "labelsTr" / f"{case_ids[0]}.nii.gz")
    np.testing.assert_array_equal(brats.map_labels(pred, brats.get_edition("2021").nnunet_to_label),
                                  d137.convert_labels_back_to_BraTS(pred))


@pytest.mark.parametrize("edition", list(LAYOUT))
def test_back_conversion_round_trip(converted, edition, tmp_path):
    c, lay = converted[edition], LAYOUT[edition]
    out = convert_predictions_to_brats(c["res"].dataset_dir / "labelsTr", tmp_path / "brats", edition,
                                       num_processes=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.nii.gz" for k in lay["train_cases"])
    for case in lay["train_cases"]:
        back = arr(out / f"{case}.nii.gz")
        np.testing.assert_array_equal(back, arr(source_seg_path(c["train"], case, edition)))
        assert set(np.unique(back)) == {0, *lay["labels"]}
    assert leftovers(tmp_path) == []


def test_source_folder_is_never_modified(converted, tmp_path):
    for edition, c in converted.items():
        assert tree_hash(c["root"] / "src") == c["before"], edition
    # also not by a failing run
    c = converted["2021"]
    with pytest.raises(BratsConversionError):
        convert_brats([c["train"]], "2021", raw_root=c["root"] / "raw", progress=False)   # exists already
    assert tree_hash(c["root"] / "src") == c["before"]


def test_folders_nested_in_the_wrong_direction_are_refused_before_anything_is_written(converted, tmp_path):
    c = converted["2021"]
    with pytest.raises(BratsConversionError, match="lies inside the BraTS source folder"):
        convert_brats([c["train"]], "2021", raw_root=c["train"] / "raw", progress=False)
    assert tree_hash(c["root"] / "src") == c["before"]
    preds = c["res"].dataset_dir / "labelsTr"
    for out in (preds / "brats", preds.parent):  # inside the predictions, or holding them
        with pytest.raises(BratsConversionError, match="must not contain, or lie inside"):
            convert_predictions_to_brats(preds, out, "2021", overwrite=True, num_processes=1, progress=False)
    assert not (preds / "brats").exists() and (preds.parent / "dataset.json").is_file()


def test_phantoms_in_2021_layout_convert_and_pass_nnunet_check(tmp_path, monkeypatch):
    """The demo's road: phantoms in BraTS 2021 layout -> convert -> nnU-Net integrity check -> back-convert."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunet_diffusion.dataset_conversion.phantoms import make_phantoms
    folders = make_phantoms(tmp_path / "src", "2021", n=2, n_val=1, seed=3, spacing=6, crop="brain", progress=False)
    res = convert_brats([folders["training"], folders["validation"]], "2021", raw_root=tmp_path / "raw",
                        progress=False)
    assert (res.num_training, res.num_test) == (2, 1)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    verify_dataset_integrity(str(res.dataset_dir), num_processes=1)
    back = convert_predictions_to_brats(res.dataset_dir / "labelsTr", tmp_path / "back", "2021", progress=False)
    for f in back.iterdir():
        case = f.name[:-len(".nii.gz")]
        np.testing.assert_array_equal(arr(f), arr(folders["training"] / case / f"{case}_seg.nii.gz"))


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------
BAD = "BraTS2021_00002"


def _bad_source(tmp_path, mutate):
    train, _ = make_source(tmp_path / "src", "2021", with_val=False)
    mutate(train / BAD)
    return train


def _img(path):
    return sitk.ReadImage(str(path))


def _rewrite(path, fn):
    img = _img(path)
    out = fn(img)
    sitk.WriteImage(out, str(path))


def _set(attr, value):
    def fn(img):
        img = sitk.Image(img)
        getattr(img, f"Set{attr}")(value)
        return img
    return fn


def _float_with(value):
    def fn(img):
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        a[3, 4, 5] = value
        out = sitk.GetImageFromArray(a)
        out.CopyInformation(img)
        return out
    return fn


def _resized(img):
    a = sitk.GetArrayFromImage(img)[:-1]
    out = sitk.GetImageFromArray(a)
    out.SetSpacing(img.GetSpacing())
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(img.GetDirection())
    return out


def _with_label(value):
    def fn(img):
        a = sitk.GetArrayFromImage(img)
        a[0, 0, 0] = value
        out = sitk.GetImageFromArray(a)
        out.CopyInformation(img)
        return out
    return fn


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * 0.6)])


BAD_INPUTS = {
    "missing modality": (lambda d: (d / f"{BAD}_t1ce.nii.gz").unlink(), f"{BAD}_t1ce.nii.gz", "missing"),
    "size": (lambda d: _rewrite(d / f"{BAD}_t2.nii.gz", _resized), f"{BAD}_t2.nii.gz",
             "size (16, 24, 19) differs from t1 (16, 24, 20)"),
    "spacing": (lambda d: _rewrite(d / f"{BAD}_flair.nii.gz", _set("Spacing", (1.0, 1.0, 1.0))),
                f"{BAD}_flair.nii.gz", "spacing"),
    "origin": (lambda d: _rewrite(d / f"{BAD}_t1ce.nii.gz", _set("Origin", (5.0, -239.0, 3.0))),
               f"{BAD}_t1ce.nii.gz", "origin"),
    "direction": (lambda d: _rewrite(d / f"{BAD}_t2.nii.gz", _set("Direction", (-1, 0, 0, 0, -1, 0, 0, 0, 1))),
                  f"{BAD}_t2.nii.gz", "direction"),
    "label geometry": (lambda d: _rewrite(d / f"{BAD}_seg.nii.gz", _set("Origin", (0.0, 0.0, 0.0))),
                       f"{BAD}_seg.nii.gz", "origin"),
    "label value": (lambda d: _rewrite(d / f"{BAD}_seg.nii.gz", _with_label(3)), f"{BAD}_seg.nii.gz",
                    "label value(s) 3 outside"),
    "nan": (lambda d: _rewrite(d / f"{BAD}_t1.nii.gz", _float_with(np.nan)), f"{BAD}_t1.nii.gz", "NaN"),
    "inf": (lambda d: _rewrite(d / f"{BAD}_flair.nii.gz", _float_with(np.inf)), f"{BAD}_flair.nii.gz", "Inf"),
    "unreadable": (lambda d: (d / f"{BAD}_t2.nii.gz").write_bytes(b"this is not a nifti file" * 10),
                   f"{BAD}_t2.nii.gz", "cannot be read"),
    # an interrupted download: header intact, voxels missing (SimpleITK alone would read it without complaint)
    "truncated": (lambda d: _truncate(d / f"{BAD}_t1.nii.gz"), f"{BAD}_t1.nii.gz", "truncated"),
    "truncated label": (lambda d: _truncate(d / f"{BAD}_seg.nii.gz"), f"{BAD}_seg.nii.gz", "truncated"),
    "missing label in a labelled folder": (lambda d: (d / f"{BAD}_seg.nii.gz").unlink(), f"{BAD}_seg.nii.gz",
                                           "missing label"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_names_case_and_file(tmp_path, kind):
    mutate, file, words = BAD_INPUTS[kind]
    train = _bad_source(tmp_path, mutate)
    before = tree_hash(train)
    with pytest.raises(BratsCaseError) as e:
        convert_brats(train, "2021", raw_root=tmp_path / "raw", progress=False)
    msg = str(e.value)
    assert msg.startswith(f"case {BAD}: file {file}: "), msg
    assert words in msg, msg
    assert isinstance(e.value, NNDiffError)
    assert not (tmp_path / "raw" / "Dataset501_BraTS2021").exists()
    assert leftovers(tmp_path / "raw") == []
    assert tree_hash(train) == before


def test_2023_label_4_is_outside_its_label_set(tmp_path):
    train, _ = make_source(tmp_path / "src", "2023-gli", with_val=False)
    case = LAYOUT["2023-gli"]["train_cases"][1]
    _rewrite(train / case / f"{case}-seg.nii.gz", _with_label(4))
    with pytest.raises(BratsCaseError, match=rf"case {case}: file {case}-seg.nii.gz: label value\(s\) 4 outside"):
        convert_brats(train, "2023-gli", raw_root=tmp_path / "raw", progress=False)


def test_unexpected_case_folder_name(tmp_path):
    train, _ = make_source(tmp_path / "src", "2021", with_val=False)
    (train / "BraTS2021_12").mkdir()
    with pytest.raises(BratsCaseError, match=r"case BraTS2021_12: unexpected folder name .*BraTS2021_00000"):
        convert_brats(train, "2021", raw_root=tmp_path / "raw", progress=False)
    # pointing at the parent folder of the training data is explained the same way
    with pytest.raises(BratsCaseError, match=LAYOUT["2021"]["train"]):
        convert_brats(train.parent, "2021", raw_root=tmp_path / "raw", progress=False)


def test_skip_bad_converts_the_rest_and_reports(tmp_path):
    train, val = make_source(tmp_path / "src", "2021")
    make_case(train, "BraTS2021_00004", "2021", seed=4)
    make_case(train, "BraTS2021_00005", "2021", seed=5)
    (train / "BraTS2021_00004" / "BraTS2021_00004_flair.nii.gz").unlink()
    _rewrite(train / "BraTS2021_00005" / "BraTS2021_00005_seg.nii.gz", _with_label(7))
    _rewrite(train / BAD / f"{BAD}_t1.nii.gz", _float_with(np.nan))
    (train / "notes").mkdir()
    res = convert_brats([train, val], "2021", raw_root=tmp_path / "raw", skip_bad=True, num_processes=2,
                        progress=False)
    report = json.loads(res.report.read_text())
    reasons = {s["case"]: (s["file"], s["reason"]) for s in report["skipped"]}
    assert set(reasons) == {"BraTS2021_00004", "BraTS2021_00005", BAD, "notes"}
    assert reasons["BraTS2021_00004"][0] == "BraTS2021_00004_flair.nii.gz"
    assert reasons["BraTS2021_00005"][0] == "BraTS2021_00005_seg.nii.gz" and "7" in reasons["BraTS2021_00005"][1]
    assert reasons[BAD][0] == f"{BAD}_t1.nii.gz" and "NaN" in reasons[BAD][1]
    good = {"BraTS2021_00000", "BraTS2021_00003"}
    assert {p.name[:-7] for p in (res.dataset_dir / "labelsTr").iterdir()} == good
    assert {p.name[:-12] for p in (res.dataset_dir / "imagesTr").iterdir()} == good
    assert json.loads((res.dataset_dir / "dataset.json").read_text())["numTraining"] == 2 == res.num_training
    assert res.num_test == 1


def test_existing_dataset_needs_overwrite(tmp_path):
    train, _ = make_source(tmp_path / "src", "2021", with_val=False)
    raw = tmp_path / "raw"
    target = raw / "Dataset501_BraTS2021"
    target.mkdir(parents=True)
    (target / "old_marker.txt").write_text("old")
    with pytest.raises(BratsConversionError, match="already exists.*--overwrite"):
        convert_brats(train, "2021", raw_root=raw, progress=False)
    assert (target / "old_marker.txt").exists()
    res = convert_brats(train, "2021", raw_root=raw, overwrite=True, progress=False)
    assert res.dataset_dir == target and not (target / "old_marker.txt").exists()
    assert len(list((target / "labelsTr").iterdir())) == 3
    assert leftovers(raw) == []
    # another dataset with the same id is refused even with --overwrite
    with pytest.raises(BratsConversionError, match="dataset id 501"):
        convert_brats(train, "2021", raw_root=raw, name="Other", overwrite=True, progress=False)


def test_custom_id_and_name(tmp_path):
    train, _ = make_source(tmp_path / "src", "2023-gli", with_val=False)
    res = convert_brats(train, "2023-gli", raw_root=tmp_path / "raw", dataset_id=77, name="GLI23", progress=False)
    assert res.dataset_dir.name == "Dataset077_GLI23"


def test_back_conversion_rejects_bad_predictions(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    a = np.zeros(SHAPE, np.uint8)
    a[2, 2, 2] = 5
    _write(a, pred / "BraTS2021_00007.nii.gz")
    (pred / "plans.json").write_text("{}")    # nnUNetv2_predict writes such files beside the predictions
    with pytest.raises(BratsCaseError, match=r"case BraTS2021_00007: file BraTS2021_00007.nii.gz: prediction value"):
        convert_predictions_to_brats(pred, tmp_path / "out", "2021", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    _write(np.zeros(SHAPE, np.uint8), pred / "case_1.nii.gz")
    with pytest.raises(BratsCaseError, match="case_1.nii.gz: not a BraTS 2021 case name"):
        convert_predictions_to_brats(pred, tmp_path / "out", "2021", progress=False)


# ------------------------------------------------------------------------------------------------------------
# interruption
# ------------------------------------------------------------------------------------------------------------
def test_interrupted_conversion_leaves_nothing_and_rerun_works(tmp_path, monkeypatch):
    train, val = make_source(tmp_path / "src", "2021")
    raw = tmp_path / "raw"
    real = brats.convert_case
    calls = []

    def interrupted_on_second_case(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(brats, "convert_case", interrupted_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        convert_brats([train, val], "2021", raw_root=raw, progress=False)
    assert len(calls) == 2
    assert list(raw.iterdir()) == []          # no dataset, no temporary folder
    monkeypatch.setattr(brats, "convert_case", real)
    res = convert_brats([train, val], "2021", raw_root=raw, progress=False)
    assert res.num_training == 3 and res.num_test == 1
    assert leftovers(raw) == []


def _children(pid: int) -> set:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_cli_killed_mid_way_leaves_no_dataset(tmp_path):
    """`nndiff convert-brats -np 2` stopped with SIGTERM (clean-up runs) and SIGKILL (no clean-up possible):
    never a DatasetNNN folder; the next run removes the dead run's temporary folder and succeeds."""
    train = tmp_path / "src" / LAYOUT["2020"]["train"]
    cases = [f"BraTS20_Training_{i:03d}" for i in range(1, 21)]
    for i, c in enumerate(cases):
        make_case(train, c, "2020", seed=i, shape=(64, 96, 96))
    raw = tmp_path / "raw"
    env = dict(os.environ, nnUNet_raw=str(raw), PYTHONWARNINGS="ignore")
    cmd = [str(NNDIFF), "convert-brats", str(train), "--edition", "2020", "-np", "2", "--no-progress"]
    target = raw / "Dataset500_BraTS2020"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            partial = list(raw.glob(".Dataset500_BraTS2020.partial-*/imagesTr/*.nii.gz")) if raw.exists() else []
            if partial:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the conversion ended before it could be interrupted"
        workers = _children(proc.pid)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert not target.exists()
        if sig == signal.SIGTERM:
            assert proc.returncode == 130, err
            assert "interrupted" in err and "Traceback" not in err
            assert leftovers(raw) == []
        else:
            assert proc.returncode == -signal.SIGKILL
            t0 = time.time()    # the pool workers notice that their parent is gone and exit
            while any(_alive(w) for w in workers) and time.time() - t0 < 15:
                time.sleep(0.1)
            lingering = [w for w in workers if _alive(w)]
            for w in lingering:
                os.kill(w, signal.SIGKILL)
            assert not lingering, "pool workers outlived the killed conversion"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((target / "labelsTr").iterdir())) == len(cases)
    assert leftovers(raw) == []


def test_cli_converts_and_reports_bad_input_without_traceback(tmp_path):
    train, val = make_source(tmp_path / "src", "2023-gli")
    raw = tmp_path / "raw"
    env = dict(os.environ, nnUNet_raw=str(raw), PYTHONWARNINGS="ignore")
    ok = subprocess.run([str(NNDIFF), "convert-brats", str(train), str(val), "--edition", "2023-gli", "-np", "1"],
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "Dataset502_BraTS2023GLI" in ok.stdout
    assert len(list((raw / "Dataset502_BraTS2023GLI" / "imagesTs").iterdir())) == 4
    case = LAYOUT["2023-gli"]["train_cases"][2]
    (train / case / f"{case}-t2f.nii.gz").unlink()
    bad = subprocess.run([str(NNDIFF), "convert-brats", str(train), "--edition", "2023-gli", "-d", "503"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        f"nndiff convert-brats: error: case {case}: file {case}-t2f.nii.gz: missing"), bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (raw / "Dataset503_BraTS2023GLI").exists()
    # back-conversion through the CLI
    labels_tr = raw / "Dataset502_BraTS2023GLI" / "labelsTr"
    back = subprocess.run([str(NNDIFF), "convert-predictions-to-brats", str(labels_tr), str(tmp_path / "back"),
                           "--edition", "2023-gli", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert back.returncode == 0, back.stderr
    assert {p.name for p in (tmp_path / "back").iterdir()} == {f"{c}.nii.gz" for c in LAYOUT["2023-gli"]["train_cases"]}
