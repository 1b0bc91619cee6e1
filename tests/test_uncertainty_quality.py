"""nnunet_diffusion.evaluation.uncertainty_quality against small cases worked out by hand (the expected numbers
and their derivation are in the comments; none is taken from the code under test)."""
import math

import numpy as np
import pytest

from nnunet_diffusion.evaluation import uncertainty_quality as uq

BRATS = [("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)), ("enhancing tumor", (3,))]


# ---------------------------------------------------------------------------------------------------- masks

def test_margin_mask_1d():
    ref = np.zeros(14, bool)
    ref[[5, 6]] = True
    pred = np.zeros(14, bool)
    pred[[6, 7]] = True
    # union = {5, 6, 7}; within 2 voxels of it: 3..9; margin 0: the union itself
    assert np.flatnonzero(uq.margin_mask(ref, pred, 2)).tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert np.flatnonzero(uq.margin_mask(ref, pred, 0)).tolist() == [5, 6, 7]
    # default margin 3: 2..10
    assert np.flatnonzero(uq.margin_mask(ref, pred)).tolist() == list(range(2, 11))
    assert uq.margin_mask(ref, pred, None).all()
    assert not uq.margin_mask(np.zeros(5, bool), np.zeros(5, bool), 3).any()  # empty union → empty margin


def test_margin_mask_2d_is_euclidean_not_a_cube():
    ref = np.zeros((7, 7), bool)
    ref[3, 3] = True
    pred = np.zeros((7, 7), bool)
    # margin 1: the centre and its 4 edge neighbours (distance 1); the diagonals are √2 ≈ 1.41 away → 5 voxels
    m1 = uq.margin_mask(ref, pred, 1)
    assert m1.sum() == 5 and m1[2, 3] and m1[3, 2] and not m1[2, 2]
    # margin 1.5 also takes the diagonals: the 3×3 block, 9 voxels
    m15 = uq.margin_mask(ref, pred, 1.5)
    assert m15.sum() == 9 and m15[2:5, 2:5].all()
    # margin 2: the 3×3 block plus the 4 voxels 2 away along the axes ((1,3), (5,3), (3,1), (3,5)) → 13;
    # (1,2) is √5 ≈ 2.24 away and left out
    m2 = uq.margin_mask(ref, pred, 2)
    assert m2.sum() == 13 and m2[1, 3] and not m2[1, 2]


def test_error_map_and_fp_fn_map():
    assert uq.error_map([1, 1, 0, 0], [1, 0, 1, 0]).tolist() == [False, True, True, False]
    # BraTS nested regions: ref 0/pred 1 → FP (WT); ref 1 = pred 1 → right; ref 2/pred 3 → FP (ET added);
    # ref 3/pred 2 → FN (ET missed); ref 3/pred 0 → FN; background both → right
    assert uq.fp_fn_map(np.array([0, 1, 2, 3, 3, 0]), np.array([1, 1, 3, 2, 0, 0]), BRATS).tolist() == \
        [1, 0, 1, 2, 2, 0]
    # label dataset: class 1 predicted as class 2 → FN of 1 and FP of 2 → 3; 0 predicted as 1 → FP
    assert uq.fp_fn_map(np.array([1, 2, 0]), np.array([2, 2, 1]), [("a", 1), ("b", 2)]).tolist() == [3, 0, 1]


# ---------------------------------------------------------------------------------------------------- AUROC

def test_auroc_perfect_inverted_constant():
    err = np.array([0, 0, 1, 1], bool)
    assert uq.error_auroc([0.1, 0.2, 0.8, 0.9], err) == 1.0   # every wrong voxel above every right one
    assert uq.error_auroc([0.9, 0.8, 0.2, 0.1], err) == 0.0   # every wrong voxel below every right one
    assert uq.error_auroc([0.5, 0.5, 0.5, 0.5], err) == 0.5   # all 4 pairs tied, ½ each
    # wrong voxels 0.35, 0.8; right 0.1, 0.4: pairs (0.35>0.1) yes, (0.35>0.4) no, (0.8>0.1) yes, (0.8>0.4) yes → 3/4
    assert uq.error_auroc([0.1, 0.4, 0.35, 0.8], err) == pytest.approx(0.75)


def test_auroc_undefined_has_a_reason():
    assert math.isnan(uq.error_auroc([0.1, 0.2], [False, False]))
    assert "every voxel in the margin is right" in uq.auroc_undefined_reason([False, False])
    assert math.isnan(uq.error_auroc([0.1, 0.2], [True, True]))
    assert "every voxel in the margin is wrong" in uq.auroc_undefined_reason([True, True])
    assert uq.auroc_undefined_reason([]) == "no voxel in the margin"
    assert uq.auroc_undefined_reason([True, False]) is None


# ---------------------------------------------------------------------------------------------------- AURC

def test_aurc_by_hand():
    err = np.array([0, 1, 0, 1], bool)
    # sorted by uncertainty 0.1, 0.2, 0.3, 0.4 → errors 0, 1, 0, 1; cumulative errors 0, 1, 1, 2;
    # risk at coverage 1/4..4/4 = 0/1, 1/2, 1/3, 2/4 → AURC = (0 + 1/2 + 1/3 + 1/2) / 4 = 1/3
    cov, risk = uq.risk_coverage_curve([0.1, 0.2, 0.3, 0.4], err)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0, 1 / 2, 1 / 3, 1 / 2])
    assert uq.aurc([0.1, 0.2, 0.3, 0.4], err) == pytest.approx(1 / 3)
    # optimal: the 2 right voxels first: risks 0, 0, 1/3, 2/4 → (1/3 + 1/2) / 4 = 5/24
    assert uq.optimal_aurc(err) == pytest.approx(5 / 24)
    # a perfectly ranked map (the errors most uncertain) reaches the optimum, E-AURC 0
    assert uq.aurc([0.1, 0.9, 0.2, 0.8], err) == pytest.approx(uq.optimal_aurc(err))
    # a constant map: every order equally likely, expected risk 2/4 at every coverage → 1/2
    assert uq.aurc([0.3] * 4, err) == pytest.approx(0.5)
    # one error in 5 voxels, optimal: only coverage 5/5 has risk 1/5 → (1/5) / 5 = 0.04
    assert uq.optimal_aurc([0, 0, 1, 0, 0]) == pytest.approx(0.04)
    # no error: 0 everywhere; every voxel wrong: 1 everywhere
    assert uq.aurc([0.1, 0.2], [False, False]) == 0 and uq.optimal_aurc([False, False]) == 0
    assert uq.aurc([0.1, 0.2], [True, True]) == 1 and uq.optimal_aurc([True, True]) == 1
    assert math.isnan(uq.aurc([], [])) and math.isnan(uq.optimal_aurc([]))


