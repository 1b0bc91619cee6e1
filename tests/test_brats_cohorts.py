"""The 2023 cohorts (SSA, PED, MEN, MET) and the 2024/2025 cluster (post-treatment GLI, PED, MET, MEN-RT, GoAT)
-> nnU-Net raw and back (dataset_conversion/brats.py, `nndiff convert-brats`).

Every test writes its own tiny case folders in the layout each cohort is shipped in. The folder and file names,
label values and label groups below are written down from the organisers' descriptions of their releases and
from brats-evaluation 0.0.10's configs (brats_evaluation/configs/config_*.yaml), not taken from the code under
test. The round trip labels -> nnU-Net regions -> painted labels uses nnU-Net's own LabelManager.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.dataset_conversion import brats
from nnunet_diffusion.dataset_conversion.brats import (BratsCaseError, BratsConversionError, convert_brats,
                                                      convert_predictions_to_brats)

SHAPE = (12, 14, 10)                      # numpy (z, y, x)
MODS_2023 = ("t1n", "t1c", "t2w", "t2f")
# the three nested BraTS regions in nnU-Net's Dataset137 labels (1 edema, 2 necrosis/NETC, 3 enhancing)
NESTED_NN = {"whole tumor": {1, 2, 3}, "tumor core": {2, 3}, "enhancing tumor": {3}}
TO_NN_2023 = {2: 1, 1: 2, 3: 3}           # 2023 labels 1 NETC, 2 SNFH, 3 ET -> Dataset137's
SAME = None                               # the 2024/2025 cluster keeps the organisers' values

COHORTS = {
    # BraTS 2023 cohorts: labels 1 NETC, 2 SNFH, 3 ET; scored on WT (1, 2, 3), TC (1, 3), ET (3)
    "2023-ssa": dict(train="ASNR-MICCAI-BraTS2023-SSA-Challenge-TrainingData_V2",
                     val="BraTS2024-SSA-Challenge-ValidationData",
                     cases=["BraTS-SSA-00002-000", "BraTS-SSA-00007-000"], val_cases=["BraTS-SSA-00126-000"],
                     sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3), to_nn=TO_NN_2023,
                     dataset="Dataset510_BraTS2023SSA", regions=NESTED_NN, unknown=4),
    "2023-ped": dict(train="ASNR-MICCAI-BraTS2023-PED-Challenge-TrainingData",
                     val="ASNR-MICCAI-BraTS2023-PED-Challenge-ValidationData",
                     cases=["BraTS-PED-00002-000", "BraTS-PED-00004-000"], val_cases=["BraTS-PED-00210-000"],
                     sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3), to_nn=TO_NN_2023,
                     dataset="Dataset511_BraTS2023PED", regions=NESTED_NN, unknown=4),
    "2023-men": dict(train="ASNR-MICCAI-BraTS2023-MEN-Challenge-TrainingData",
                     val="ASNR-MICCAI-BraTS2023-MEN-Challenge-ValidationData",
                     cases=["BraTS-MEN-00000-000", "BraTS-MEN-00008-001"], val_cases=["BraTS-MEN-01001-000"],
                     sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3), to_nn=TO_NN_2023,
                     dataset="Dataset512_BraTS2023MEN", regions=NESTED_NN, unknown=4, config="MenPre"),
    "2023-met": dict(train="ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData",
                     val="ASNR-MICCAI-BraTS2023-MET-Challenge-ValidationData",
                     cases=["BraTS-MET-00001-000", "BraTS-MET-00018-000"], val_cases=["BraTS-MET-00137-000"],
                     sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3), to_nn=TO_NN_2023,
                     dataset="Dataset513_BraTS2023MET", regions=NESTED_NN, unknown=4),
    # post-treatment glioma: 1 NETC, 2 SNFH, 3 ET, 4 RC; config_gli: snfh [2], et [3], netc [1], rc [4],
    # tc [1, 3], wt [1, 2, 3]
    "2024-gli": dict(train="BraTS2024-BraTS-GLI-TrainingData/training_data1_v2",
                     val="BraTS2024-BraTS-GLI-ValidationData/validation_data",
                     cases=["BraTS-GLI-00005-100", "BraTS-GLI-02251-100", "BraTS-GLI-02251-101"],
                     val_cases=["BraTS-GLI-03100-100"], sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3, 4),
                     to_nn=SAME, dataset="Dataset514_BraTS2024GLI", unknown=5, config="gli",
                     regions={"whole tumor": {1, 2, 3}, "tumor core": {1, 3}, "enhancing tumor": {3},
                              "non-enhancing tumor core": {1}, "surrounding non-enhancing FLAIR hyperintensity": {2},
                              "resection cavity": {4}}),
    # paediatric 2024: 1 ET, 2 NETC (NET), 3 CC, 4 ED; config_ped: et [1], netc [2], cc [3], ed [4], tc [1, 2, 3],
    # wt [1, 2, 3, 4]
    "2024-ped": dict(train="BraTS2024-PED-Challenge-TrainingData/BraTS-PEDs2024_Training",
                     val="BraTS2024-PED-Challenge-ValidationData",
                     cases=["BraTS-PED-00001-000", "BraTS-PED-00030-000"], val_cases=["BraTS-PED-00267-000"],
                     sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3, 4), to_nn=SAME,
                     dataset="Dataset515_BraTS2024PED", unknown=5, config="ped",
                     regions={"whole tumor": {1, 2, 3, 4}, "tumor core": {1, 2, 3}, "enhancing tumor": {1},
                              "non-enhancing tumor core": {2}, "cystic component": {3}, "edema": {4}}),
    # metastases 2024/2025: 1 NETC, 2 SNFH, 3 ET, 4 RC; config_mets: et [3], rc [4], tc [1, 3], wt [1, 2, 3]
    "2024-met": dict(train="MICCAI-LH-BraTS2025-MET-Challenge-Training",
                     val="MICCAI-LH-BraTS2025-MET-Challenge-Validation",
                     cases=["BraTS-MET-00001-000", "BraTS-MET-01094-003"], val_cases=["BraTS-MET-01300-000"],
                     sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3, 4), to_nn=SAME,
                     dataset="Dataset516_BraTS2024MET", unknown=5, config="mets",
                     regions={"whole tumor": {1, 2, 3}, "tumor core": {1, 3}, "enhancing tumor": {3},
                              "resection cavity": {4}}),
    # meningioma radiotherapy: one T1 post-contrast image, label 1 GTV in <case>_gtv.nii.gz; config_MenRT: gtv [1]
    "2024-men-rt": dict(train="BraTS2024-MEN-RT-TrainingData/BraTS-MEN-RT-Train-v2",
                        val="BraTS2024-MEN-RT-ValidationData/BraTS-MEN-RT-Val-v1",
                        cases=["BraTS-MEN-RT-0004-1", "BraTS-MEN-RT-0060-1"], val_cases=["BraTS-MEN-RT-0501-1"],
                        sep="_", mods=("t1c",), seg="gtv", labels=(1,), to_nn=SAME,
                        dataset="Dataset517_BraTS2024MENRT", unknown=2, config="MenRT",
                        regions={"gross tumor volume": {1}}),
    # generalizability across tumours: 1 NCR, 2 ED, 3 ET, no timepoint suffix; config_GoAT: et [3], tc [1, 3],
    # wt [1, 2, 3]
    "2024-goat": dict(train="MICCAI2024-BraTS-GoAT-TrainingData-With-GroundTruth",
                      val="MICCAI2024-BraTS-GoAT-TrainingData-WithOut-GroundTruth",
                      cases=["BraTS-GoAT-00000", "BraTS-GoAT-00063"], val_cases=["BraTS-GoAT-02489"],
                      sep="-", mods=MODS_2023, seg="seg", labels=(1, 2, 3), to_nn=SAME,
                      dataset="Dataset518_BraTS2024GoAT", unknown=4, config="GoAT",
                      regions={"whole tumor": {1, 2, 3}, "tumor core": {1, 3}, "enhancing tumor": {3}}),
}


def to_nn(cohort: str) -> dict:
    c = COHORTS[cohort]
    return c["to_nn"] or {v: v for v in c["labels"]}


def _write(arr, path, spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-3.0, -239.0, 7.5))
    img.SetDirection([float(d) for d in direction])
    sitk.WriteImage(img, str(path), useCompression=True)


def make_case(root: Path, case: str, cohort: str, seed: int, with_seg=True) -> Path:
    """One case folder: the cohort's modalities (modality m has values in [1000 m, 1000 m + 999]) and a label
    holding every one of the cohort's values. MEN-RT's images are in native space: anisotropic, oblique."""
    c = COHORTS[cohort]
    rng = np.random.default_rng(seed)
    folder = root / case
    folder.mkdir(parents=True)
    geo = dict(spacing=(0.5, 0.5, 1.2), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1)) if cohort == "2024-men-rt" else {}
    for m, mod in enumerate(c["mods"]):
        _write((rng.integers(0, 1000, SHAPE) + 1000 * m).astype(np.int16), folder / f"{case}{c['sep']}{mod}.nii.gz",
               **geo)
    if with_seg:
        values = np.array((0, *c["labels"]))
        seg = rng.choice(values, size=SHAPE).astype(np.uint8)
        seg.ravel()[:len(values)] = values               # every value present
        _write(seg, folder / f"{case}{c['sep']}{c['seg']}.nii.gz", **geo)
    return folder


def make_source(root: Path, cohort: str, with_val=True):
    c = COHORTS[cohort]
    train, val = root / c["train"], root / c["val"]
    for i, case in enumerate(c["cases"]):
        make_case(train, case, cohort, seed=i)
    if with_val:
        for i, case in enumerate(c["val_cases"]):
            make_case(val, case, cohort, seed=100 + i, with_seg=False)
    return train, val


def arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for cohort in COHORTS:
        root = tmp_path_factory.mktemp(cohort)
        train, val = make_source(root / "src", cohort)
        res = convert_brats([train, val], cohort, raw_root=root / "raw", progress=False)
        out[cohort] = dict(root=root, train=train, val=val, res=res)
    return out


# ------------------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cohort", list(COHORTS))
def test_layout_labels_and_dataset_json(converted, cohort):
    c, lay = converted[cohort], COHORTS[cohort]
    ds = c["res"].dataset_dir
    assert ds.name == lay["dataset"]
    n_ch = len(lay["mods"])
    for case in lay["cases"]:
        for ch, mod in enumerate(lay["mods"]):
            assert (ds / "imagesTr" / f"{case}_{ch:04d}.nii.gz").read_bytes() == \
                   (c["train"] / case / f"{case}{lay['sep']}{mod}.nii.gz").read_bytes()
        assert not (ds / "imagesTr" / f"{case}_{n_ch:04d}.nii.gz").exists()
        src = arr(c["train"] / case / f"{case}{lay['sep']}{lay['seg']}.nii.gz")
        out = arr(ds / "labelsTr" / f"{case}.nii.gz")
        for value, nn_value in to_nn(cohort).items():
            np.testing.assert_array_equal(out == nn_value, src == value)
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == sorted(
        f"{case}_{ch:04d}.nii.gz" for case in lay["val_cases"] for ch in range(n_ch))

    dj = json.loads((ds / "dataset.json").read_text())
    assert len(dj["channel_names"]) == n_ch and dj["numTraining"] == len(lay["cases"])
    regions = {k: set(v) if isinstance(v, list) else {v} for k, v in dj["labels"].items() if k != "background"}
    assert regions == lay["regions"] and dj["labels"]["background"] == 0
    assert dj["brats_edition"] == cohort
    cluster = cohort.startswith("2024")
    assert dj.get("brats_lesionwise_convention") == ("panoptica" if cluster else None)
    assert dj.get("brats_evaluator_config") == lay.get("config")
    report = json.loads(c["res"].report.read_text())
    assert set(report["brats_labels"].values()) == set(lay["labels"])


def test_men_rt_is_one_t1c_channel_and_one_plain_label(converted):
    dj = json.loads((converted["2024-men-rt"]["res"].dataset_dir / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T1ce"}
    assert dj["labels"] == {"background": 0, "gross tumor volume": 1} and "regions_class_order" not in dj
    case = COHORTS["2024-men-rt"]["cases"][0]
    img = sitk.ReadImage(str(converted["2024-men-rt"]["res"].dataset_dir / "labelsTr" / f"{case}.nii.gz"))
    assert img.GetSpacing() == pytest.approx((0.5, 0.5, 1.2)) and img.GetDirection() == (0, 1, 0, -1, 0, 0, 0, 0, 1)


def _paint_with_nnunet(dataset_json: dict, label_map: np.ndarray) -> np.ndarray:
    """What nnU-Net makes of a perfect prediction of ``label_map``: its regions (or one-hot labels) as
    probabilities, turned into a segmentation by LabelManager.convert_probabilities_to_segmentation."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    if lm.has_regions:
        probs = [np.isin(label_map, np.atleast_1d(r)) for r in lm.foreground_regions]
    else:
        probs = [label_map == v for v in lm.all_labels]
    return np.asarray(lm.convert_probabilities_to_segmentation(np.stack(probs).astype(np.float32)))


