"""ReCoSeg end to end through nnU-Net's console scripts on the tiny synthetic dataset: synthesis stage, residual
maps of every case, segmentation stage, nnUNetv2_predict, residual NIfTI beside the prediction, a missing
T1ce at prediction, and resuming between the stages with --c."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET_ID, DEVICE, make_trainer, model_folder, predict, run, train
from test_e2e_nndm import assert_valid_label_maps

pytestmark = pytest.mark.e2e
TRAINER = "nnUNetTrainerReCoSeg_tiny"
CASES = ["synth_ts_000", "synth_ts_001"]


@pytest.fixture(scope="module")
def trained_recoseg(planned):
    planned.train_recoseg = train(planned.env, TRAINER, 0)
    return planned


def test_console_scripts_train_both_stages(trained_recoseg):
    out = trained_recoseg.train_recoseg.output
    assert f"Using trainer '{TRAINER}' from" in out
    assert "ReCoSeg stage 1 (synthesis)" in out and "ReCoSeg stage 2 (segmentation)" in out
    fold = model_folder(trained_recoseg, TRAINER) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    assert (fold / "checkpoint_best.pth").is_file()  # from the segmentation stage
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    assert ckpt["trainer_name"] == TRAINER and int(weights["target_channel"]) == 1
    assert any(k.startswith("synthesizer.") for k in weights) and any(k.startswith("segmenter.") for k in weights)
    best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["current_epoch"] == 2  # written after the segmentation epoch, not the synthesis one


def test_residual_maps_of_every_case_fit_the_preprocessed_data(trained_recoseg):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = trained_recoseg.preprocessed / "nnUNetPlans_3d_fullres"
    dataset = infer_dataset_class(str(folder))(str(folder))
    residuals = model_folder(trained_recoseg, TRAINER) / "fold_0" / "residuals"
    assert sorted(p.stem for p in residuals.glob("*.npy")) == sorted(dataset.identifiers)  # train + val cases
    for case in dataset.identifiers:
        data = dataset.load_case(case)[0]
        r = np.load(residuals / f"{case}.npy")
        assert r.shape == (1, *data.shape[1:]) and np.isfinite(r).all() and r.min() >= 0 and r.max() > 0


def test_predict_writes_segmentations_and_residual_maps(trained_recoseg, tmp_path):
    images = trained_recoseg.raw / "imagesTs"
    plain = tmp_path / "plain"
    predict(trained_recoseg.env, TRAINER, 0, images, plain)
    assert_valid_label_maps(plain, images, CASES)

    out = tmp_path / "pred"
    proc = run([BIN / "nndiff", "predict", "--residuals", "-i", images, "-o", out, "-d", DATASET_ID, "-c",
                "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", DEVICE, "-npp", "1", "-nps", "1"],
               trained_recoseg.env)
    assert f"residual maps: 2 files in {out / 'residuals'}" in proc.output
    assert_valid_label_maps(out, images, CASES)
    for case in CASES:
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(plain / f"{case}.nii.gz"))))
        r = sitk.ReadImage(str(out / "residuals" / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(images / f"{case}_0001.nii.gz"))
        assert r.GetSize() == ref.GetSize() and np.allclose(r.GetSpacing(), ref.GetSpacing())
        assert np.allclose(r.GetOrigin(), ref.GetOrigin()) and np.allclose(r.GetDirection(), ref.GetDirection())
        arr = sitk.GetArrayFromImage(r)
        assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() > 0
        assert (out / "residuals" / f"{case}.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_t1ce_is_replaced_by_the_synthetic_one(trained_recoseg, tmp_path):
    images = trained_recoseg.raw / "imagesTs"
    out = tmp_path / "missing"
    run([BIN / "nndiff", "predict", "--residuals", "--missing", "1", "-i", images, "-o", out, "-d", DATASET_ID,
         "-c", "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", DEVICE, "-npp", "1", "-nps", "1"],
        trained_recoseg.env)
    assert_valid_label_maps(out, images, CASES)
    for case in CASES:  # the real T1ce was never looked at: nothing differs from its synthetic substitute
        assert np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "residuals" / f"{case}.nii.gz")))) == 0
    bad = run([BIN / "nndiff", "predict", "--missing", "7", "-i", images, "-o", tmp_path / "bad", "-d", DATASET_ID,
               "-c", "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", DEVICE], trained_recoseg.env, check=False)
    assert bad.returncode != 0 and "channel(s) [7] do not exist" in bad.output


def test_resume_between_the_stages(trained_recoseg, nnunet_paths):
    """Stop after the synthesis stage, then `nnUNetv2_train --c` computes the residual maps and trains the
    segmentation stage. The checkpoint at the end of the synthesis stage is written even when save_every would not
    (here 2 instead of the variant's 1); residual maps of another synthesiser (a stale file, no source named) are
    deleted and computed again."""
    from nnunet_diffusion.trainers.recoseg import nnUNetTrainerReCoSeg_tiny
    t = make_trainer(trained_recoseg, nnUNetTrainerReCoSeg_tiny, 1)
    t.save_every = 2  # nnU-Net's own rule would save after epochs 2, 4, ...: not after the synthesis stage's one
    t.on_train_start()
    t.on_epoch_start()
    t.on_train_epoch_start()
    t.on_train_epoch_end([t.train_step(next(t.dataloader_train)) for _ in range(t.num_iterations_per_epoch)])
    with torch.no_grad():
        t.on_validation_epoch_start()
        t.on_validation_epoch_end([t.validation_step(next(t.dataloader_val))
                                   for _ in range(t.num_val_iterations_per_epoch)])
    t.on_epoch_end()
    fold = model_folder(trained_recoseg, TRAINER) / "fold_1"
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "residuals").exists()
    assert not (fold / "checkpoint_best.pth").exists()  # the synthesis stage cannot segment: no "best" yet
    assert torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"] == 1
    (fold / "residuals").mkdir()
    np.save(fold / "residuals" / "synth_tr_000.npy", np.zeros((1, 2, 2, 2), np.float16))  # of another synthesiser

    proc = train(trained_recoseg.env, TRAINER, 1, "--c")
    assert "ReCoSeg stage 1" not in proc.output and "ReCoSeg stage 2 (segmentation)" in proc.output
    assert "1 residual map(s) of another synthesiser or sampler deleted" in proc.output
    assert "residual maps of 8 case(s)" in proc.output
    assert (fold / "checkpoint_final.pth").is_file() and len(list((fold / "residuals").glob("*.npy"))) == 8
