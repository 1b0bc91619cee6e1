"""Sample-set metrics (MoDiff Tables 1–2: GED, HM-IoU, NCC, CI) on tiny hand-made cases.

Masks of four pixels: a = [1,1,0,0], b = [0,1,1,0], c = [0,0,1,1]
IoU(a, b) = 1/3, IoU(a, c) = 0, IoU(b, c) = 1/3;  Dice(a, b) = 1/2, Dice(a, c) = 0, Dice(b, c) = 1/2.
"""
import math

import numpy as np
import pytest

from nnunet_diffusion.evaluation.samples import (collective_insight, combined_sensitivity, diversity_agreement,
                                                 generalized_energy_distance, hungarian_matched_iou, iou_matrix,
                                                 maximum_dice_matching, sample_set_metrics, variance_ncc)

a = np.array([1, 1, 0, 0], bool)
b = np.array([0, 1, 1, 0], bool)
c = np.array([0, 0, 1, 1], bool)
empty = np.zeros(4, bool)


def test_iou_matrix_hand_values_and_empty_convention():
    np.testing.assert_allclose(iou_matrix([a, b, c], [a, c, empty]),
                               [[1, 0, 0], [1 / 3, 1 / 3, 0], [0, 1, 0]])
    assert iou_matrix([empty], [empty])[0, 0] == 1.0  # IoU(∅, ∅) = 1 (CCDM, CIMD)


def test_iou_matrix_counts_bits_beyond_byte_boundaries():
    # 3×5×7 = 105 voxels (not a multiple of 8): IoU from the bit-packed counts equals |A∩B| / |A∪B|
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 5, 7)) < 0.4
    y = rng.random((2, 3, 5, 7)) < 0.6
    got = iou_matrix(x, y)
    for i in range(3):
        for j in range(2):
            inter = np.logical_and(x[i], y[j]).sum()
            union = np.logical_or(x[i], y[j]).sum()
            assert got[i, j] == pytest.approx(inter / union)


def test_generalized_energy_distance():
    # samples {a, b}, references {a, c}, d = 1 − IoU:
    #   E d(S, Y) = (d(a,a) + d(a,c) + d(b,a) + d(b,c)) / 4 = (0 + 1 + 2/3 + 2/3) / 4 = 7/12
    #   E d(S, S') = (0 + 2/3 + 2/3 + 0) / 4 = 1/3;  E d(Y, Y') = (0 + 1 + 1 + 0) / 4 = 1/2
    #   GED = 2·7/12 − 1/3 − 1/2 = 1/3
    assert generalized_energy_distance([a, b], [a, c]) == pytest.approx(1 / 3)
    assert generalized_energy_distance([a, c], [a, c]) == pytest.approx(0.0)   # same distribution
    assert generalized_energy_distance([empty], [empty]) == pytest.approx(0.0)  # d(∅, ∅) = 0
    assert generalized_energy_distance([empty], [a]) == pytest.approx(2.0)      # 2·1 − 0 − 0


def test_hungarian_matched_iou():
    # n = m = 2: IoU rows a: (a 1, c 0), b: (a 1/3, c 1/3); best matching a–a, b–c → (1 + 1/3) / 2 = 2/3
    assert hungarian_matched_iou([a, b], [a, c]) == pytest.approx(2 / 3)
    # n = 3, m = 2: both replicated to lcm = 6 members (samples ×2, references ×3). Best: a,a → a (1, 1),
    # c,c → c (1, 1), b,b → the remaining a and c (1/3 each): (4 + 2/3) / 6 = 7/9
    assert hungarian_matched_iou([a, b, c], [a, c]) == pytest.approx(7 / 9)
    assert hungarian_matched_iou([b, a], [a, b]) == pytest.approx(1.0)  # order does not matter


