"""Lesion-wise Dice and HD95 (BraTS 2023 rule and brats-evaluation / panoptica): known answers on hand-built
volumes, and agreement with the installed official package brats-evaluation.

Every expected value is worked out by hand in the comment next to it. Boxes are written as half-open index ranges
per axis; "edge voxels" are the voxels of a mask with a background neighbour (for a 4×4×4 box: all 64 but the
2×2×2 core, 56), and HD95 is the 95th percentile (linear interpolation) of the pooled distances from every edge
voxel of one mask to the nearest edge voxel of the other, in both directions (hd95_mode "brats").
"""
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.evaluation.lesionwise import (BRATS2023_COHORTS, LESIONWISE_CONVENTIONS, PER_LESION_COLUMNS,
                                                    lesionwise_case, lesionwise_region, lesionwise_rule)

S = (24, 24, 24)


def box(*ranges, shape=S):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in ranges)] = True
    return m


A = box((2, 6), (2, 6), (2, 6))                      # 4×4×4 = 64 voxels = 64 mm³ at 1 mm (> 50: kept)
EMPTY = np.zeros(S, bool)


def lw(pred, ref, convention="brats2023", **kw):
    return lesionwise_region(pred, ref, convention=convention, **kw)[0]


def counts(s):
    return s["n_ref_lesions"], s["lesion_tp"], s["lesion_fn"], s["lesion_fp"]


# ---------------------------------------------------------------------------------------------- known answers


def test_one_lesion_matched():
    # prediction = A shifted by one voxel along axis 0: overlap 3×4×4 = 48, Dice = 2·48 / (64 + 64) = 0.75.
    # HD95: A's edge voxels at the face x0 = 2 (16) are 1 voxel from the prediction's face x0 = 3; the 4 core voxels
    # of A's face x0 = 5 are 1 voxel from the prediction's ring at x0 = 5; all other 36 lie on a prediction edge (0).
    # Same the other way: pooled 112 distances = 40 × 1 and 72 × 0; the 95th percentile (index 105.45 of 0..111)
    # lies in the top 40 → HD95 = 1 mm. One reference lesion, found: TP 1, FN 0, FP 0 — in both conventions.
    pred = box((3, 7), (2, 6), (2, 6))
    for convention in LESIONWISE_CONVENTIONS:
        s = lw(pred, A, convention)
        assert s["lesionwise_dice"] == pytest.approx(0.75)
        assert s["lesionwise_hd95"] == pytest.approx(1.0)
        assert counts(s) == (1, 1, 0, 0)


def test_two_reference_lesions_one_missed():
    # A and B (4×4×4 each) 12 voxels apart (no merging); prediction = A exactly.
    # brats2023: A: Dice 1, HD95 0; B missed: Dice 0, HD95 374 → mean Dice (1 + 0) / 2 = 0.5,
    # HD95 (0 + 374) / 2 = 187.
    # panoptica: the means run over matched pairs only → Dice 1, HD95 0; B is counted as a false negative.
    b = box((14, 18), (14, 18), (14, 18))
    s = lw(A, A | b)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (pytest.approx(0.5), pytest.approx(187.0))
    assert counts(s) == (2, 1, 1, 0)
    s = lw(A, A | b, "panoptica")
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert counts(s) == (2, 1, 1, 0)


def test_false_positive_speck():
    # prediction = A + one voxel at (20, 20, 20), far from A's 3-voxel footprint (which ends at index 8).
    # brats2023: A Dice 1, HD95 0, plus one false-positive component (Dice 0, HD95 374):
    #   Dice (1 + 0) / (1 + 1) = 0.5, HD95 (0 + 374) / 2 = 187.
    # panoptica: Dice 1, HD95 0 (matched pairs only), FP 1.
    pred = A.copy()
    pred[20, 20, 20] = True
    s = lw(pred, A)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (pytest.approx(0.5), pytest.approx(187.0))
    assert counts(s) == (1, 1, 0, 1)
    s = lw(pred, A, "panoptica")
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert counts(s) == (1, 1, 0, 1)


