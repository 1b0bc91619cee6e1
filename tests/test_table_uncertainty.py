"""benchmarks/table_uncertainty.py (issue 34's sections of the table) and nndiff compare's uncertainty quality, on
tiny hand-made prediction folders: nnU-Net's real ensembling (``ensemble_folders``), real predictor (a hand-built
one, for the mirrored predictions) and real evaluation, no trained model. The expected numbers are worked out in the
comments from the hand-made arrays."""
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from benchmarks import table_uncertainty as tu
from benchmarks.table import TableState

REGIONS = ["whole tumor", "tumor core", "enhancing tumor"]
DATASET_JSON = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "whole tumor": [1, 2, 3],
                                                         "tumor core": [2, 3], "enhancing tumor": 3},
                "regions_class_order": [1, 2, 3], "numTraining": 3, "file_ending": ".nii.gz"}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager"}  # what ensemble_folders reads
SHAPE = (10, 10, 12)
CASES = ["c0", "c1", "c2"]


def write_image(path: Path, array) -> None:
    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing((1.0, 1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def cube(shift: int) -> np.ndarray:
    """A 3x3x3 enhancing-tumour cube (label 3: in all three regions) at x = 3..5, moved ``shift`` voxels along x."""
    a = np.zeros(SHAPE, np.uint8)
    a[3:6, 3:6, 3 + shift:6 + shift] = 3
    return a


def write_prediction(folder: Path, case: str, reference: np.ndarray, prediction: np.ndarray, mode: str) -> None:
    """``<case>.nii.gz`` (``prediction``), ``<case>.npz`` (three region channels) and ``<case>.pkl`` (nnU-Net's
    properties, as its reader gives them) in ``folder``, with dataset.json and plans.json beside them. ``mode``
    "ranked": a right voxel's probability 0.99 where predicted, 0.01 elsewhere, a wrong voxel's 0.5 (entropy 1 on
    every error, H(0.99) = 0.081 on every right voxel); "inverted": wrong voxels certain (1 where predicted, 0
    elsewhere: entropy ~0), right voxels 0.7 / 0.3 (entropy 0.88)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    write_image(folder / f"{case}.nii.gz", prediction)
    wrong = (reference > 0) != (prediction > 0)  # one label in the cube: the same errors in every region
    pred = prediction > 0
    if mode == "ranked":
        p = np.where(wrong, 0.5, np.where(pred, 0.99, 0.01))
    else:
        p = np.where(wrong, np.where(pred, 1.0, 0.0), np.where(pred, 0.7, 0.3))
    np.savez_compressed(folder / f"{case}.npz", probabilities=np.stack([p] * 3).astype(np.float32))
    _, props = SimpleITKIO().read_seg(str(folder / f"{case}.nii.gz"))
    with open(folder / f"{case}.pkl", "wb") as f:
        pickle.dump(props, f)
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (folder / "plans.json").write_text(json.dumps(PLANS))


def heldout_raw(root: Path) -> Path:
    """References: case c<k> is the cube; its prediction (:func:`prediction_folder`) moves it k voxels along x."""
    raw = root / "heldout_raw" / "Dataset999_Tiny"
    for c in CASES:
        write_image(raw / "labelsTr" / f"{c}.nii.gz", cube(0))
    (raw / "dataset.json").write_text(json.dumps(DATASET_JSON))
    return raw


def prediction_folder(folder: Path, mode: str = "ranked", shifts=(0, 1, 2)) -> Path:
    for c, k in zip(CASES, shifts):
        write_prediction(folder, c, cube(0), cube(k), mode)
    return folder


# ------------------------------------------------------------------------------------------------ accounting

def test_equal_compute_accepts_equal_totals_and_refuses_unequal_ensembles_naming_members_and_steps():
    two_stock = {"nnUNetTrainer_table": 2000, "nnUNetTrainer_table_seed2": 2000}
    assert tu.equal_compute({"nnUNetTrainer_table": 2000, "nnUNetTrainerNNDM_table": 2000}, two_stock) == 4000
    with pytest.raises(ValueError) as e:
        tu.equal_compute({"nnUNetTrainer_table": 2000, "nnUNetTrainerNNDM_refiner_oof": 2520}, two_stock)
    msg = str(e.value)
    assert "nnUNetTrainerNNDM_refiner_oof (2520 steps)" in msg and "nnUNetTrainer_table (2000 steps)" in msg
    assert "4520" in msg and "4000" in msg and "equal compute" in msg
    with pytest.raises(ValueError, match="at least two members"):  # stock alone is no ensemble
        tu.equal_compute({"nnUNetTrainer_table": 4000}, two_stock)


def test_the_second_stock_variant_trains_the_tables_budget_with_identical_settings():
    from nnunet_diffusion import config
    a, b = config.spec("nnunet", "table"), config.spec("nnunet", "table" + tu.SEED2_SUFFIX)
    assert a.as_dict() == b.as_dict() and a.optimizer_steps == b.optimizer_steps == 2000


# ------------------------------------------------------------------------------------------------ the numbers

def test_a_perfectly_ranked_entropy_gives_auroc_1_an_inverted_one_0_through_folder_quality(tmp_path):
    raw = heldout_raw(tmp_path)
    q = tu.folder_quality(prediction_folder(tmp_path / "ranked"), raw / "labelsTr", DATASET_JSON, CASES)
    for region in REGIONS:
        r = q["quality"][region]
        # c1: errors x = 3 (missed) and x = 6 (added), 2 x 9 voxels; c2: x = 3, 4 and 6, 7, 4 x 9 voxels
        assert r["n_errors"] == 54 and r["n_cases"] == 3
        assert r["auroc"] == 1.0
        assert r["aurc"] == pytest.approx(r["optimal_aurc"])  # every right voxel before every wrong one
        # Brier by hand: each right voxel (1 - 0.99)^2 = 1e-4, each wrong one 0.5^2 = 0.25
        n, m = r["n_voxels"], r["n_errors"]
        assert r["brier"] == pytest.approx(((n - m) * 1e-4 + m * 0.25) / n)
        # Dice 1, 2/3, 1/3 and more of the margin uncertain as the cube moves: rho = -1
        assert q["dice"][region] == pytest.approx([1.0, 2 / 3, 1 / 3])
        assert r["spearman_rho"] == pytest.approx(-1.0)
    q = tu.folder_quality(prediction_folder(tmp_path / "inverted", "inverted"), raw / "labelsTr", DATASET_JSON, CASES)
    assert all(q["quality"][r]["auroc"] == 0.0 for r in REGIONS)


def test_the_mirror_variance_map_is_read_from_its_folder(tmp_path):
    raw = heldout_raw(tmp_path)
    pred = prediction_folder(tmp_path / "stock", "inverted")  # its entropy ranks the errors last ...
    var = tmp_path / "mirror"
    var.mkdir()
    for c, k in zip(CASES, (0, 1, 2)):  # ... the variance ranks them first: 0.2 on every error, 0 elsewhere
        wrong = (cube(0) > 0) != (cube(k) > 0)
        np.savez_compressed(var / f"{c}.npz", variance=np.stack([np.where(wrong, 0.2, 0.0)] * 3).astype(np.float32))
    q = tu.folder_quality(pred, raw / "labelsTr", DATASET_JSON, CASES, uncertainty_dir=var)
    assert all(q["quality"][r]["auroc"] == 1.0 for r in REGIONS)


def _predictor(network):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    config = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 1,
              "patch_size": [8, 8, 8], "median_image_size_in_voxels": [12, 12, 12], "spacing": [1.0, 1.0, 1.0],
              "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                     "force_separate_z": None},
              "batch_dice": False,
              "architecture": {"network_class_name": "torch.nn.Conv3d", "arch_kwargs": {},
                               "_kw_requires_import": []}}  # unused: the network is handed to the predictor
    plans = {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": config},
             "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
             "original_median_shape_after_transp": [12, 12, 12], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0,
                                                                   "min": -1.0, "percentile_00_5": -1.0,
                                                                   "percentile_99_5": 1.0, "std": 1.0}}}
    dj = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 1,
          "file_ending": ".nii.gz"}
    pm = PlansManager(plans)
    p = nnUNetPredictor(tile_step_size=0.5, device=torch.device("cpu"), perform_everything_on_device=False,
                        allow_tqdm=False)
    p.manual_initialization(network, pm, pm.get_configuration("3d_fullres"), [network.state_dict()], dj,
                            "nnUNetTrainer", (0, 1, 2))
    return p


def test_the_mirrored_predictions_average_to_nnunets_mirrored_prediction():
    import torch
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)  # an asymmetric kernel: each flip predicts differently
    p = _predictor(net)
    data = torch.randn(1, 12, 12, 12)  # two tiles per axis (patch 8, step 4), symmetric under a flip
    per_mirror = tu.mirror_logits(p, data)
    assert len(per_mirror) == 8 and p.use_mirroring  # restored
    nnunet = p.predict_logits_from_preprocessed_data(data).float()  # nnU-Net's own mirroring
    # nnU-Net accumulates the Gaussian-weighted tiles in float16: equal up to its rounding (largest where the
    # Gaussian's weights are smallest, at the image's border)
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    diff = (torch.stack([m.float() for m in per_mirror]).mean(0) - nnunet).abs()[inner]
    assert diff.max() < 0.02 and diff.mean() < 1e-3
    # what a mistake would give, far off: the flipped predictions not flipped back
    unflipped = [torch.flip(m.float(), [a + 1 for a in c]) if c else m.float()
                 for m, c in zip(per_mirror, tu.mirror_combinations((0, 1, 2)))]
    assert (torch.stack(unflipped).mean(0) - nnunet).abs()[inner].mean() > 10 * diff.mean()
    assert not torch.allclose(per_mirror[0], per_mirror[1], atol=1e-3)
    # through nnU-Net's preprocessing and export: 8 probability maps on the image's grid, a variance well above 0
    # inside the border; a pointwise network commutes with every flip, so its variance there is 0 up to float16
    image = np.random.default_rng(0).normal(size=(1, 12, 12, 12)).astype(np.float32)
    maps = tu.mirror_probabilities(p, image, {"spacing": [1.0, 1.0, 1.0]})
    assert len(maps) == 8 and maps[0].shape == (2, 12, 12, 12)
    from nnunet_diffusion.evaluation.uncertainty_quality import mirror_variance
    assert mirror_variance(maps)[inner].max() > 1e-2
    pointwise = tu.mirror_probabilities(_predictor(torch.nn.Conv3d(1, 2, 1)), image, {"spacing": [1.0, 1.0, 1.0]})
    assert mirror_variance(pointwise)[inner].max() < 1e-6


# ------------------------------------------------------------------------------------------------ both sections

def made_up_run(tmp_path):
    """A TableRun stand-in holding what the table's earlier steps recorded (trainings, NNDM's chosen default) and
    the held-out predictions with probabilities already made (tiny hand-made folders), so the sections' own steps
    run: quality, nnU-Net's ensembling, evaluation, results."""
    heldout_raw(tmp_path)
    state = TableState(tmp_path / "state.json")
    run = SimpleNamespace(state=state, workdir=tmp_path, args=SimpleNamespace(variant="table"), budget=2000,
                          heads=[("nnunet", "nnUNetTrainer"), ("nndm", "nnUNetTrainerNNDM"),
                                 ("recoseg", "nnUNetTrainerReCoSeg")],
                          run_id="test", raw=lambda heldout=False: tmp_path / "heldout_raw" / "Dataset999_Tiny")
    for t in ("nnUNetTrainer_table", "nnUNetTrainer_table_seed2", "nnUNetTrainerNNDM_table"):
        state.record(f"train {t}", {"steps": 2000, "seconds": 60.0})
    chosen = {"setting": "ddim 5 steps x 1 samples", "sampler": "ddim", "steps": 5, "samples": 1, "dice": 80.0,
              "cost": 5}
    state.record("default nnUNetTrainerNNDM_table", {"rows": [chosen], "chosen": chosen, "tolerance": 1.0})
    low = dict(chosen, dice=3.0)
    state.record("default nnUNetTrainerReCoSeg_table", {"rows": [low], "chosen": low, "tolerance": 1.0})
    state.record("uncertainty supports_samples nnUNetTrainerNNDM_table", True)

    def predicted(trainer, label, mode, shifts, seconds):
        folder = prediction_folder(tmp_path / "probabilities" / f"{trainer}__{label}".replace(" ", "_"), mode, shifts)
        state.record(f"uncertainty probabilities {trainer} {label}",
                     {"folder": str(folder), "seconds_per_case": seconds, "cases": CASES, "run": "test"})
    # stock: its entropy inverted; its second seed the same segmentation; NNDM: entropy ranked, fewer errors
    predicted("nnUNetTrainer_table", "stock", "inverted", (0, 1, 2), 2.0)
    predicted("nnUNetTrainer_table_seed2", "stock", "inverted", (0, 1, 2), 2.0)
    predicted("nnUNetTrainerNNDM_table", "ddim 5 steps x 8 samples", "ranked", (0, 1, 1), 16.0)
    predicted("nnUNetTrainerNNDM_table", "ddim 5 steps x 1 samples", "ranked", (0, 0, 1), 4.0)
    var = tmp_path / "probabilities" / "mirror"
    var.mkdir()
    for c in CASES:
        np.savez_compressed(var / f"{c}.npz", variance=np.zeros((3, *SHAPE), np.float32))
    state.record("uncertainty mirror variance nnUNetTrainer_table",
                 {"folder": str(var), "seconds_per_case": 3.0, "mirrors": 8, "cases": CASES, "run": "test"})
    return run


def test_both_sections_from_the_predictions_to_markdown_and_png(tmp_path):
    run = made_up_run(tmp_path)
    tu.measure(run)

    u = tu.uncertainty_result(run)
    rows = {r["label"]: r for r in u["rows"]}
    assert list(rows) == [tu.STOCK_ENTROPY, tu.STOCK_MIRROR, "nnUNetTrainerNNDM_table: entropy"]
    nndm = rows["nnUNetTrainerNNDM_table: entropy"]
    assert nndm["setting"] == "ddim 5 steps x 8 samples" and nndm["samples"] == 8  # 8 samples at its chosen sampler
    assert nndm["x_stock"] == pytest.approx(8.0) and rows[tu.STOCK_MIRROR]["x_stock"] == pytest.approx(1.5)
    for r in REGIONS:
        assert nndm["quality"][r]["auroc"] == 1.0 and rows[tu.STOCK_ENTROPY]["quality"][r]["auroc"] == 0.0
        assert rows[tu.STOCK_MIRROR]["quality"][r]["auroc"] == 0.5  # a constant map: chance
        # the mirror row is scored with stock's probabilities: the same calibration
        assert rows[tu.STOCK_MIRROR]["quality"][r]["brier"] == rows[tu.STOCK_ENTROPY]["quality"][r]["brier"]
    assert u["not_measured"][0]["trainer"] == "nnUNetTrainerReCoSeg_table"
    assert "did not learn" in u["not_measured"][0]["reason"]

    e = tu.ensemble_result(run)
    names = [r["name"] for r in e["rows"]]
    assert names == ["two stock nnU-Net models", "stock nnU-Net alone", "stock + nnUNetTrainerNNDM_table"]
    assert [r["training_steps"] for r in e["rows"]] == [4000, 2000, 4000]
    # two identical stock segmentations: their ensemble is that segmentation, Dice 1, 2/3, 1/3 (mean 2/3)
    assert e["rows"][0]["dice"]["whole tumor"]["mean"] == pytest.approx(2 / 3)
    assert e["rows"][1]["against_stock"]["whole tumor"]["mean_difference"] == pytest.approx(0.0)
    # stock + NNDM, nnU-Net's average of the probabilities: in c1 stock's cube moved 1 voxel (x = 4..6; "inverted":
    # 0.0 on its missed x = 3, 1.0 on its added x = 6, 0.7 on x = 4, 5) and NNDM's did not (0.99 on x = 3..5, 0.01
    # beyond): x = 3 averages (0.0 + 0.99) / 2 = 0.495, out; x = 6 (1.0 + 0.01) / 2 = 0.505, in: stock's cube again,
    # Dice 2/3 (the maximum of the two would have kept x = 3: Dice 2 * 27 / (36 + 27) = 6/7)
    per_case = e["rows"][2]["per_case"]["dice"]["whole tumor"]
    assert per_case[1] == pytest.approx(2 / 3)

    text = tu.uncertainty_markdown(u)
    assert text.splitlines()[0].startswith("| uncertainty map | setting | region | AUROC (errors) | AURC (optimal)")
    assert "| nnUNetTrainerNNDM_table: entropy | ddim 5 steps x 8 samples | whole tumor | 1.000 |" in text
    assert text.count("\n") == 1 + 3 * 3
    text = tu.ensemble_markdown(e)
    assert "| stock + nnUNetTrainerNNDM_table | nnUNetTrainer_table (stock, 2000) + nnUNetTrainerNNDM_table (ddim 5 " \
           "steps x 1 samples, 2000) | 4000 |" in text
    assert "(the reference)" in text.splitlines()[2] and "| 4.00 | 2.00 |" in text.splitlines()[2]
    result = {"uncertainty": u, "ensembles": e}
    blocks = tu.section_blocks(result, "table_reliability.png")
    assert any("![Reliability diagrams" in b for b in blocks) and "nnUNetTrainerReCoSeg_table did not learn" in \
        " ".join(blocks)
    headline = tu.headline_sentence(result)
    assert "Best error-finding uncertainty map" in headline and "nnUNetTrainerNNDM_table: entropy" in headline
    assert "stock's softmax entropy: 0.00 / 0.00 / 0.00" in headline
    assert "no stock + head ensemble, in any region" in headline  # 3 cases: no paired test reaches p < 0.05
    png = tu.reliability_png(u, tmp_path / "reliability.png")
    assert png.is_file() and png.stat().st_size > 10_000
    assert tu.uncertainty_markdown(None).startswith("(the uncertainty section has not been measured")


def test_an_ensemble_whose_members_trained_more_is_refused_before_ensembling(tmp_path):
    run = made_up_run(tmp_path)
    run.state.record("train nnUNetTrainerNNDM_table", {"steps": 2520, "seconds": 60.0})
    with pytest.raises(ValueError, match=r"nnUNetTrainerNNDM_table \(2520 steps\)"):
        tu.measure_ensembles(run)
    assert not (tmp_path / "ensembles").exists()  # refused before any ensembling
    assert not any(k.startswith("ensemble ") for k in run.state.records)


# ------------------------------------------------------------------------------------------------ nndiff compare

def test_compare_measures_the_uncertainty_of_trainers_with_probabilities(tmp_path, capsys):
    from nnunet_diffusion.cli import main
    results = tmp_path / "results" / "Dataset999_Tiny"
    gt = tmp_path / "gt"
    for c in CASES:
        write_image(gt / f"{c}.nii.gz", cube(0))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for trainer, mode in (("Ranked", "ranked"), ("Inverted", "inverted"), ("NoProbabilities", "ranked")):
        folder = prediction_folder(results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "validation", mode)
        if trainer == "NoProbabilities":
            for f in folder.glob("*.npz"):
                f.unlink()
    out = tmp_path / "cmp"
    rc = main(["compare", "-d", "Dataset999_Tiny", "-tr", "Ranked", "Inverted", "NoProbabilities", "-o", str(out),
               "--results", str(tmp_path / "results"), "--ref", str(gt), "--dataset-json",
               str(tmp_path / "dataset.json"), "--n-cases", "0", "--no-lesionwise", "-np", "1", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "## Uncertainty quality (entropy of the fused probabilities, within 3 voxels" in printed.out
    assert "uncertainty_quality.csv" in printed.out
    # beside the Dice: Dice 1, 2/3, 1/3 -> 66.67 %, AUROC 1 for the ranked map, 0 for the inverted one
    assert "| Ranked | 66.67 | 1.000 |" in printed.out and "| Inverted | 66.67 | 0.000 |" in printed.out
    assert "NoProbabilities: not measured: 3 of 3 cases have no probabilities (.npz)" in printed.out
    summary = json.loads((out / "summary.json").read_text())["uncertainty_quality"]
    assert summary["margin_voxels"] == 3 and set(summary["trainers"]) == {"Ranked", "Inverted"}
    assert summary["trainers"]["Ranked"]["enhancing tumor"]["spearman_rho"] == pytest.approx(-1.0)
    import pandas as pd
    csv = pd.read_csv(out / "uncertainty_quality.csv")
    assert len(csv) == 6 and set(csv.auroc) == {0.0, 1.0}
    assert (out / "figures" / "reliability.png").is_file()
    assert "## Uncertainty quality" in (out / "table.md").read_text()


def test_compare_without_probabilities_has_no_uncertainty_section(tmp_path):
    from nnunet_diffusion.evaluation.compare import compare_trainers
    gt = tmp_path / "gt"
    for c in CASES:
        write_image(gt / f"{c}.nii.gz", cube(0))
    folder = prediction_folder(tmp_path / "results" / "Dataset999_Tiny" / "A__nnUNetPlans__3d_fullres" / "fold_0" /
                               "validation")
    for f in folder.glob("*.npz"):
        f.unlink()
    res = compare_trainers("Dataset999_Tiny", ["A"], tmp_path / "cmp", results_dir=tmp_path / "results",
                           reference_dir=gt, dataset_json=DATASET_JSON, plots=False, num_processes=1,
                           progress=False, lesionwise=False)
    assert "Uncertainty" not in res.table and "uncertainty_quality" not in res.summary
    assert not (tmp_path / "cmp" / "uncertainty_quality.csv").exists()