@pytest.mark.parametrize("cohort", list(COHORTS))
def test_every_label_survives_regions_painting_and_back_conversion(converted, cohort, tmp_path):
    """raw labels -> nnU-Net labelsTr -> the dataset's regions -> nnU-Net's painting in regions_class_order ->
    convert-predictions-to-brats: every voxel's label comes back (the resection cavity, disjoint from the tumour,
    included)."""
    c, lay = converted[cohort], COHORTS[cohort]
    ds = c["res"].dataset_dir
    dj = json.loads((ds / "dataset.json").read_text())
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in lay["cases"]:
        ref = sitk.ReadImage(str(ds / "labelsTr" / f"{case}.nii.gz"))
        painted = _paint_with_nnunet(dj, sitk.GetArrayFromImage(ref))
        np.testing.assert_array_equal(painted, sitk.GetArrayFromImage(ref))
        out = sitk.GetImageFromArray(painted.astype(np.uint8))
        out.CopyInformation(ref)
        sitk.WriteImage(out, str(pred / f"{case}.nii.gz"))
    back = convert_predictions_to_brats(pred, tmp_path / "submission", cohort, progress=False)
    assert sorted(p.name for p in back.iterdir()) == sorted(f"{case}.nii.gz" for case in lay["cases"])
    for case in lay["cases"]:
        src = c["train"] / case / f"{case}{lay['sep']}{lay['seg']}.nii.gz"
        np.testing.assert_array_equal(arr(back / f"{case}.nii.gz"), arr(src))
        assert sitk.ReadImage(str(back / f"{case}.nii.gz")).GetSpacing() == sitk.ReadImage(str(src)).GetSpacing()


