"""Per-mask metrics and folder evaluation: known answers on hand-built masks, empty-mask conventions, errors, and
agreement with the official BraTS package (brats-evaluation) where it is installed.

Every expected value below is worked out by hand in the comment next to it.
"""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.dataset_conversion.synthetic import BRATS_REGIONS_DATASET_JSON, make_case
from nnunet_diffusion.evaluation.evaluate import (EvaluationError, evaluate_case, evaluate_folder,
                                                  regions_from_dataset_json)
from nnunet_diffusion.evaluation.metrics import (BRATS_EMPTY_HD95, hd95, mask_metrics, overlap_counts,
                                                 region_mask)


def write(array, path, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, str(path))


# ---------------------------------------------------------------------------------------------------- overlap


def test_overlap_metrics_on_shifted_box():
    # reference: a 4×4×4 box (64 voxels); prediction: the same box shifted by one voxel along axis 0
    # overlap = 3×4×4 = 48 voxels: tp 48, fp 16, fn 16, tn 1000 − 80 = 920
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:6] = True
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 2:6] = True
    assert overlap_counts(pred, ref) == (48, 16, 16, 920)
    m = mask_metrics(pred, ref, spacing=(2.0, 1.0, 0.5))
    assert m["dice"] == pytest.approx(96 / 128)          # 2·48 / (64 + 64)
    assert m["iou"] == pytest.approx(48 / 80)            # 48 / (48 + 16 + 16)
    assert m["vs"] == pytest.approx(1.0)                 # equal volumes
    assert m["pa"] == pytest.approx(968 / 1000)          # (48 + 920) / 1000
    assert m["sensitivity"] == pytest.approx(48 / 64)
    assert m["specificity"] == pytest.approx(920 / 936)  # 920 / (920 + 16)
    assert m["volume_pred"] == pytest.approx(64 * 1.0)   # 64 voxels × 2·1·0.5 mm³
    assert m["volume_ref"] == pytest.approx(64 * 1.0)


def test_volumetric_similarity_with_unequal_volumes():
    # reference 8 voxels, prediction 24 voxels containing it: VS = 1 − |24 − 8| / (24 + 8) = 0.5 (NNDM Table 1)
    ref = np.zeros((6, 6, 6), bool)
    ref[1:3, 1:3, 1:3] = True
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:5] = True
    pred[1:3, 3:5, 1:3] = True                            # 8 + 8 + 8 = 24 voxels
    m = mask_metrics(pred, ref)
    assert m["vs"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(16 / 32)           # 2·8 / (24 + 8)
    assert m["iou"] == pytest.approx(8 / 24)


def test_miou_is_the_mean_iou_over_background_and_lesion():
    # DDMD Table 1 reports Miou above Dice in every row, which a foreground IoU never is (IoU = D / (2 − D) <= D):
    # the paper's Miou is the semantic-segmentation mIoU, the mean of the lesion's and the background's IoU.
    # 10 voxels; reference = voxels 0–3, prediction = voxels 1–5: tp 3 (1–3), fp 2 (4, 5), fn 1 (0), tn 4 (6–9)
    ref = np.zeros(10, bool)
    ref[0:4] = True
    pred = np.zeros(10, bool)
    pred[1:6] = True
    m = mask_metrics(pred, ref)
    assert m["dice"] == pytest.approx(6 / 9)               # 2·3 / (2·3 + 2 + 1)
    assert m["iou"] == pytest.approx(3 / 6)                # lesion (foreground) IoU: 3 / (3 + 2 + 1)
    # background IoU: |pred bg ∩ ref bg| / |pred bg ∪ ref bg| = tn / (tn + fp + fn) = 4 / 7;  mIoU = (1/2 + 4/7) / 2
    assert m["miou"] == pytest.approx(15 / 28)
    # the same lesion in a 100-voxel image (tn 94): mIoU = (1/2 + 94/97) / 2 = 285/388 ≈ 0.735 > Dice 2/3 > IoU,
    # the ordering of every row of DDMD Table 1 (mostly background images)
    ref100, pred100 = np.zeros(100, bool), np.zeros(100, bool)
    ref100[0:4], pred100[1:6] = True, True
    m = mask_metrics(pred100, ref100)
    assert m["miou"] == pytest.approx(285 / 388)
    assert m["iou"] < m["dice"] < m["miou"]


def test_miou_on_shifted_box_and_empty_masks():
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:6] = True
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 2:6] = True
    # tp 48, fp 16, fn 16, tn 920: lesion IoU 48/80, background IoU 920/952
    assert mask_metrics(pred, ref)["miou"] == pytest.approx((48 / 80 + 920 / 952) / 2)
    empty = np.zeros(10, bool)
    four = np.zeros(10, bool)
    four[:4] = True
    # both empty: lesion IoU 1 (BraTS convention), background IoU 10/10 → 1
    assert mask_metrics(empty, empty)["miou"] == 1.0
    # only the prediction empty: lesion IoU 0, background IoU = 6 / (6 + 4) → 0.3
    assert mask_metrics(empty, four)["miou"] == pytest.approx(0.3)
    # only the reference empty: lesion IoU 0, background 6 / 10 → 0.3
    assert mask_metrics(four, empty)["miou"] == pytest.approx(0.3)
    # everything lesion on both sides: lesion IoU 1, no background on either side (IoU of two empty sets: 1)
    assert mask_metrics(~empty, ~empty)["miou"] == 1.0
    # ignored voxels count for neither class: ignore voxels 6–9 of the only-prediction-empty case → bg 2 / 6
    ignore = np.zeros(10, bool)
    ignore[6:] = True
    assert mask_metrics(empty, four, ignore=ignore)["miou"] == pytest.approx((0 + 2 / 6) / 2)


