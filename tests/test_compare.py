"""`nndiff compare` / `nndiff evaluate` on the session's two tiny trained trainers (conftest's `trained` fixture),
and a two-trainers × two-folds comparison built from copies of their result folders.

Expected values are computed here from the NIfTI files with plain numpy (Dice = 2|A∩B| / (|A| + |B|)), or taken
from nnU-Net's own evaluator (the validation summary.json nnUNetv2_train wrote).
"""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATASET, model_folder
from nnunet_diffusion.evaluation.compare import case_figure, compare_trainers


TRAINERS = ("nnUNetTrainer_tiny", "nnUNetTrainerNNDM_tiny")
REGIONS = {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
NNUNET_KEYS = {"whole tumor": "(1, 2, 3)", "tumor core": "(2, 3)", "enhancing tumor": "(3,)"}


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def hand_dice(pred_file, ref_file, region):
    p, r = np.isin(read(pred_file), region), np.isin(read(ref_file), region)
    den = p.sum() + r.sum()
    return 1.0 if den == 0 else 2.0 * np.logical_and(p, r).sum() / den


def hand_miou(pred_file, ref_file, region):
    """DDMD's mIoU: the mean of the region's IoU and the background's IoU (IoU of the complements); 1 when both
    sets are empty."""
    p, r = np.isin(read(pred_file), region), np.isin(read(ref_file), region)

    def iou(a, b):
        union = np.logical_or(a, b).sum()
        return 1.0 if union == 0 else np.logical_and(a, b).sum() / union
    return (iou(p, r) + iou(~p, ~r)) / 2


def assert_png_not_blank(path):
    import matplotlib.image as mpimg
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3]
    drawn = np.any(rgb < 0.9, axis=-1).mean()
    colours = len(np.unique((rgb.reshape(-1, 3) * 15).round().astype(int), axis=0))
    assert drawn > 0.01 and colours > 10, f"{path} looks blank: {drawn:.3f} of pixels drawn, {colours} colours"
    return img


@pytest.mark.e2e  # uses the trained tiny models
def test_compare_two_trained_trainers(trained, nnunet_paths, tmp_path):
    import pandas as pd
    out = tmp_path / "cmp"
    res = compare_trainers(990, TRAINERS, out, folds=["0"], num_processes=1, n_cases=1, progress=False)

    df = pd.read_csv(out / "per_case.csv")
    ref_dir = trained.preprocessed / "gt_segmentations"
    for tr in TRAINERS:
        val = model_folder(trained, tr) / "fold_0" / "validation"
        nnunet = json.loads((val / "summary.json").read_text())
        assert len(nnunet["metric_per_case"]) >= 1
        for entry in nnunet["metric_per_case"]:
            case = Path(entry["prediction_file"]).name[: -len(".nii.gz")]
            for region, key in NNUNET_KEYS.items():
                ours = df[(df.trainer == tr) & (df.fold == 0) & (df.case == case) & (df.region == region)]
                assert len(ours) == 1
                ours = ours.iloc[0]
                theirs = entry["metrics"][key]["Dice"]
                if math.isnan(theirs):  # nnU-Net: NaN when both are empty; the BraTS convention: 1
                    assert ours.dice == 1.0 and ours.hd95 == 0.0
                else:
                    assert ours.dice == pytest.approx(theirs, abs=1e-6)
                assert ours.dice == pytest.approx(hand_dice(val / f"{case}.nii.gz", ref_dir / f"{case}.nii.gz",
                                                            REGIONS[region]), abs=1e-6)
                assert ours.miou == pytest.approx(hand_miou(val / f"{case}.nii.gz", ref_dir / f"{case}.nii.gz",
                                                            REGIONS[region]), abs=1e-6)
                assert ours.volume_ref == pytest.approx(entry["metrics"][key]["n_ref"])  # 1 mm³ voxels

    # paired differences: NNDM − baseline per case, recomputed from the per-case table
    paired = pd.read_csv(out / "paired.csv")
    wt = df[df.region == "whole tumor"].pivot(index="case", columns="trainer", values="dice")
    diff = wt[TRAINERS[1]] - wt[TRAINERS[0]]
    row = paired[(paired.region == "whole tumor") & (paired.metric == "dice")].iloc[0]
    assert row.trainer == TRAINERS[1] and row.baseline == TRAINERS[0]
    assert row.mean_diff == pytest.approx(diff.mean(), abs=1e-6) and row.n == len(diff)

    # lesion-wise metrics (on by default for this BraTS region dataset): counts add up, per_lesion.csv agrees
    assert {"lesionwise_dice", "lesionwise_hd95", "n_ref_lesions", "lesion_tp", "lesion_fn",
            "lesion_fp"} <= set(df.columns)
    regional = df[df.region != "mean over regions"]
    assert (regional.lesion_tp + regional.lesion_fn == regional.n_ref_lesions).all()
    lesions = pd.read_csv(out / "per_lesion.csv")
    counted_refs = lesions[(lesions.kind == "reference") & lesions.counted]
    assert len(counted_refs) == regional.n_ref_lesions.sum()
    assert (lesions.kind == "false_positive").sum() == regional.lesion_fp.sum()

    table = (out / "table.md").read_text()
    for text in ("## whole tumor", "## tumor core", "## enhancing tumor",
                 "| Method | DSC (%) | HD95 (mm) | LW DSC (%) | LW HD95 (mm) | VS (%) | IoU (%) | mIoU (%) | n |",
                 f"| {TRAINERS[0]} |", f"| {TRAINERS[1]} − {TRAINERS[0]} | whole tumor |", "Wilcoxon"):
        assert text in table
    for tr in TRAINERS:
        assert (out / tr / "fold_0" / "summary.json").is_file() and (out / tr / "fold_0" / "table.md").is_file()
    names = sorted(p.name for p in res.figures)
    assert names[:7] == ["box_dice.png", "box_hd95.png", "box_iou.png", "box_lesionwise_dice.png",
                         "box_lesionwise_hd95.png", "box_miou.png", "box_vs.png"]
    assert len(names) == 8
    for f in res.figures:
        assert_png_not_blank(f)