def test_lesions_within_dilation_merged_under_2023_rule_only():
    # A at x2 ∈ [2, 6) and B at x2 ∈ [9, 13) (3 empty voxels between). Dilated by 3 voxels, A reaches x2 = 8 and B
    # x2 = 6: one dilated component → one lesion A ∪ B (128 voxels) under brats2023; two instances under panoptica.
    # Prediction = A only.
    # brats2023: the lesion's footprint holds A's component → TP; Dice = 2·64 / (64 + 128) = 2/3. HD95: A's 56 edge
    #   voxels are on the prediction's edge (0, and the prediction's 56 on the reference's: 0); B's edge voxels are
    #   x2 − 5 voxels from A's face x2 = 5: face 9 (16 voxels) 4, ring 10 (12) 5, ring 11 (12) 6, face 12 (16) 7.
    #   Pooled 168: 112 × 0, 16 × 4, 12 × 5, 12 × 6, 16 × 7; index 0.95·167 = 158.65 is in the top 16 → 7 mm.
    # panoptica: A matched (Dice 1, HD95 0), B unmatched (FN): Dice 1, HD95 0 over the matched pair.
    b = box((2, 6), (2, 6), (9, 13))
    s = lw(A, A | b)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (pytest.approx(2 / 3), pytest.approx(7.0))
    assert counts(s) == (1, 1, 0, 0)
    s = lw(A, A | b, "panoptica")
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert counts(s) == (2, 1, 1, 0)
    # perfect prediction of both: Dice 1 either way, but 1 lesion (brats2023) vs 2 instances (panoptica)
    assert counts(lw(A | b, A | b)) == (1, 1, 0, 0)
    assert counts(lw(A | b, A | b, "panoptica")) == (2, 2, 0, 0)


def test_merging_distance_and_dilation_structure():
    # Along an axis, 3 dilation steps reach 3 voxels: a gap of 6 empty voxels leaves the dilations adjacent
    # (A reaches x2 = 8, B from x2 = 12 reaches 9) → merged; a gap of 7 (B from 13 reaches 10, x2 = 9 stays empty)
    # → two lesions.
    assert lw(A | box((2, 6), (2, 6), (12, 16)), A | box((2, 6), (2, 6), (12, 16)))["n_ref_lesions"] == 1
    assert lw(A | box((2, 6), (2, 6), (13, 17)), A | box((2, 6), (2, 6), (13, 17)))["n_ref_lesions"] == 2
    # Diagonally the organisers' 18-neighbourhood element (generate_binary_structure(3, 2)) matters: one step moves
    # at most two axes, so 3 steps reach offsets with max |o_i| <= 3 and Σ|o_i| <= 6. A's corner voxel is (5, 5, 5);
    # B = [11, 15)³ has its corner at (11, 11, 11): A's dilation reaches coordinate sums <= 15 + 6 = 21, B's
    # >= 33 − 6 = 27; 26-adjacent voxels differ by at most 3 in their sum → not merged (2 lesions). A
    # 26-neighbourhood element would reach (8, 8, 8) from both and merge them. B = [10, 14)³ (corner (10, 10, 10)):
    # A reaches (7, 7, 7) (sum of offsets 6), B reaches (8, 8, 8): 26-adjacent → merged.
    b6, b5 = box((11, 15), (11, 15), (11, 15)), box((10, 14), (10, 14), (10, 14))
    assert lw(A | b6, A | b6)["n_ref_lesions"] == 2
    assert lw(A | b5, A | b5)["n_ref_lesions"] == 1