def test_compare_table_reports_miou_next_to_iou():
    import pandas as pd
    from nnunet_diffusion.evaluation.compare import COMPARE_METRICS, _summaries, compare_table, paired_differences
    from nnunet_diffusion.evaluation.evaluate import conventions
    assert ("miou", "mIoU (%)") in COMPARE_METRICS and ("iou", "IoU (%)") in COMPARE_METRICS
    base = dict(dice=0.5, iou=1 / 3, hd95=1.0, vs=1.0, pa=0.9, sensitivity=0.5, specificity=1.0, volume_pred=1.0,
                volume_ref=1.0)
    rows = [dict(base, trainer=t, fold="0", case=c, region="r", miou=v)
            for t, c, v in (("A", "x", 0.6), ("A", "y", 0.8), ("B", "x", 0.7), ("B", "y", 0.9))]
    df = pd.DataFrame(rows)
    stats = _summaries(df, ["A", "B"], ["r"])
    paired = paired_differences(df, ["A", "B"], "A", ["r"])
    table = compare_table(stats, paired, ["A", "B"], "A", ["r"], ["0"], "D", conventions("brats", 373.0))
    assert "| Method | DSC (%) | HD95 (mm) | VS (%) | IoU (%) | mIoU (%) | n |" in table
    assert "| A | 50.00 ± 0.00 | 1.00 ± 0.00 | 100.00 ± 0.00 | 33.33 ± 0.00 | 70.00 ± 14.14 | 2 |" in table
    # B − A: mIoU +10 points on both cases (std 0; Wilcoxon p of two equal non-zero differences: 0.5)
    assert "| +10.00 ± 0.00 | 0.5 |" in table
    assert "mIoU" in table.split("Notes:")[1]  # the notes define it


# ---------------------------------------------------------------------------------------------------- HD95


def _plane(shape, axis, index):
    m = np.zeros(shape, bool)
    sl = [slice(None)] * 3
    sl[axis] = index
    m[tuple(sl)] = True
    return m