@pytest.fixture
def fake_results(trained, tmp_path):
    """FakeA / FakeB with folds 0 and 1: fold 0 = copies of the baseline's / NNDM's validation predictions,
    fold 1 = copies of the references (perfect predictions); FakeB fold 0 also has an uncertainty map."""
    results = tmp_path / "results"
    gt = trained.preprocessed / "gt_segmentations"
    cases = None
    for fake, src in (("FakeA", TRAINERS[0]), ("FakeB", TRAINERS[1])):
        val0 = model_folder(trained, src) / "fold_0" / "validation"
        cases = sorted(p.name[: -len(".nii.gz")] for p in val0.glob("*.nii.gz"))
        for fold, source in (("0", val0), ("1", gt)):
            d = results / DATASET / f"{fake}__nnUNetPlans__3d_fullres" / f"fold_{fold}" / "validation"
            d.mkdir(parents=True)
            for c in cases:
                shutil.copy(source / f"{c}.nii.gz", d / f"{c}.nii.gz")
    ref = sitk.ReadImage(str(gt / f"{cases[0]}.nii.gz"))
    unc = sitk.GetImageFromArray(np.random.default_rng(0).random(sitk.GetArrayFromImage(ref).shape).astype(np.float32))
    unc.CopyInformation(ref)
    unc_dir = results / DATASET / "FakeB__nnUNetPlans__3d_fullres" / "fold_0" / "validation" / "uncertainty"
    unc_dir.mkdir()
    sitk.WriteImage(unc, str(unc_dir / f"{cases[0]}.nii.gz"))  # where nndiff predict --uncertainty writes it
    return results, cases


