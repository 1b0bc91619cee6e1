"""MedSegDiff end to end through nnU-Net's console scripts on the tiny synthetic dataset: train the fast
variant, predict with an ensemble and an uncertainty map, reproducibility per seed."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET_ID, DEVICE, model_folder, run, train
from test_e2e_nndm import _preprocessed_case, assert_valid_label_maps

pytestmark = pytest.mark.e2e
TRAINER = "nnUNetTrainerMedSegDiff_tiny"


@pytest.fixture(scope="module")
def trained_msd(planned):
    planned.train_msd = train(planned.env, TRAINER, 0)
    return planned


def test_console_scripts_train_medsegdiff(trained_msd):
    out = trained_msd.train_msd.output
    assert f"Using trainer '{TRAINER}' from" in out
    fold = model_folder(trained_msd, TRAINER) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and int(ckpt["network_weights"]["region_based"]) == 1
    assert any(k.startswith("denoiser.ff.") for k in ckpt["network_weights"])  # FF-Parsers are in the model


def test_predict_ensemble_with_uncertainty_maps(trained_msd, tmp_path):
    images = trained_msd.raw / "imagesTs"
    out = tmp_path / "pred"
    run([BIN / "nndiff", "predict", "--uncertainty", "--samples", "3", "--seed", "3", "-i", images, "-o", out,
         "-d", DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", DEVICE, "-npp", "1", "-nps", "1"],
        trained_msd.env)
    cases = ["synth_ts_000", "synth_ts_001"]
    assert_valid_label_maps(out, images, cases)
    assert not list(out.glob("*.npz"))  # probabilities were only a means to the maps
    for case in cases:
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        for name in ("", "_whole_tumor", "_tumor_core", "_enhancing_tumor"):
            unc = sitk.ReadImage(str(out / "uncertainty" / f"{case}{name}.nii.gz"))
            assert unc.GetSize() == pred.GetSize() and np.allclose(unc.GetSpacing(), pred.GetSpacing())
            arr = sitk.GetArrayFromImage(unc)
            assert arr.min() >= 0 and arr.max() <= 1 and arr.max() > 0


def test_same_seed_same_prediction(trained_msd, nnunet_paths, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    data = _preprocessed_case(trained_msd)

    def logits(seed):
        monkeypatch.setenv("NNDIFF_SEED", str(seed))
        monkeypatch.setenv("NNDIFF_SAMPLER", "ddpm")
        p = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False,
                            use_mirroring=False)
        p.initialize_from_trained_model_folder(str(model_folder(trained_msd, TRAINER)), (0,))
        return p.predict_logits_from_preprocessed_data(data)

    a, b, c = logits(5), logits(5), logits(6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_authors_cal_output_is_trained_and_recorded(trained_msd):
    fold = model_folder(trained_msd, TRAINER) / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("denoiser.cal.") for k in ckpt["network_weights"])  # the cal decoder is in the model
    assert ckpt["network_weights"]["_extra_state"]["medsegdiff_output"] == "blend"
    assert ckpt["trainer_config"]["cal_weight"] == 10.0


def test_a_stop_rule_ends_the_training_through_nnunetv2_train_and_resuming_trains_nothing(planned, tmp_path):
    """nnUNetTrainerMedSegDiff_tinyStop: 4 epochs x 2 steps, a chance rule that fires after the first epoch."""
    stop = "nnUNetTrainerMedSegDiff_tinyStop"
    first = train(planned.env, stop, 0)
    fold = model_folder(planned, stop) / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 1 and ckpt["early_stop"]["steps"] == 2
    assert ckpt["early_stop"]["reason"].startswith("chance: after 2 optimiser steps")
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's final validation ran as after a full run
    assert "Stopping after epoch 0 of 4" in first.output or any(
        "Stopping after epoch 0 of 4" in f.read_text() for f in fold.glob("training_log_*.txt"))
    train(planned.env, stop, 0, "--c")
    again = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert again["current_epoch"] == 1  # --c on a stopped training trained nothing more
    out = tmp_path / "pred"
    from conftest import predict
    predict(planned.env, stop, 0, planned.raw / "imagesTs", out)
    assert_valid_label_maps(out, planned.raw / "imagesTs", ["synth_ts_000", "synth_ts_001"])