def test_aurc_ties_counted_in_expectation():
    # uncertainties 0.1, 0.5, 0.5, 0.9 with errors at the second (0.5) and the last: the tied pair holds 1 error of 2,
    # so the expected cumulative errors are 0, 1/2, 1, 2 → risks 0, 1/4, 1/3, 1/2 → AURC = (1/4 + 1/3 + 1/2) / 4
    # = 13/48, in either storage order of the tied voxels
    expected = (1 / 4 + 1 / 3 + 1 / 2) / 4
    assert uq.aurc([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(expected)
    assert uq.aurc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------- calibration

def test_ece_calibrated_toy_is_zero():
    # 4 voxels at 0.25 with 1 in the reference (frequency 1/4), 4 at 0.75 with 3 (3/4): every bin's frequency equals
    # its probability → ECE 0
    p = [0.25] * 4 + [0.75] * 4
    y = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert uq.expected_calibration_error(p, y) == pytest.approx(0, abs=1e-12)
    assert uq.expected_calibration_error(p, y, bins=10) == pytest.approx(0, abs=1e-12)


def test_ece_over_confident_toy():
    # 10 voxels at 0.9 of which 6 in the reference (gap |0.9 − 0.6| = 0.3), 30 at 0.1 of which none (gap 0.1):
    # ECE = 10/40 · 0.3 + 30/40 · 0.1 = 0.075 + 0.075 = 0.15 (0.9 and 0.1 fall into different bins of 15)
    p = [0.9] * 10 + [0.1] * 30
    y = [1] * 6 + [0] * 4 + [0] * 30
    assert uq.expected_calibration_error(p, y) == pytest.approx(0.15)
    b = uq.calibration_bins(p, y)
    assert len(b.counts) == 15 and b.counts.sum() == 40 and sorted(b.counts[b.counts > 0].tolist()) == [10, 30]
    # bins of [0, 1] equal-width: with 4 bins 0.5 goes to [0.5, 0.75) (index 2), 1.0 into the last bin, 0 the first
    b4 = uq.calibration_bins([0.0, 0.5, 1.0], [0, 1, 1], bins=4)
    assert b4.counts.tolist() == [1, 0, 1, 1]
    assert b4.edges.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert np.isnan(b4.mean_probability[1]) and b4.frequency[2] == 1.0
    with pytest.raises(uq.UncertaintyQualityError, match=r"\[0, 1\]"):
        uq.calibration_bins([1.2], [1])


def test_brier_four_voxels():
    # ((0.9−1)² + (0.2−0)² + (0.6−1)² + (0−0)²) / 4 = (0.01 + 0.04 + 0.16 + 0) / 4 = 0.0525
    assert uq.brier_score([0.9, 0.2, 0.6, 0.0], [1, 0, 1, 0]) == pytest.approx(0.0525)
    # one class only: (0.1² + 0.2²) / 2 = 0.025
    assert uq.brier_score([0.9, 0.8], [1, 1]) == pytest.approx(0.025)


def test_reliability_diagram_png(tmp_path):
    b = uq.calibration_bins([0.9] * 10 + [0.1] * 30, [1] * 6 + [0] * 34)
    out = uq.reliability_diagram({"head": {"whole tumor": b, "tumor core": b}, "nnU-Net": {"whole tumor": b}},
                                 tmp_path / "fig" / "reliability.png", title="toy")
    assert out == tmp_path / "fig" / "reliability.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["reliability.png"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------------- case level

def test_spearman_four_cases():
    # mean uncertainty 0.1, 0.4, 0.2, 0.3 → ranks 1, 4, 2, 3; Dice 0.9, 0.6, 0.5, 0.7 → ranks 4, 2, 1, 3;
    # d = −3, 2, 1, 0, Σd² = 14, ρ = 1 − 6·14 / (4·(16 − 1)) = 1 − 84/60 = −0.4
    rho, p = uq.case_spearman([0.1, 0.4, 0.2, 0.3], [0.9, 0.6, 0.5, 0.7])
    assert rho == pytest.approx(-0.4) and 0 < p <= 1
    # a case with a NaN (empty margin) is left out: the same ρ
    assert uq.case_spearman([0.1, 0.4, 0.2, 0.3, float("nan")], [0.9, 0.6, 0.5, 0.7, 0.8])[0] == \
        pytest.approx(-0.4)
    # perfectly ranked (more uncertain, lower Dice): −1
    assert uq.case_spearman([0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.7, 0.6])[0] == pytest.approx(-1)
    assert all(math.isnan(v) for v in uq.case_spearman([0.1, 0.2], [0.9, 0.8]))
    assert "at least 3" in uq.spearman_undefined_reason([0.1, 0.2], [0.9, 0.8])
    assert "same mean uncertainty" in uq.spearman_undefined_reason([0.2] * 3, [0.9, 0.8, 0.7])


# ---------------------------------------------------------------------------------------------------- baselines

def test_entropy_map_is_predict_uncertainty():
    # binary entropy: H(0.5) = 1; H(0.25) = −(¼ log₂ ¼ + ¾ log₂ ¾) = 0.5 + 0.311278 = 0.811278
    h = uq.entropy_map(np.array([[0.5, 0.25]]), region_dataset=True)
    assert h.shape == (1, 2) and h[0] == pytest.approx([1.0, 0.811278], abs=1e-5)
    # softmax over 3 classes, uniform: log₂ 3 / log₂ 3 = 1; certain: ~0
    h = uq.entropy_map(np.array([[1 / 3, 1.0], [1 / 3, 0.0], [1 / 3, 0.0]]), region_dataset=False)
    assert h.shape == (1, 2) and h[0, 0] == pytest.approx(1.0, abs=1e-5) and h[0, 1] < 1e-4


def test_mirror_variance():
    # two mirrors 0.2 and 0.6: mean 0.4, variance (0.04 + 0.04) / 2 = 0.04
    v = uq.mirror_variance([np.array([[0.2, 0.5]]), np.array([[0.6, 0.5]])])
    assert v.shape == (1, 2) and v[0] == pytest.approx([0.04, 0.0])
    # three mirrors 0, 0.5, 1: ((0.5)² + 0 + (0.5)²) / 3 = 1/6
    assert uq.mirror_variance([np.zeros(1), np.full(1, 0.5), np.ones(1)])[0] == pytest.approx(1 / 6)
    with pytest.raises(uq.UncertaintyQualityError, match="at least 2"):
        uq.mirror_variance([np.zeros(3)])
    with pytest.raises(uq.UncertaintyQualityError, match="differ in shape"):
        uq.mirror_variance([np.zeros(3), np.zeros(4)])


# ---------------------------------------------------------------------------------------------------- per case, pooled

REF = np.array([0, 0, 1, 2, 3, 3, 0, 0, 0, 0])
PRED = np.array([0, 0, 0, 2, 3, 2, 2, 0, 0, 0])
UNC = np.array([0, 0.1, 0.9, 0.2, 0.3, 0.4, 0.8, 0.0, 0, 0])


def test_case_voxels_by_hand():
    v = uq.case_voxels(PRED, REF, UNC, None, BRATS, margin=1)
    # whole tumour: ref {2,3,4,5}, pred {3,4,5,6}; union 2..6, margin 1 → 1..7 (7 voxels); errors at 2 (FN) and 6 (FP)
    wt = v["whole tumor"]
    assert wt.uncertainty.tolist() == [0.1, 0.9, 0.2, 0.3, 0.4, 0.8, 0.0]
    assert wt.errors.tolist() == [False, True, False, False, False, True, False]
    assert wt.dice == pytest.approx(2 * 3 / 8)  # |A∩B| = 3 ({3,4,5}), |A| = |B| = 4
    assert wt.mean_uncertainty == pytest.approx(2.7 / 7)
    # enhancing tumour: ref {4,5}, pred {4}; margin 1 → 3..6; error at 5 (u 0.4) against right 0.2, 0.3, 0.8 → 2/3
    et = v["enhancing tumor"]
    assert et.errors.tolist() == [False, False, True, False] and et.dice == pytest.approx(2 / 3)
    q = uq.pooled_quality([v])
    assert q["whole tumor"].auroc == 1.0 and q["enhancing tumor"].auroc == pytest.approx(2 / 3)
    # whole tumour, errors the 2 most uncertain of 7: AURC = optimum = (1/6 + 2/7) / 7 = 19/294
    assert q["whole tumor"].aurc == pytest.approx(19 / 294) and q["whole tumor"].e_aurc == pytest.approx(0)
    assert q["whole tumor"].n_voxels == 7 and q["whole tumor"].n_errors == 2
    assert math.isnan(q["whole tumor"].ece) and "calibration: no probabilities for some case" in q["whole tumor"].notes
    assert any(n.startswith("Spearman: 1 case(s)") for n in q["whole tumor"].notes)


def test_case_voxels_channels_and_pooling():
    # region dataset: channel k is the k-th region; channel k filled with 0.1·(k+1)
    probs = np.stack([np.full(10, 0.1 * (k + 1)) for k in range(3)])
    unc = np.stack([np.full(10, 0.2 * (k + 1)) for k in range(3)])
    v = uq.case_voxels(PRED, REF, unc, probs, BRATS, margin=1)
    assert np.allclose(v["tumor core"].probability, 0.2) and np.allclose(v["enhancing tumor"].uncertainty, 0.6)
    # label dataset: channel c is label c (channel 0 background)
    labels = [("a", 1), ("b", 2)]
    probs = np.stack([np.full(10, 0.05), np.full(10, 0.25), np.full(10, 0.7)])
    v = uq.case_voxels(PRED, REF, probs, probs, labels, margin=1)
    assert np.allclose(v["a"].probability, 0.25) and np.allclose(v["b"].uncertainty, 0.7)
    # pooled over two cases: the voxels concatenated; calibration of a constant 0.25 for class a: whole-tumour style
    # by hand: case 1 class a: ref {2}, pred {} → margin 1..3, target [0, 1, 0] → |0.25 − 1/3| over 3 voxels
    q = uq.pooled_quality([v, v])
    assert q["a"].n_cases == 2 and q["a"].n_voxels == 6
    assert q["a"].ece == pytest.approx(abs(0.25 - 1 / 3))
    # Brier: per voxel (0.25 − 0)² = 0.0625 twice, (0.25 − 1)² = 0.5625 once → 0.6875 / 3 per case
    assert q["a"].brier == pytest.approx(0.6875 / 3)
    assert q["a"].as_dict()["calibration"]["counts"][3] == 6  # 0.25 · 15 = 3.75 → bin 3
    with pytest.raises(uq.UncertaintyQualityError, match="does not fit"):
        uq.case_voxels(PRED, REF, np.zeros(9), None, labels)


def test_ignore_label_left_out():
    ref = np.array([0, 1, 1, 4, 0])
    pred = np.array([0, 1, 0, 1, 0])
    # label 4 is the ignore label: voxel 3 is neither an error nor in the margin; class 1: ref {1,2}, pred {1};
    # margin 0 → {1, 2}; Dice 2·1/3
    v = uq.case_voxels(pred, ref, np.zeros(5), None, [("a", 1)], margin=0, ignore_label=4)
    assert v["a"].errors.tolist() == [False, True] and v["a"].dice == pytest.approx(2 / 3)