@pytest.mark.parametrize("axis,shift,spacing,expected", [
    (0, 2, (3.0, 1.0, 0.5), 6.0),     # 2 voxels × 3 mm along axis 0
    (1, 3, (3.0, 1.0, 0.5), 3.0),     # 3 voxels × 1 mm along axis 1
    (2, 4, (3.0, 1.0, 0.5), 2.0),     # 4 voxels × 0.5 mm along axis 2
])
@pytest.mark.parametrize("mode", ["brats", "monai"])
def test_hd95_parallel_planes_anisotropic(axis, shift, spacing, expected, mode):
    # two one-voxel-thick full planes: every surface voxel is exactly shift·spacing[axis] from the other plane,
    # so every directed surface distance, and hence HD95 in either mode, equals that
    shape = (12, 12, 12)
    ref, pred = _plane(shape, axis, 2), _plane(shape, axis, 2 + shift)
    assert hd95(pred, ref, spacing, mode=mode) == pytest.approx(expected)


def test_hd95_single_voxels_diagonal_anisotropic():
    # voxels (1, 1, 1) and (2, 3, 3) with spacing (2, 1, 1) mm: √((1·2)² + (2·1)² + (2·1)²) = √12 mm
    ref = np.zeros((6, 6, 6), bool)
    pred = np.zeros_like(ref)
    ref[1, 1, 1] = True
    pred[2, 3, 3] = True
    assert hd95(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(12))


def test_hd95_pooled_versus_directed_percentile():
    # reference: the full 10×10 plane at axis-0 index 2 (100 surface voxels); prediction: that plane plus 11
    # voxels at axis-0 index 8 (6 mm away). Directed distances: prediction→reference = 100 zeros and 11 sixes,
    # reference→prediction = 100 zeros (the plane is in the prediction).
    # "brats" (pooled, 211 values: 200 zeros then 11 sixes): position 0.95·210 = 199.5 → halfway 0 → 6 = 3 mm.
    # "monai" (max of directed 95th percentiles): prediction→reference position 0.95·110 = 104.5, both
    # neighbours (sorted index 104 and 105) are sixes → 6 mm; reference→prediction → 0. Max = 6 mm.
    shape = (12, 10, 10)
    ref = _plane(shape, 0, 2)
    pred = ref.copy()
    pred[8, 0, :] = True          # 10 voxels
    pred[8, 5, 5] = True          # 11th voxel
    assert hd95(pred, ref, 1.0, mode="brats") == pytest.approx(3.0)
    assert hd95(pred, ref, 1.0, mode="monai") == pytest.approx(6.0)


# ---------------------------------------------------------------------------------------------------- empty masks


def test_empty_mask_conventions():
    shape = (8, 8, 8)
    empty = np.zeros(shape, bool)
    some = np.zeros(shape, bool)
    some[2:4, 2:4, 2:4] = True  # 8 voxels of 512

    both = mask_metrics(empty, empty)
    # BraTS challenge convention for a correctly empty region: perfect overlap, zero distance
    assert (both["dice"], both["iou"], both["vs"], both["hd95"]) == (1.0, 1.0, 1.0, 0.0)
    assert math.isnan(both["sensitivity"])  # no reference voxel: undefined
    assert both["pa"] == 1.0 and both["specificity"] == 1.0

    only_pred_empty = mask_metrics(empty, some)
    assert (only_pred_empty["dice"], only_pred_empty["iou"], only_pred_empty["vs"]) == (0.0, 0.0, 0.0)
    assert only_pred_empty["hd95"] == BRATS_EMPTY_HD95 == 373.0  # brats-evaluation's penalty for an infinite HD95
    assert only_pred_empty["sensitivity"] == 0.0
    assert only_pred_empty["pa"] == pytest.approx(504 / 512)

    only_ref_empty = mask_metrics(some, empty)
    assert (only_ref_empty["dice"], only_ref_empty["iou"], only_ref_empty["vs"]) == (0.0, 0.0, 0.0)
    assert only_ref_empty["hd95"] == 373.0
    assert math.isnan(only_ref_empty["sensitivity"])
    assert only_ref_empty["specificity"] == pytest.approx(504 / 512)

    assert mask_metrics(empty, some, empty_hd95=373.13)["hd95"] == 373.13  # legacy BraTS toolkits' value
    assert hd95(some, empty, mode="monai") == 373.0


# ---------------------------------------------------------------------------------------------------- regions