def test_predicted_component_touching_the_footprint_counts_for_the_lesion():
    # prediction = A moved to x0 ∈ [7, 11): no overlap (x0 = 6 empty), but inside A's 3-voxel footprint (up to
    # x0 = 8).
    # brats2023: TP with Dice 0; HD95: A's faces/rings at x0 = 2, 3, 4, 5 are 5, 4, 3, 2 voxels from the
    #   prediction's face x0 = 7 (16, 12, 12, 16 voxels), symmetrically the other way: pooled 112 = 32 × 2, 24 × 3,
    #   24 × 4, 32 × 5; index 105.45 is in the top 32 → HD95 = 5 mm. No false positive.
    # panoptica: no overlap → no match: Dice 0, HD95 373 (no matched pair), FN 1, FP 1.
    pred = box((7, 11), (2, 6), (2, 6))
    s = lw(pred, A)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (pytest.approx(0.0), pytest.approx(5.0))
    assert counts(s) == (1, 1, 0, 0)
    s = lw(pred, A, "panoptica")
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (0.0, 373.0)
    assert counts(s) == (1, 0, 1, 1)
    # one voxel further (x0 ∈ [9, 13)) it is outside the footprint: FN (0, 374) + FP (0, 374) → Dice 0, HD95 374
    s = lw(box((9, 13), (2, 6), (2, 6)), A)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"]) == (0.0, pytest.approx(374.0))
    assert counts(s) == (1, 0, 1, 1)


def test_volume_threshold_50_dropped_51_kept():
    # 1 mm spacing: a 5×5×2 = 50-voxel lesion is 50 mm³ (<= 50: dropped), with one voxel attached 51 mm³ (kept).
    l50 = box((2, 7), (2, 7), (2, 4))
    l51 = l50.copy()
    l51[7, 2, 2] = True
    # missed 50 mm³ lesion: dropped, no lesion and no false positive left → Dice 1, HD95 0, no counts
    s = lw(EMPTY, l50)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"], counts(s)) == (1.0, 0.0, (0, 0, 0, 0))
    # missed 51 mm³ lesion: FN → Dice 0, HD95 374
    s = lw(EMPTY, l51)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"], counts(s)) == (0.0, 374.0, (1, 0, 1, 0))
    # a prediction of the dropped lesion is not a false positive either (it touches the lesion's footprint)
    s = lw(l50, l50)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"], counts(s)) == (1.0, 0.0, (0, 0, 0, 0))
    # BraTS-MET drops only lesions of at most 2 mm³ (and dilates by 1): the 50 mm³ lesion counts there
    assert counts(lw(EMPTY, l50, cohort="MET")) == (1, 0, 1, 0)
    # panoptica has no volume threshold
    assert counts(lw(EMPTY, l50, "panoptica")) == (1, 0, 1, 0)
    # the per-lesion record says why: dropped lesions are listed, not counted
    _, rec = lesionwise_region(EMPTY, l50)
    assert rec == [{"lesion": 1, "kind": "reference", "volume_mm3": 50.0, "matched": False, "dice": 0.0,
                    "hd95": 374.0, "counted": False, "n_pred_components": 0}]


def test_both_empty():
    # BraTS 2023 rule: no lesion and no false positive → Dice 1, HD95 0. panoptica: "no instances" → NaN (skipped).
    s = lw(EMPTY, EMPTY)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"], counts(s)) == (1.0, 0.0, (0, 0, 0, 0))
    s = lw(EMPTY, EMPTY, "panoptica")
    assert math.isnan(s["lesionwise_dice"]) and math.isnan(s["lesionwise_hd95"]) and counts(s) == (0, 0, 0, 0)
    # only the prediction non-empty: one FP → brats2023 Dice 0 / 1 = 0, HD95 374; panoptica: no match → 0 and 373
    assert (lw(A, EMPTY)["lesionwise_dice"], lw(A, EMPTY)["lesionwise_hd95"]) == (0.0, 374.0)
    assert (lw(A, EMPTY, "panoptica")["lesionwise_dice"], lw(A, EMPTY, "panoptica")["lesionwise_hd95"]) == (0.0, 373.0)