@pytest.mark.e2e  # uses the trained tiny models
def test_compare_two_trainers_two_folds_cli(fake_results, trained, nnunet_paths, tmp_path, capsys):
    import pandas as pd
    from scipy.stats import wilcoxon
    from nnunet_diffusion.cli import main
    results, cases = fake_results
    out = tmp_path / "cmp2"
    rc = main(["compare", "-d", "990", "-tr", "FakeA", "FakeB", "-f", "0", "1", "-o", str(out), "--results",
               str(results), "--cases", cases[0], "-np", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    gt = trained.preprocessed / "gt_segmentations"
    summary = json.loads((out / "summary.json").read_text())

    # FakeA whole tumour: fold 0 = the baseline's Dice per case (by hand), fold 1 = 1.0 for every case
    val_a = results / DATASET / "FakeA__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
    fold0 = np.array([hand_dice(val_a / f"{c}.nii.gz", gt / f"{c}.nii.gz", (1, 2, 3)) for c in cases])
    folds_stats = summary["metrics"]["FakeA"]["whole tumor"]["dice"]["folds"]
    assert folds_stats["n"] == 2
    assert folds_stats["mean"] == pytest.approx((fold0.mean() + 1) / 2, abs=1e-6)
    assert folds_stats["std"] == pytest.approx(abs(1 - fold0.mean()) / math.sqrt(2), abs=1e-6)
    cases_stats = summary["metrics"]["FakeA"]["whole tumor"]["dice"]["cases"]
    all_values = np.concatenate([fold0, np.ones(len(cases))])
    assert cases_stats["n"] == 2 * len(cases)
    assert cases_stats["std"] == pytest.approx(all_values.std(ddof=1), abs=1e-6)

    # paired FakeB − FakeA: fold 1 differences are 0 (both perfect), fold 0 are NNDM − baseline
    val_b = results / DATASET / "FakeB__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
    d0 = np.array([hand_dice(val_b / f"{c}.nii.gz", gt / f"{c}.nii.gz", (1, 2, 3)) for c in cases]) - fold0
    paired = pd.read_csv(out / "paired.csv")
    row = paired[(paired.region == "whole tumor") & (paired.metric == "dice")].iloc[0]
    assert row.n == 2 * len(cases)
    assert row.mean_diff == pytest.approx(d0.sum() / (2 * len(cases)), abs=1e-6)
    nonzero = d0[np.abs(d0) > 0]
    expected_p = 1.0 if nonzero.size == 0 else wilcoxon(nonzero).pvalue  # zeros dropped (Wilcoxon's method)
    assert row.wilcoxon_p == pytest.approx(expected_p, abs=1e-9)

    # fold 1 = copies of the references: every lesion found exactly, no false positive → lesion-wise Dice 1, HD95 0
    per_case = pd.read_csv(out / "per_case.csv")
    fold1 = per_case[(per_case.fold == 1) & (per_case.region != "mean over regions")]
    assert len(fold1) == 2 * 3 * len(cases)
    assert (fold1.lesionwise_dice == 1.0).all() and (fold1.lesionwise_hd95 == 0.0).all()
    assert (fold1.lesion_fn == 0).all() and (fold1.lesion_fp == 0).all()

    table = (out / "table.md").read_text()
    assert "(folds 0, 1)" in table and "Mean ± std over folds" in table and "| FakeB − FakeA | tumor core |" in table

    figs = out / "figures"
    with_unc = assert_png_not_blank(figs / f"case_{cases[0]}.png")
    for metric in ("dice", "hd95", "vs", "iou", "miou", "lesionwise_dice", "lesionwise_hd95"):
        assert_png_not_blank(figs / f"box_{metric}.png")
    # the same case drawn without the uncertainty map has a third of the rows (the three views, no error and
    # uncertainty rows)
    dj = json.loads((trained.raw / "dataset.json").read_text())
    regions = list(REGIONS.items())
    without = case_figure(cases[0], gt / f"{cases[0]}.nii.gz", {"FakeA": (val_a / f"{cases[0]}.nii.gz", None)},
                          "FakeA", regions, dj, trained.raw / "imagesTr", ".nii.gz", tmp_path / "without.png")
    assert with_unc.shape[0] > 1.3 * assert_png_not_blank(without).shape[0]


@pytest.mark.e2e  # uses the trained tiny models
def test_compare_and_evaluate_errors(trained, nnunet_paths, tmp_path, capsys):
    from nnunet_diffusion.cli import main
    rc = main(["compare", "-d", "990", "-tr", TRAINERS[0], "nnUNetTrainerNope", "-o", str(tmp_path / "x"),
               "--no-plots", "-np", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no validation predictions for nnUNetTrainerNope fold 0" in err
    rc = main(["compare", "-d", "990", "-tr", TRAINERS[0], "-o", str(tmp_path / "x"), "--cases", "synth_nope",
               "-np", "1", "--no-progress"])
    assert rc == 2 and "case(s) synth_nope to draw have no prediction" in capsys.readouterr().err

    val = model_folder(trained, TRAINERS[0]) / "fold_0" / "validation"
    gt = trained.preprocessed / "gt_segmentations"
    args = ["evaluate", str(val), str(gt), "-d", "990", "-o", str(tmp_path / "ev"), "-np", "1", "--no-progress"]
    assert main(args) == 2  # fold 0's validation folder holds 2 of the 8 cases
    assert "reference(s) without a prediction" in capsys.readouterr().err
    assert main(args + ["--only-predicted"]) == 0
    assert "| whole tumor |" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# the per-case figure on a tiny synthetic case (no trained model)

def _synthetic_case(root, with_uncertainty):
    """A 12³ case: reference whole tumour a 4³ cube at 4..7 (core 5..6, enhancing 5), the prediction the cube
    shifted by one voxel along the last axis (false negatives at x = 4, false positives at x = 8), a FLAIR image,
    and where asked an uncertainty map as nndiff predict --uncertainty writes it (<pred folder>/uncertainty/)."""
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[4:8, 4:8, 4:8] = 1
    ref[5:7, 5:7, 5:7] = 2
    ref[5, 5, 5] = 3
    pred = np.roll(ref, 1, axis=2)

    def write(arr, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(img, str(path))
        return path

    ref_f = write(ref, root / "gt" / "c1.nii.gz")
    pred_f = write(pred, root / "pred" / "c1.nii.gz")
    write(np.random.default_rng(0).random(ref.shape).astype(np.float32) + 3 * (ref > 0), root / "img" /
          "c1_0000.nii.gz")
    unc = None
    if with_uncertainty:
        unc = write((ref != pred).astype(np.float32) * 0.8 + 0.1, root / "pred" / "uncertainty" / "c1.nii.gz")
    return ref_f, {"Head": (pred_f, unc)}


def _figure(tmp_path, with_uncertainty):
    from nnunet_diffusion.evaluation.compare import draw_case_figure
    ref_f, preds = _synthetic_case(tmp_path, with_uncertainty)
    dj = {"channel_names": {"0": "FLAIR"}}
    args = ("c1", ref_f, preds, "Head", list(REGIONS.items()), dj, tmp_path / "img", ".nii.gz")
    return draw_case_figure(*args), args


def _legend_texts(fig):
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_case_figure_without_uncertainty_is_unchanged(tmp_path):
    import matplotlib.pyplot as plt
    fig, args = _figure(tmp_path, with_uncertainty=False)
    try:
        # as before: 3 rows (axial, coronal, sagittal) × 2 columns (reference, Head), region outlines in the legend
        assert len(fig.axes) == 6
        # slices through the reference's centre of mass, 5.5 on every axis, rounded half to even: 6
        assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["axial 6", "coronal 6", "sagittal 6"]
        assert tuple(fig.get_size_inches()) == pytest.approx((1.9 * 2 + 0.6, 1.9 * 3 + 1.0))
        assert _legend_texts(fig) == list(REGIONS)
    finally:
        plt.close(fig)
    out = case_figure(*args, tmp_path / "figs" / "case_c1.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_case_figure_shows_errors_beside_uncertainty(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from nnunet_diffusion.evaluation.compare import ERROR_COLOURS
    fig, args = _figure(tmp_path, with_uncertainty=True)
    try:
        # 3 + 2 × 3 rows: per view an error row right above an uncertainty row, 2 columns each
        assert len(fig.axes) == 18
        labels = [ax.get_ylabel() for ax in fig.axes[::2]]
        assert labels == ["axial 6", "coronal 6", "sagittal 6", "errors\naxial", "uncertainty\naxial",
                          "errors\ncoronal", "uncertainty\ncoronal", "errors\nsagittal", "uncertainty\nsagittal"]
        assert _legend_texts(fig) == [*REGIONS, "false positive", "false negative"]
        # the axial error panel of Head (row 3, column 1), slice z = 6: the gray image and the FP/FN overlay; the
        # cube shifted along x gives false negatives in column x = 4 and false positives in x = 8, rows y = 4..7
        err_ax = fig.axes[3 * 2 + 1]
        overlay = err_ax.get_images()[-1].get_array()
        assert overlay.shape == (12, 12, 4)
        fn, fp = np.array(to_rgba(ERROR_COLOURS[2][0])), np.array(to_rgba(ERROR_COLOURS[1][0]))
        assert np.allclose(overlay[4:8, 4], fn) and np.allclose(overlay[4:8, 8], fp)
        # the tumour core (y, x in 5..6 at z = 6) shifted too: x = 5 label 2 → 1 (core missed, FN), x = 7 label
        # 1 → 2 (core added, FP), rows y = 5..6
        assert np.allclose(overlay[5:7, 5], fn) and np.allclose(overlay[5:7, 7], fp)
        assert (overlay[..., 3] > 0).sum() == 12  # 4 + 4 whole tumour, 2 + 2 core; the rest transparent
        # the uncertainty panel right below: the map of the same slice
        unc_ax = fig.axes[4 * 2 + 1]
        assert np.allclose(unc_ax.get_images()[0].get_array()[4:8, 4], 0.9)
        # the reference column has no error or uncertainty panel (frame off, nothing drawn)
        assert not fig.axes[3 * 2].get_images() and not fig.axes[4 * 2].get_images()
    finally:
        plt.close(fig)
    out = case_figure(*args, tmp_path / "figs" / "case_c1.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