def test_regions_and_labels_from_dataset_json():
    regions, ignore = regions_from_dataset_json(BRATS_REGIONS_DATASET_JSON)
    assert regions == [("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)), ("enhancing tumor", (3,))]
    assert ignore is None
    plain = {"labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}, "file_ending": ".nii.gz"}
    regions, ignore = regions_from_dataset_json(plain)
    assert regions == [("liver", 1), ("tumour", 2)] and ignore == 3

    seg = np.array([0, 1, 2, 3, 1])
    assert region_mask(seg, (2, 3)).tolist() == [False, False, True, True, False]
    assert region_mask(seg, 1).tolist() == [False, True, False, False, True]


def test_evaluate_case_uses_image_spacing_in_xyz_order(tmp_path):
    # SimpleITK spacing (x, y, z) = (0.5, 1, 3): the array's axis 0 is z at 3 mm. Planes 2 slices apart along z
    # are 6 mm apart; the 1-voxel-thick reference plane of 10×10 voxels has 100 × 0.5·1·3 = 150 mm³.
    shape = (12, 10, 10)
    write(_plane(shape, 0, 2), tmp_path / "ref.nii.gz", spacing=(0.5, 1.0, 3.0))
    write(_plane(shape, 0, 4), tmp_path / "pred.nii.gz", spacing=(0.5, 1.0, 3.0))
    rows = evaluate_case("c", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", [("fg", 1)])
    assert rows[0]["hd95"] == pytest.approx(6.0)
    assert rows[0]["volume_ref"] == pytest.approx(150.0)
    assert rows[0]["dice"] == 0.0


# ---------------------------------------------------------------------------------------------------- folders


@pytest.fixture
def brats_folders(tmp_path):
    """Two cases with BraTS labels (1 oedema, 2 necrosis, 3 enhancing), spacing (x, y, z) = (1, 1, 2):
    case_a: reference = 4×4×4 oedema box with a 2×2×2 enhancing core; the prediction lacks the core (oedema there)
            → whole tumour identical, enhancing only in the reference;
    case_b: reference and prediction = the same box, no enhancing anywhere → enhancing empty on both sides."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    box = np.zeros((8, 8, 8), np.uint8)
    box[2:6, 2:6, 2:6] = 1
    core = box.copy()
    core[3:5, 3:5, 3:5] = 3
    write(core, ref_dir / "case_a.nii.gz", (1, 1, 2))
    write(box, pred_dir / "case_a.nii.gz", (1, 1, 2))
    write(box, ref_dir / "case_b.nii.gz", (1, 1, 2))
    write(box, pred_dir / "case_b.nii.gz", (1, 1, 2))
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps(BRATS_REGIONS_DATASET_JSON))
    return pred_dir, ref_dir, dj


def test_evaluate_folder_outputs_and_known_values(brats_folders, tmp_path):
    import pandas as pd
    pred_dir, ref_dir, dj = brats_folders
    out = tmp_path / "out"
    res = evaluate_folder(pred_dir, ref_dir, out, dataset_json=dj, num_processes=1, progress=False)
    df = pd.read_csv(out / "per_case.csv")
    # a BraTS region dataset: lesion-wise metrics are on by default (convention brats2023, cohort GLI)
    assert list(df.columns) == ["case", "region", "dice", "iou", "miou", "hd95", "vs", "pa", "sensitivity",
                                "specificity", "volume_pred", "volume_ref", "lesionwise_dice", "lesionwise_hd95",
                                "n_ref_lesions", "lesion_tp", "lesion_fn", "lesion_fp"]
    assert len(df) == 6  # 2 cases × 3 regions
    row = df[(df.case == "case_a") & (df.region == "whole tumor")].iloc[0]
    assert (row.dice, row.hd95) == (1.0, 0.0)
    assert row.volume_ref == pytest.approx(64 * 2.0)  # 64 voxels × 1·1·2 mm³
    et_a = df[(df.case == "case_a") & (df.region == "enhancing tumor")].iloc[0]
    assert (et_a.dice, et_a.hd95, et_a.volume_pred, et_a.volume_ref) == (0.0, 373.0, 0.0, 16.0)
    # mIoU: lesion IoU 0, background IoU (512 − 8) / 512 (the 8 enhancing voxels missed) → 252 / 512
    assert et_a.miou == pytest.approx(252 / 512, abs=1e-6) and row.miou == 1.0  # per_case.csv: 6 digits
    et_b = df[(df.case == "case_b") & (df.region == "enhancing tumor")].iloc[0]
    assert (et_b.dice, et_b.hd95) == (1.0, 0.0)
    # tumour core (2, 3) = the enhancing core here, so identical to enhancing
    tc = df[df.region == "tumor core"].set_index("case")
    assert tc.loc["case_a", "dice"] == 0.0 and tc.loc["case_b", "dice"] == 1.0
    # lesion-wise (BraTS 2023 rule, GLI): voxels are 1·1·2 = 2 mm³. Whole tumour: one 64-voxel lesion (128 mm³,
    # kept), predicted exactly in both cases → Dice 1, HD95 0, TP 1. Tumour core and enhancing of case_a: the 2×2×2
    # core is 16 mm³ <= 50 mm³ → dropped; nothing predicted, so no false positive → Dice 1, HD95 0 and no lesion
    # counted (while the whole-region Dice is 0 and HD95 373). case_b: both empty → Dice 1, HD95 0.
    assert (df.lesionwise_dice == 1.0).all() and (df.lesionwise_hd95 == 0.0).all()
    wt = df[df.region == "whole tumor"]
    assert (wt.n_ref_lesions == 1).all() and (wt.lesion_tp == 1).all() and (wt.lesion_fn == 0).all()
    assert (df[df.region != "whole tumor"].n_ref_lesions == 0).all()
    lesions = pd.read_csv(out / "per_lesion.csv")
    assert list(lesions.columns) == ["case", "region", "lesion", "kind", "volume_mm3", "matched", "dice", "hd95",
                                     "counted", "n_pred_components"]
    assert lesions[["case", "region", "volume_mm3", "matched", "dice", "hd95", "counted"]].values.tolist() == [
        ["case_a", "whole tumor", 128.0, True, 1.0, 0.0, True],
        ["case_a", "tumor core", 16.0, False, 0.0, 374.0, False],
        ["case_a", "enhancing tumor", 16.0, False, 0.0, 374.0, False],
        ["case_b", "whole tumor", 128.0, True, 1.0, 0.0, True]]

    summary = json.loads((out / "summary.json").read_text())
    et = summary["metrics"]["enhancing tumor"]
    assert et["dice"]["mean"] == pytest.approx(0.5)            # (0 + 1) / 2
    assert et["dice"]["std"] == pytest.approx(math.sqrt(0.5))  # sample std of {0, 1}
    assert et["hd95"]["mean"] == pytest.approx(186.5)          # (373 + 0) / 2
    assert et["dice"]["median"] == pytest.approx(0.5)
    assert et["sensitivity"]["n"] == 1 and et["sensitivity"]["n_nan"] == 1  # case_b: undefined
    # mean over regions per case: case_a (1 + 0 + 0) / 3, case_b 1 → mean (1/3 + 1) / 2
    assert summary["metrics"]["mean over regions"]["dice"]["mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["n_cases"] == 2 and summary["empty_hd95_mm"] == 373.0
    assert et["lesionwise_dice"]["mean"] == 1.0 and et["lesionwise_hd95"]["mean"] == 0.0
    lw = summary["lesionwise"]
    assert (lw["convention"], lw["cohort"], lw["dilation_voxels"], lw["min_volume_mm3"]) == ("brats2023", "GLI", 3,
                                                                                           50.0)
    assert lw["lesion_counts"]["whole tumor"] == {"n_ref_lesions": 2, "lesion_tp": 2, "lesion_fn": 0,
                                                  "lesion_fp": 0}

    table = (out / "table.md").read_text()
    assert ("| Region | DSC (%) | HD95 (mm) | LW DSC (%) | LW HD95 (mm) | VS (%) | IoU (%) | mIoU (%) | PA (%) |"
            in table)
    # √0.5·100, √(2·186.5²); lesion-wise 1 and 0 in both cases
    assert "| enhancing tumor | 50.00 ± 70.71 | 186.50 ± 263.75 | 100.00 ± 0.00 | 0.00 ± 0.00 |" in table
    assert "LW DSC / LW HD95: lesion-wise means, convention brats2023, cohort GLI" in table
    assert res.per_case.shape == (6, 18) and res.per_lesion.shape == (4, 10)


def test_evaluate_folder_lesionwise_switch_and_conventions(brats_folders, tmp_path):
    import pandas as pd
    from nnunet_diffusion.evaluation.evaluate import brats_cohort, is_brats_region_dataset
    pred_dir, ref_dir, dj = brats_folders
    # --no-lesionwise: the whole-region evaluation only, no per_lesion.csv
    out = tmp_path / "legacy"
    res = evaluate_folder(pred_dir, ref_dir, out, dataset_json=dj, num_processes=1, progress=False,
                          lesionwise=False)
    assert res.per_case.shape == (6, 12) and res.per_lesion is None and "lesionwise" not in res.summary
    assert {p.name for p in out.iterdir()} == {"per_case.csv", "summary.json", "table.md"}
    assert "LW DSC" not in (out / "table.md").read_text()
    # panoptica convention (brats-evaluation): case_a's enhancing core is an unmatched reference instance (no size
    # threshold) → Dice 0, HD95 373; case_b's enhancing is empty on both sides → NaN, left out of the mean
    res = evaluate_folder(pred_dir, ref_dir, tmp_path / "pan", dataset_json=dj, num_processes=1, progress=False,
                          lesionwise_convention="panoptica")
    et = res.per_case[res.per_case.region == "enhancing tumor"].set_index("case")
    assert (et.loc["case_a", "lesionwise_dice"], et.loc["case_a", "lesionwise_hd95"]) == (0.0, 373.0)
    assert math.isnan(et.loc["case_b", "lesionwise_dice"])
    assert res.summary["metrics"]["enhancing tumor"]["lesionwise_dice"]["n"] == 1
    assert res.summary["lesionwise"]["convention"] == "panoptica" and "cohort" not in res.summary["lesionwise"]
    assert pd.read_csv(tmp_path / "pan" / "per_lesion.csv").shape == (4, 10)
    # default on for BraTS region datasets only; cohort from the converter's brats_edition
    assert is_brats_region_dataset(BRATS_REGIONS_DATASET_JSON)
    plain = {"labels": {"background": 0, "liver": 1, "tumour": 2}, "file_ending": ".nii.gz"}
    kits = {"labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": [2]},
            "regions_class_order": [1, 2, 3], "name": "KiTS23"}
    assert not is_brats_region_dataset(plain) and not is_brats_region_dataset(kits)
    assert is_brats_region_dataset(dict(kits, brats_edition="2023-met"))
    assert brats_cohort(dict(BRATS_REGIONS_DATASET_JSON, brats_edition="2023-met")) == "MET"
    assert brats_cohort(dict(BRATS_REGIONS_DATASET_JSON, brats_edition="2021")) == "GLI"
    res = evaluate_folder(pred_dir, ref_dir, None, dataset_json=dict(BRATS_REGIONS_DATASET_JSON,
                                                                       brats_edition="2023-met"),
                          num_processes=1, progress=False)
    # MET drops only lesions <= 2 mm³: case_a's 16 mm³ enhancing core now counts, missed → Dice 0, HD95 374
    et = res.per_case[res.per_case.region == "enhancing tumor"].set_index("case")
    assert (et.loc["case_a", "lesionwise_dice"], et.loc["case_a", "lesionwise_hd95"]) == (0.0, 374.0)
    assert res.summary["lesionwise"]["cohort"] == "MET"
    with pytest.raises(EvaluationError, match="convention must be one of brats2023, panoptica; got 'x'"):
        evaluate_folder(pred_dir, ref_dir, None, dataset_json=dj, progress=False, lesionwise_convention="x")


def test_evaluate_folder_in_parallel_gives_the_same_rows(brats_folders, tmp_path):
    pred_dir, ref_dir, dj = brats_folders
    one = evaluate_folder(pred_dir, ref_dir, None, dataset_json=dj, num_processes=1, progress=False)
    two = evaluate_folder(pred_dir, ref_dir, None, dataset_json=dj, num_processes=2, progress=False)
    assert one.per_case.equals(two.per_case)


def test_evaluate_errors_name_the_problem(brats_folders, tmp_path):
    pred_dir, ref_dir, dj = brats_folders
    with pytest.raises(EvaluationError, match="prediction folder does not exist"):
        evaluate_folder(tmp_path / "nope", ref_dir, dataset_json=dj, progress=False)
    with pytest.raises(EvaluationError, match="give a dataset id"):
        evaluate_folder(pred_dir, ref_dir, progress=False)

    write(np.zeros((8, 8, 8)), pred_dir / "case_c.nii.gz", (1, 1, 2))
    with pytest.raises(EvaluationError, match=r"prediction\(s\) without a reference.*case_c"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=dj, progress=False)
    (pred_dir / "case_c.nii.gz").unlink()

    write(np.zeros((8, 8, 8)), ref_dir / "case_d.nii.gz", (1, 1, 2))
    with pytest.raises(EvaluationError, match=r"reference\(s\) without a prediction.*case_d"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=dj, progress=False)
    res = evaluate_folder(pred_dir, ref_dir, dataset_json=dj, only_predicted=True, num_processes=1, progress=False)
    assert sorted(res.per_case.case.unique()) == ["case_a", "case_b"]
    (ref_dir / "case_d.nii.gz").unlink()

    write(np.zeros((8, 8, 9)), pred_dir / "case_b.nii.gz", (1, 1, 2))
    with pytest.raises(EvaluationError, match=r"geometry mismatch in case case_b: prediction size \(9, 8, 8\)"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=dj, num_processes=1, progress=False)
    write(np.zeros((8, 8, 8)), pred_dir / "case_b.nii.gz", (1, 1, 1))
    with pytest.raises(EvaluationError, match="geometry mismatch in case case_b: prediction spacing"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=dj, num_processes=1, progress=False)


def test_unknown_dataset_and_cli_errors(brats_folders, tmp_path, monkeypatch, capsys):
    from nnunet_diffusion.cli import main
    pred_dir, ref_dir, dj = brats_folders
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(EvaluationError, match="unknown dataset 987: no Dataset987_"):
        evaluate_folder(pred_dir, ref_dir, dataset=987, progress=False)
    assert main(["evaluate", str(pred_dir), str(ref_dir), "-d", "987", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nndiff evaluate: error: unknown dataset 987: no Dataset987_* folder found")
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--dataset-json", str(dj), "-o", str(tmp_path / "o"),
                 "-np", "1", "--no-progress"]) == 0
    assert "| enhancing tumor | 50.00 ± 70.71 |" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"per_case.csv", "per_lesion.csv", "summary.json",
                                                            "table.md"}
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--dataset-json", str(dj), "-o", str(tmp_path / "p"),
                 "-np", "1", "--no-progress", "--lesionwise-convention", "panoptica", "--lesionwise-cohort",
                 "met"]) == 0
    assert "convention panoptica" in capsys.readouterr().out
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--dataset-json", str(dj), "-o", str(tmp_path / "q"),
                 "-np", "1", "--no-progress", "--no-lesionwise"]) == 0
    assert {p.name for p in (tmp_path / "q").iterdir()} == {"per_case.csv", "summary.json", "table.md"}


# ---------------------------------------------------------------------------------------------------- brats-evaluation


def _to_brats2023(label):
    # nnU-Net's BraTS label map (1 oedema, 2 necrosis, 3 enhancing) → BraTS 2023 (1 NETC, 2 SNFH, 3 ET), so that
    # brats-evaluation's "gli" regions wt = {1, 2, 3}, tc = {1, 3}, et = {3} are our whole tumour, tumour core and
    # enhancing tumour
    out = np.zeros_like(label)
    out[label == 1] = 2
    out[label == 2] = 1
    out[label == 3] = 3
    return out


def test_agreement_with_brats_evaluation(tmp_path):
    """Our Dice and HD95 (mode 'brats', 1 mm spacing) against brats-evaluation's legacy/global values."""
    be = pytest.importorskip(
        "brats_evaluation",
        reason="brats-evaluation is not installed; install it without touching numpy/pandas with: pip install "
               "'ruamel.yaml>=0.18.6,<1' 'plotly>=5.16.1,<6' 'typer>=0.15,<1' && pip install --no-deps "
               "panoptica==2.1.7 brats-evaluation==0.0.10")
    from panoptica import Panoptica_Evaluator
    from scipy.ndimage import binary_dilation, binary_erosion

    pred_dir, ref_dir, pred_b, ref_b = (tmp_path / n for n in ("pred", "ref", "pred_b", "ref_b"))
    for d in (pred_dir, ref_dir, pred_b, ref_b):
        d.mkdir()
    cases = {}
    _, lab0 = make_case(np.random.default_rng(10))
    pred0 = np.roll(lab0, 2, axis=1)
    pred0[binary_erosion(pred0 == 3, iterations=1) & (pred0 == 3)] = 2  # thin the enhancing rim
    cases["00001"] = (lab0, pred0)
    _, lab1 = make_case(np.random.default_rng(11))
    grown = binary_dilation(lab1 > 0, iterations=2) & (lab1 == 0)
    pred1 = lab1.copy()
    pred1[grown] = 1
    pred1[pred1 == 3] = 2                                                  # no enhancing in the prediction
    cases["00002"] = (lab1, pred1)
    _, lab2 = make_case(np.random.default_rng(12))
    _, other = make_case(np.random.default_rng(13))
    cases["00003"] = (lab2, other)                                          # a different tumour
    _, lab3 = make_case(np.random.default_rng(14))
    lab3[lab3 == 3] = 2
    cases["00004"] = (lab3, np.roll(lab3, -1, axis=2))                       # enhancing empty on both sides
    for cid, (ref, pred) in cases.items():
        write(ref, ref_dir / f"BraTS-GLI-{cid}-000.nii.gz")
        write(pred, pred_dir / f"BraTS-GLI-{cid}-000.nii.gz")
        write(_to_brats2023(ref), ref_b / f"BraTS-GLI-{cid}-000.nii.gz")
        write(_to_brats2023(pred), pred_b / f"BraTS-GLI-{cid}-000.nii.gz")

    dj = dict(BRATS_REGIONS_DATASET_JSON)
    ours = evaluate_folder(pred_dir, ref_dir, dataset_json=dj, num_processes=1, progress=False).per_case
    evaluator = Panoptica_Evaluator.load_from_config(str(be.config_path("gli")))
    names = {"whole tumor": "wt", "tumor core": "tc", "enhancing tumor": "et"}
    max_dice, max_hd = 0.0, 0.0
    for cid in cases:
        f = f"BraTS-GLI-{cid}-000.nii.gz"
        theirs = be.evaluate_single_exam(str(pred_b / f), str(ref_b / f), f, evaluator)
        assert "error" not in theirs, theirs
        for region, key in names.items():
            row = ours[(ours.case == f"BraTS-GLI-{cid}-000") & (ours.region == region)].iloc[0]
            t_dice, t_hd = theirs[key]["global_bin_dsc"], theirs[key]["global_bin_hd95"]
            if math.isnan(t_dice):
                # both empty: brats-evaluation reports NaN ("no instances"); we use the BraTS ranking convention
                assert cid == "00004" and region == "enhancing tumor"
                assert math.isnan(t_hd) and (row.dice, row.hd95) == (1.0, 0.0)
                continue
            t_hd = 373.0 if math.isinf(t_hd) else t_hd  # brats-evaluation's parse_seg_results does the same
            max_dice = max(max_dice, abs(row.dice - t_dice))
            max_hd = max(max_hd, abs(row.hd95 - t_hd))
    print(f"brats-evaluation agreement: max |ΔDice| = {max_dice:.3g}, max |ΔHD95| = {max_hd:.3g} mm")
    assert max_dice < 1e-9
    assert max_hd < 1e-6
    # the prediction of case 00002 has no enhancing tumour: the one-sided-empty penalty matched 373 above
    assert ours[(ours.case == "BraTS-GLI-00002-000") & (ours.region == "enhancing tumor")].hd95.item() == 373.0