def test_anisotropic_spacing():
    # spacing (2, 1, 1) mm in array-axis order; prediction = A shifted by one voxel along axis 0 (as in
    # test_one_lesion_matched): the 32 face voxels' distances become 1 voxel × 2 mm = 2 mm, the 8 core-of-face voxels
    # stay 1 mm (their nearest edge is 1 voxel away along axis 1 or 2); pooled 112 = 32 × 2, 8 × 1, 72 × 0 → the
    # 95th percentile is in the top 32: HD95 = 2 mm (had the spacing been applied to axis 2 instead it would be 1).
    # Dice 0.75 as before; volume 64 voxels × 2 mm³ = 128 mm³.
    pred = box((3, 7), (2, 6), (2, 6))
    for convention in LESIONWISE_CONVENTIONS:
        s, rec = lesionwise_region(pred, A, spacing=(2.0, 1.0, 1.0), convention=convention)
        assert s["lesionwise_dice"] == pytest.approx(0.75)
        assert s["lesionwise_hd95"] == pytest.approx(2.0)
        assert rec[0]["volume_mm3"] == pytest.approx(128.0)
    # the volume threshold counts the spacing: a 3×5×2 = 30-voxel lesion is 30 mm³ at 1 mm (dropped) but 60 mm³ at
    # (2, 1, 1) mm (kept): missed, it gives Dice 1 / HD95 0 in the first case and Dice 0 / HD95 374 in the second
    l30 = box((2, 5), (2, 7), (2, 4))
    s = lw(EMPTY, l30)
    assert (s["lesionwise_dice"], s["lesionwise_hd95"], s["n_ref_lesions"]) == (1.0, 0.0, 0)
    s = lw(EMPTY, l30, spacing=(2.0, 1.0, 1.0))
    assert (s["lesionwise_dice"], s["lesionwise_hd95"], s["n_ref_lesions"]) == (0.0, 374.0, 1)