@pytest.mark.parametrize("cohort", ["2024-gli", "2024-ped", "2024-men-rt"])
def test_nnunet_integrity_check_passes(converted, cohort, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    monkeypatch.setenv("nnUNet_raw", str(converted[cohort]["root"] / "raw"))
    verify_dataset_integrity(str(converted[cohort]["res"].dataset_dir), num_processes=1)   # raises if not


# ------------------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cohort", list(COHORTS))
def test_unknown_label_and_missing_modality_name_case_and_file(tmp_path, cohort):
    lay = COHORTS[cohort]
    train, _ = make_source(tmp_path / "src", cohort, with_val=False)
    case = lay["cases"][-1]
    seg = train / case / f"{case}{lay['sep']}{lay['seg']}.nii.gz"
    a = arr(seg)
    a[0, 0, 0] = lay["unknown"]
    _write(a, seg, **({"spacing": (0.5, 0.5, 1.2), "direction": (0, 1, 0, -1, 0, 0, 0, 0, 1)}
                      if cohort == "2024-men-rt" else {}))
    with pytest.raises(BratsCaseError, match=rf"case {case}: file {seg.name}: label value\(s\) {lay['unknown']} "
                                             r"outside the .* label set"):
        convert_brats(train, cohort, raw_root=tmp_path / "raw", progress=False)
    first = lay["cases"][0]
    last_mod = f"{first}{lay['sep']}{lay['mods'][-1]}.nii.gz"
    (train / first / last_mod).unlink()
    n = len(lay["mods"])
    with pytest.raises(BratsCaseError, match=rf"case {first}: file {last_mod}: missing modality file \(1 of {n} "):
        convert_brats(train, cohort, raw_root=tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw" / lay["dataset"]).exists()


def test_skip_bad_leaves_out_a_2025_met_case_without_t2w(tmp_path):
    """Some 2025 MET cases ship without t2w: refused like any missing modality, left out with --skip-bad."""
    train, val = make_source(tmp_path / "src", "2024-met")
    case = COHORTS["2024-met"]["cases"][1]
    (train / case / f"{case}-t2w.nii.gz").unlink()
    res = convert_brats([train, val], "2024-met", raw_root=tmp_path / "raw", skip_bad=True, progress=False)
    assert res.num_training == 1 and [s["case"] for s in res.skipped] == [case]
    assert res.skipped[0]["file"] == f"{case}-t2w.nii.gz"


def test_a_cohort_folder_under_another_edition_is_refused(tmp_path):
    train, _ = make_source(tmp_path / "src", "2024-men-rt", with_val=False)
    with pytest.raises(BratsCaseError, match=r"case BraTS-MEN-RT-0004-1: unexpected folder name .*BraTS-MEN-00000"):
        convert_brats(train, "2023-men", raw_root=tmp_path / "raw", progress=False)
    train, _ = make_source(tmp_path / "src2", "2024-goat", with_val=False)
    with pytest.raises(BratsCaseError, match="unexpected folder name"):
        convert_brats(train, "2024-gli", raw_root=tmp_path / "raw", progress=False)


def test_groups_nnunet_cannot_express_are_refused():
    gli = brats.get_edition("2024-gli")
    no_rc = dataclasses.replace(gli, groups=tuple(g for g in gli.groups if g[0] != "rc"))
    with pytest.raises(BratsConversionError, match=r"label\(s\) 4 belong to no evaluation group"):
        brats.region_layout(no_rc)
    only_wt = dataclasses.replace(gli, groups=(("wt", "whole tumor", (1, 2, 3)), ("rc", "resection cavity", (4,))))
    with pytest.raises(BratsConversionError, match="no region tells labels 1, 2, 3 apart"):
        brats.region_layout(only_wt)


def test_back_conversion_refuses_values_outside_the_cohort(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    a = np.zeros(SHAPE, np.uint8)
    a[1, 1, 1] = 5
    _write(a, pred / "BraTS-GLI-02251-100.nii.gz")
    with pytest.raises(BratsCaseError, match=r"case BraTS-GLI-02251-100: file BraTS-GLI-02251-100.nii.gz: prediction "
                                             r"value\(s\) 5 outside nnU-Net's BraTS labels \{0, 1, 2, 3, 4\}"):
        convert_predictions_to_brats(pred, tmp_path / "out", "2024-gli", progress=False)
    a[1, 1, 1] = 2
    _write(a, pred / "BraTS-GLI-02251-100.nii.gz")
    with pytest.raises(BratsCaseError, match="not a BraTS 2024 meningioma radiotherapy"):
        convert_predictions_to_brats(pred, tmp_path / "out2", "2024-men-rt", progress=False)


def test_cli_offers_every_cohort_and_phantoms_only_where_they_exist(tmp_path, capsys):
    from nnunet_diffusion.cli import main
    train, val = make_source(tmp_path / "src", "2024-men-rt")
    assert main(["convert-brats", str(train), str(val), "--edition", "2024-men-rt", "--raw", str(tmp_path / "raw"),
                 "-np", "1", "--no-progress"]) == 0
    assert "Dataset517_BraTS2024MENRT: 2 training case(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert-brats", "--help"])
    out = capsys.readouterr().out
    assert all(k in out for k in COHORTS)
    with pytest.raises(SystemExit) as e:
        main(["make-phantoms", str(tmp_path / "ph"), "--edition", "2024-ped"])
    assert e.value.code == 2 and "invalid choice: '2024-ped'" in capsys.readouterr().err
