"""MoDiff end to end on a tiny two-rater dataset made by ``convert_isbi2015`` from a fake ISBI 2015 layout: nnU-Net's
real preprocessing and augmentation keep the soft targets aligned with the image, the fast variant trains and
predicts through the stock console scripts, and the diverse samples and their sample-set metrics are written."""
import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DEVICE, make_trainer, nnunet_env, run
from test_multirater import make_fake_isbi

pytestmark = pytest.mark.e2e
DATASET_ID = 995
DATASET = "Dataset995_ISBIFake"
TRAINER = "nnUNetTrainerMoDiff_tiny"


@pytest.fixture(scope="module")
def isbi(tmp_path_factory):
    """6 cases (2 subjects × 3 time points, 24×28×24, two raters), planned, preprocessed and trained (fold 0)."""
    root = tmp_path_factory.mktemp("modiff")
    env = nnunet_env(root)
    make_fake_isbi(root / "isbi", subjects=2, timepoints=3)
    run([BIN / "nndiff", "convert-isbi2015", root / "isbi", "-d", DATASET_ID, "--name", "ISBIFake", "--raw",
         root / "raw", "--no-progress"], env)
    raw = root / "raw" / DATASET
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", "1", "-np", "1",
         "--verify_dataset_integrity"], env, nnUNet_n_proc_DA=1)
    ctx = SimpleNamespace(root=root, env=env, raw=raw, preprocessed=Path(env["nnUNet_preprocessed"]) / DATASET)
    ctx.train = run([BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", DEVICE], env)
    ctx.model = Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    return ctx


@pytest.fixture
def isbi_env(isbi, monkeypatch):
    for k, v in isbi.env.items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    for k in [k for k in __import__("os").environ if k.startswith("NNDIFF_")]:
        monkeypatch.delenv(k)
    return isbi


def _corr(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_soft_targets_survive_preprocessing_and_augmentation(isbi_env):
    """FLAIR = 100 + 100 k in the fake: after nnU-Net's preprocessing (crop, resampling of differing spacings) and
    the trainer's real augmentation (nnU-Net's data loader), the image and P = k/R must still coincide."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunet_diffusion.trainers import TRAINERS

    plans = json.loads((isbi_env.preprocessed / "nnUNetPlans.json").read_text())
    spacings = {tuple(np.round(sitk.ReadImage(str(f)).GetSpacing(), 3))
                for f in (isbi_env.raw / "imagesTr").glob("*_0000.nii.gz")}
    planned = plans["configurations"]["3d_fullres"]["spacing"]
    assert len(spacings) == 2 and any(abs(v - 1.1) < 1e-3 for v in planned)  # 1.0 and 1.2 mm resampled to 1.1
    folder = str(isbi_env.preprocessed / "nnUNetPlans_3d_fullres")
    ds = infer_dataset_class(folder)(folder)
    for case in ds.identifiers:
        data, seg, _, _ = ds.load_case(case)
        data, seg = np.asarray(data[:]), np.asarray(seg[:])
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}  # counts stay whole numbers through resampling
        assert _corr(data[0], seg[0]) > 0.97

    trainer = make_trainer(isbi_env, TRAINERS[TRAINER], 0)
    trainer.initialize()
    assert trainer.raters == 2 and int(trainer.network.raters) == 2
    dl_tr, _ = trainer.get_dataloaders()
    aligned, shifted = [], []
    values = set()
    for _ in range(3):
        batch = next(dl_tr)
        y, mask = trainer.targets(batch["target"])
        assert mask is None and y.shape[1] == 3 and torch.allclose(y.sum(1), torch.ones_like(y[:, 0]))
        p = y[:, 1].numpy()
        values |= set(np.round(np.unique(p), 4).tolist())
        image = batch["data"][:, 0].numpy()
        for b in range(p.shape[0]):
            if p[b].std() > 0:
                aligned.append(_corr(image[b], p[b]))
                shifted.append(_corr(image[b], np.roll(p[b], (6, 6, 6), axis=(0, 1, 2))))
    assert values <= {0.0, 0.5, 1.0} and {0.5, 1.0} <= values   # P = k/R with R = 2
    assert aligned and min(aligned) > 0.6, aligned                 # augmented image and soft target coincide
    assert max(shifted) < min(aligned) - 0.2, (aligned, shifted)  # ... which a misaligned pair would not


def test_console_scripts_train_modiff(isbi):
    out = isbi.train.output
    assert f"Using trainer '{TRAINER}' from" in out
    fold = isbi.model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and int(ckpt["network_weights"]["raters"]) == 2
    assert ckpt["nnunet_diffusion"]["raters"] == 2 and "plateau_scheduler" in ckpt["nnunet_diffusion"]
    assert any(".ldf_label." in k for k in ckpt["network_weights"]) and \
        any(".msa." in k for k in ckpt["network_weights"])
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}  # nnU-Net evaluated the vote-count labels


def test_predict_samples_and_sample_set_metrics(isbi_env, tmp_path):
    from nnunet_diffusion.evaluation.samples import generalized_energy_distance, hungarian_matched_iou

    cases = ["training02_01", "training02_02"]
    images = tmp_path / "images"
    images.mkdir()
    for case in cases:
        for f in (isbi_env.raw / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, images / f.name)
    pred = tmp_path / "pred"
    proc = run([BIN / "nndiff", "predict", "--samples-out", "--samples", 2, "-i", images, "-o", pred, "-d",
                DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", DEVICE, "-npp", "1", "-nps", "1",
                "--disable_progress_bar"], isbi_env.env)
    assert "samples: 4 files" in proc.output
    for case in cases:
        p, ref = sitk.ReadImage(str(pred / f"{case}.nii.gz")), sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        assert p.GetSize() == ref.GetSize() and np.allclose(p.GetSpacing(), ref.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(p)).tolist()) <= {0, 1, 2}

    written = sorted((pred / "samples").glob("*.nii.gz"))
    assert sorted(p.name for p in written) == sorted(f"{c}_sample{i}.nii.gz" for c in cases for i in (1, 2))
    for f in written:
        s = sitk.ReadImage(str(f))
        ref = sitk.ReadImage(str(images / f"{f.name.split('_sample')[0]}_0000.nii.gz"))
        assert s.GetSize() == ref.GetSize() and np.allclose(s.GetOrigin(), ref.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(s)).tolist()) <= {0, 1}

    run([BIN / "nndiff", "evaluate-samples", pred / "samples", isbi_env.raw / "labelsRaters", "-o",
         tmp_path / "metrics.csv"], isbi_env.env)
    result = json.loads((tmp_path / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["case"] for r in rows] == [*cases, "mean"] and rows[0]["n"] == "2" and rows[0]["m"] == "2"
    for row, case in zip(rows, cases):
        samples = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "samples" / f"{case}_sample{i}.nii.gz")))
                            for i in (1, 2)])
        raters = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(
            str(isbi_env.raw / "labelsRaters" / f"{case}_rater{r}.nii.gz"))) for r in (1, 2)])
        assert float(row["ged"]) == pytest.approx(generalized_energy_distance(samples, raters))
        assert float(row["hm_iou"]) == pytest.approx(hungarian_matched_iou(samples, raters))
    assert float(rows[-1]["ged"]) == pytest.approx(np.mean([float(r["ged"]) for r in rows[:2]]))
    assert result["mean"]["case"] == "mean"