def test_per_case_rows_and_lesion_records_over_regions():
    # label map (nnU-Net BraTS labels 1 oedema, 2 necrosis, 3 enhancing; regions WT (1, 2, 3), TC (2, 3), ET (3)):
    # reference: A = label 3 (64 voxels), B = [14, 18)³ label 1 (64 voxels, far from A);
    # prediction: A as label 3, nothing at B, plus a speck (label 1) at (20, 2, 2).
    # WT: lesions A (hit, Dice 1, HD95 0) and B (missed: 0, 374) + FP speck (0, 374):
    #     Dice 1/3, HD95 (0 + 374 + 374) / 3 = 748/3; TC and ET: A only, exact → Dice 1, HD95 0.
    ref = np.zeros(S, np.uint8)
    ref[A] = 3
    ref[14:18, 14:18, 14:18] = 1
    pred = np.zeros(S, np.uint8)
    pred[A] = 3
    pred[20, 2, 2] = 1
    regions = [("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)), ("enhancing tumor", 3)]
    rows, lesions = lesionwise_case("c1", pred, ref, regions)
    by = {r["region"]: r for r in rows}
    assert by["whole tumor"]["lesionwise_dice"] == pytest.approx(1 / 3)
    assert by["whole tumor"]["lesionwise_hd95"] == pytest.approx(748 / 3)
    assert counts(by["whole tumor"]) == (2, 1, 1, 1)
    for region in ("tumor core", "enhancing tumor"):
        assert (by[region]["lesionwise_dice"], by[region]["lesionwise_hd95"], counts(by[region])) == (
            1.0, 0.0, (1, 1, 0, 0))
    assert all(set(r) == set(PER_LESION_COLUMNS) for r in lesions)
    wt = [r for r in lesions if r["region"] == "whole tumor"]
    assert sorted((r["kind"], r["volume_mm3"], r["matched"], r["dice"], r["hd95"]) for r in wt) == [
        ("false_positive", 1.0, False, 0.0, 374.0), ("reference", 64.0, False, 0.0, 374.0),
        ("reference", 64.0, True, 1.0, 0.0)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="convention must be one of brats2023, panoptica; got 'brats2021'"):
        lesionwise_rule("brats2021")
    with pytest.raises(ValueError, match="cohort must be one of GLI, SSA, PED, MEN, MET; got 'XYZ'"):
        lesionwise_rule("brats2023", "XYZ")
    assert lesionwise_rule("brats2023", "BraTS-MET").dilation == BRATS2023_COHORTS["MET"][0] == 1
    with pytest.raises(ValueError, match="shapes differ"):
        lesionwise_region(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        lesionwise_region(A, A, spacing=(1.0, 1.0))


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_stops_with_one_line_naming_case_and_file(tmp_path):
    from nnunet_diffusion.dataset_conversion.synthetic import BRATS_REGIONS_DATASET_JSON
    from nnunet_diffusion.evaluation.evaluate import EvaluationError, evaluate_folder
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 1

    def write(arr, path, spacing=(1.0, 1.0, 1.0)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(path))

    def error(**kw):
        with pytest.raises(EvaluationError) as e:
            evaluate_folder(pred_dir, ref_dir, None, dataset_json=BRATS_REGIONS_DATASET_JSON, num_processes=1,
                            progress=False, **kw)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    write(lab, ref_dir / "c1.nii.gz")
    bad = lab.copy()
    bad[0, 0, 0] = 4                                     # BraTS 2023's label 4 is not in this dataset.json (0–3)
    write(bad, pred_dir / "c1.nii.gz")
    msg = error()
    assert msg.startswith("case c1: the prediction ") and str(pred_dir / "c1.nii.gz") in msg
    assert "label(s) 4 that dataset.json does not define (its labels: 0, 1, 2, 3)" in msg
    assert "label(s) 4" in error(lesionwise=False)         # checked for the whole-region evaluation as well
    write(lab, pred_dir / "c1.nii.gz")
    write(bad, ref_dir / "c1.nii.gz")
    assert error().startswith("case c1: the reference ")
    write(lab, ref_dir / "c1.nii.gz")
    write(lab, pred_dir / "c1.nii.gz", spacing=(1.0, 1.0, 2.0))   # different spacing
    msg = error()
    assert msg.startswith("geometry mismatch in case c1: prediction spacing (1.0, 1.0, 2.0) vs reference "
                          "(1.0, 1.0, 1.0)")
    assert msg.endswith(f"(prediction {pred_dir / 'c1.nii.gz'}, reference {ref_dir / 'c1.nii.gz'})")
    write(np.zeros((8, 8, 9), np.uint8), pred_dir / "c1.nii.gz")    # different shape
    msg = error()
    assert "prediction size (9, 8, 8) vs reference size (8, 8, 8)" in msg and str(pred_dir / "c1.nii.gz") in msg


# ---------------------------------------------------------------------------------------------- brats-evaluation


def _brats_evaluation():
    reason = ("brats-evaluation is not installed; install it without touching numpy/pandas with: pip install "
              "'ruamel.yaml>=0.18.6,<1' 'plotly>=5.16.1,<6' 'typer>=0.15,<1' && pip install --no-deps "
              "panoptica==2.1.7 brats-evaluation==0.0.10")
    if os.environ.get("CI"):
        import brats_evaluation  # the Makefile installs it: in CI the cross-check must run, not skip
        return brats_evaluation
    return pytest.importorskip("brats_evaluation", reason=reason)


def _blob(rng, shape, centre, radii):
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii))
    noise = rng.normal(0, 0.15, shape)
    return d + noise < 1.0


def _cross_check_cases():
    """Label maps in BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET): several tumours per case, predictions that shift,
    split, miss, add and empty regions."""
    shape = (40, 40, 40)
    rng = np.random.default_rng(2023)
    cases = {}
    for k in range(5):
        ref = np.zeros(shape, np.uint8)
        pred = np.zeros(shape, np.uint8)
        for t in range(3):
            c = rng.integers(8, 32, 3)
            r = rng.uniform(2.5, 6.0, 3)
            shift = rng.integers(-2, 3, 3) if t != 2 or k % 2 else np.array([0, 0, 0])
            for labels, scale in ((2, 1.0), (1, 0.6), (3, 0.35)):
                ref[_blob(rng, shape, c, r * scale)] = labels
                if not (k == 1 and t == 0):                       # case 1 misses a tumour
                    pred[_blob(rng, shape, c + shift, r * scale * rng.uniform(0.8, 1.2, 3))] = labels
        if k == 2:
            pred[pred == 3] = 1                                    # no enhancing predicted
        if k == 3:
            pred[2:4, 2:4, 2:5] = 2                                # false-positive specks
            pred[36, 36, 36] = 3
        if k == 4:
            ref[ref == 3] = 1
            pred[pred == 3] = 1                                    # enhancing empty on both sides
        cases[f"BraTS-GLI-{k:05d}-000"] = (ref, pred)
    return cases


def test_panoptica_convention_agrees_with_brats_evaluation(tmp_path):
    """Convention "panoptica" against brats-evaluation 0.0.10 (gli config) on the same NIfTI files, 1 mm spacing:
    instance counts equal, lesion-wise Dice equal, lesion-wise HD95 within 1e-6 mm (inf → 373), and the matched
    reference instances' Dice and HD95."""
    be = _brats_evaluation()
    from panoptica import Panoptica_Evaluator
    evaluator = Panoptica_Evaluator.load_from_config(str(be.config_path("gli")))
    regions = [("wt", (1, 2, 3)), ("tc", (1, 3)), ("et", 3)]
    max_dice = max_hd = 0.0
    n_compared = n_matched = 0
    seen = set()
    for case, (ref, pred) in _cross_check_cases().items():
        files = {}
        for what, arr in (("ref", ref), ("pred", pred)):
            files[what] = tmp_path / f"{case}_{what}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(files[what]))
        theirs = be.evaluate_single_exam(str(files["pred"]), str(files["ref"]), case, evaluator)
        assert "error" not in theirs, theirs
        rows, lesions = lesionwise_case(case, pred, ref, regions, spacing=(1.0, 1.0, 1.0), convention="panoptica")
        for row in rows:
            t = theirs[row["region"]]
            assert (row["lesion_tp"], row["lesion_fp"], row["lesion_fn"], row["n_ref_lesions"]) == (
                t["tp"], t["fp"], t["fn"], t["n_ref_instances"]), (case, row["region"])
            t_dice, t_hd = t["sq_dsc"], t["sq_hd95"]
            if t_dice is None or math.isnan(t_dice):
                assert math.isnan(row["lesionwise_dice"]) and math.isnan(row["lesionwise_hd95"])
                seen.add("both empty")
                continue
            t_hd = 373.0 if math.isinf(t_hd) else t_hd
            seen.add("no match" if t["tp"] == 0 else "matched")
            if t["fp"]:
                seen.add("false positive")
            max_dice = max(max_dice, abs(row["lesionwise_dice"] - t_dice))
            max_hd = max(max_hd, abs(row["lesionwise_hd95"] - t_hd))
            n_compared += 1
            # per matched reference instance: (volume, Dice, HD95), compared in sorted order
            ours = sorted((r["volume_mm3"], r["dice"], r["hd95"]) for r in lesions
                          if r["region"] == row["region"] and r["kind"] == "reference" and r["matched"])
            ref_inst = sorted((float(i["volume"]), float(i["sq_dsc"]), float(i["sq_hd95"]))
                              for i in t.get("reference_instances", []) if i.get("is_matched") == 1)
            assert len(ours) == len(ref_inst) == t["tp"], (case, row["region"])
            for (v, d, h), (tv, td, th) in zip(ours, ref_inst):
                assert (v, d) == (tv, pytest.approx(td, abs=1e-12)) and h == pytest.approx(th, abs=1e-6), (case, row)
            n_matched += len(ours)
    print(f"brats-evaluation lesion-wise agreement over {n_compared} case-regions, {n_matched} matched instances: "
          f"max |ΔDice| = {max_dice:.3g}, max |ΔHD95| = {max_hd:.3g} mm")
    assert max_dice < 1e-12
    assert max_hd < 1e-6
    assert seen == {"both empty", "no match", "matched", "false positive"}   # every branch was exercised
    assert n_matched >= 10