def test_variance_ncc():
    # samples s1 = [1,1,0,0], s2 = [1,0,0,0]: mean s̄ = [1, .5, 0, 0], sample-variance map s̄(1 − s̄) = [0, .25, 0, 0].
    # For binary masks CE(p, s) = const + (log(1+ε) − log ε)·|p − s|, so E_s CE(s̄, s) is proportional (plus a
    # constant) to the variance map and E_s CE(y, s) to mean_i |y − s_i|, and NCC is unchanged by that.
    # rater y1 = [1,1,0,0]: disagreement [0, .5, 0, 0] ∝ variance map → NCC = 1
    # rater y2 = [0,1,1,0]: disagreement [1, .5, 1, 0]; centred v = [−1/16, 3/16, −1/16, −1/16],
    #   centred d = [3/8, −1/8, 3/8, −5/8]: Σvd = −1/32, Σv² = 3/64, Σd² = 11/16 → NCC = −(1/32)/√(3/64 · 11/16)
    s = [np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool)]
    y1 = np.array([1, 1, 0, 0], bool)
    y2 = np.array([0, 1, 1, 0], bool)
    ncc2 = -(1 / 32) / math.sqrt(3 / 64 * 11 / 16)
    assert variance_ncc(s, [y1]) == pytest.approx(1.0)
    assert variance_ncc(s, [y2]) == pytest.approx(ncc2)
    assert variance_ncc(s, [y1, y2]) == pytest.approx((1 + ncc2) / 2)
    assert math.isnan(variance_ncc([a, a], [b]))  # identical samples: constant variance map, NCC undefined


def test_collective_insight_parts():
    # samples {a, b}, references {a, c}
    # S_c: union of samples [1,1,1,0] against union of references [1,1,1,1]: tp 3, fn 1 → 3/4
    # D_max: reference a → max(Dice(a,a) = 1, Dice(a,b) = 1/2) = 1; reference c → max(0, 1/2) = 1/2 → 3/4
    # D_a: references' pair variance Var(a − c) = Var([1,1,−1,−1]) = 1; samples' Var(a − b) = Var([1,0,−1,0]) = 1/2
    #      ΔV_max = ΔV_min = 1/2 → D_a = 1 − (1/2 + 1/2)/2 = 1/2
    # CI = 3·(3/4)·(3/4)·(1/2) / (3/4 + 3/4 + 1/2) = (27/32) / 2 = 27/64
    assert combined_sensitivity([a, b], [a, c]) == pytest.approx(0.75)
    assert maximum_dice_matching([a, b], [a, c]) == pytest.approx(0.75)
    assert diversity_agreement([a, b], [a, c]) == pytest.approx(0.5)
    ci = collective_insight([a, b], [a, c])
    assert ci["ci"] == pytest.approx(27 / 64)
    assert (ci["s_c"], ci["d_max"], ci["d_a"]) == pytest.approx((0.75, 0.75, 0.5))


def test_perfect_sample_set_scores_best_everywhere():
    # the samples are exactly the raters' annotations: GED 0, HM-IoU 1, S_c = D_max = D_a = CI = 1
    refs = np.stack([a, b, c])
    m = sample_set_metrics(refs[::-1], refs)
    assert m["n"] == 3 and m["m"] == 3
    assert m["ged"] == pytest.approx(0.0)
    assert m["hm_iou"] == pytest.approx(1.0)
    assert (m["s_c"], m["d_max"], m["d_a"], m["ci"]) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    # s̄ = [1/3, 2/3, 2/3, 1/3]: the sample-variance map s̄(1 − s̄) = 2/9 everywhere is constant → NCC undefined
    assert math.isnan(m["ncc"])
    assert combined_sensitivity([empty], [empty]) == 1.0  # nothing to find


def test_sample_metrics_on_volumes_and_shape_errors():
    # 3D masks: two samples = the two references swapped → GED 0 and HM-IoU 1 whatever the shapes
    ref1 = np.zeros((4, 5, 6), bool)
    ref1[1:3, 1:4, 2:5] = True
    ref2 = np.roll(ref1, 1, axis=2)
    assert generalized_energy_distance([ref2, ref1], [ref1, ref2]) == pytest.approx(0.0)
    assert hungarian_matched_iou([ref2, ref1], [ref1, ref2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different image shapes"):
        generalized_energy_distance([ref1], [ref1[:, :, :5]])
