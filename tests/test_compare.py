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

pytestmark = pytest.mark.e2e  # every test here uses the trained tiny models

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
    # the same case drawn without the uncertainty map has half the rows (the three views, no uncertainty block)
    dj = json.loads((trained.raw / "dataset.json").read_text())
    regions = list(REGIONS.items())
    without = case_figure(cases[0], gt / f"{cases[0]}.nii.gz", {"FakeA": (val_a / f"{cases[0]}.nii.gz", None)},
                          "FakeA", regions, dj, trained.raw / "imagesTr", ".nii.gz", tmp_path / "without.png")
    assert with_unc.shape[0] > 1.3 * assert_png_not_blank(without).shape[0]


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
