"""DDMD end to end through nnU-Net's console scripts on the tiny synthetic dataset: the fast variant is trained
once (killed after the autoencoder stage's checkpoint, resumed with --c into the diffusion stage), then predicted
with nnUNetv2_predict; discrepancy maps and scores come back in the input images' geometry."""
import dataclasses
import csv
import shutil
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET_ID, DEVICE, make_trainer, model_folder, predict, run, train
from test_e2e_nndm import assert_valid_label_maps

from nnunet_diffusion.errors import NNDiffConfigError, NNDiffError, NNDiffTrainingError
from nnunet_diffusion.heads import ddmd
from nnunet_diffusion.trainers import TRAINERS

pytestmark = pytest.mark.e2e
TRAINER = "nnUNetTrainerDDMD_tiny"


@pytest.fixture(scope="module")
def trained_ddmd(planned, tmp_path_factory):
    """Train the tiny variant on fold 0; kill it once the first checkpoint (end of the autoencoder stage, epoch 1
    of 3) is on disk, keep a copy of that checkpoint, and resume with --c."""
    fold = model_folder(planned, TRAINER) / "fold_0"
    args = [BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", DEVICE]
    log = tmp_path_factory.mktemp("ddmd_log") / "first.txt"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(a) for a in args], env=planned.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while not (fold / "checkpoint_latest.pth").is_file() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
    planned.ddmd_first = log.read_text()
    planned.ddmd_first_seconds = time.time() - t0
    assert (fold / "checkpoint_latest.pth").is_file(), planned.ddmd_first[-3000:]
    assert not (fold / "checkpoint_final.pth").exists(), "training finished before it could be killed"
    planned.ddmd_killed = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    shutil.copy(fold / "checkpoint_latest.pth", log.parent / "killed.pth")
    planned.ddmd_resumed = train(planned.env, TRAINER, 0, "--c")
    return planned


def test_two_stages_and_resume_through_the_console_scripts(trained_ddmd):
    first, resumed = trained_ddmd.ddmd_first, trained_ddmd.ddmd_resumed.output
    print(f"DDMD_tiny: until killed {trained_ddmd.ddmd_first_seconds:.1f} s, resumed to the end "
          f"{trained_ddmd.ddmd_resumed.seconds:.1f} s")
    assert f"Using trainer '{TRAINER}' from" in first and "DDMD stage 1 (autoencoders)" in first
    assert "L_AE-1 (eq. 9)" in first and "L_AE-2 (eq. 10)" in first  # the autoencoders' losses are logged
    assert "ae2_normal = 'voxel' (ours, not the paper's)" in first  # _tiny's AE-2 mode is said to be ours
    killed = trained_ddmd.ddmd_killed
    epoch = killed["current_epoch"]
    assert epoch in (1, 2)  # killed after stage 1 (or, on a slow machine, one diffusion epoch later)
    assert killed["nnunet_diffusion"]["ddmd_stage_epochs"] == [1, 2]
    assert killed["nnunet_diffusion"]["ae_optimizer_state"]["state"]  # the autoencoders' Adam moments
    assert f"Epoch {epoch}\n" in resumed.replace("\r", "") and "Epoch 0\n" not in resumed.replace("\r", "")
    assert "DDMD stage 2 (diffusion)" in resumed and "DDMD stage 1" not in resumed

    fold = model_folder(trained_ddmd, TRAINER) / "fold_0"
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's final validation ran
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    w, wk = final["network_weights"], killed["network_weights"]
    assert final["trainer_name"] == TRAINER and int(w["region_based"]) == 1
    assert int(w["ae1.updates"]) == int(w["ae2.updates"]) == 4   # one epoch of 4 autoencoder iterations
    assert int(w["denoiser_updates"]) == 8                       # two epochs of 4 diffusion iterations
    ae_keys = [k for k in w if k.startswith(("ae1.", "ae2."))]
    assert len(ae_keys) > 20 and all(torch.equal(w[k], wk[k]) for k in ae_keys)  # frozen in stage 2
    assert any(not torch.equal(w[k], wk[k]) for k in w if k.startswith("denoiser."))


def test_predict_through_the_stock_console_script(trained_ddmd, tmp_path):
    images = tmp_path / "images"  # one case is enough here (the maps test below takes both)
    images.mkdir()
    for f in (trained_ddmd.raw / "imagesTs").glob("synth_ts_000_*.nii.gz"):
        shutil.copy(f, images / f.name)
    predict(trained_ddmd.env, TRAINER, 0, images, tmp_path / "pred")
    assert_valid_label_maps(tmp_path / "pred", images, ["synth_ts_000"])
    # the same through nndiff predict, with the discrepancy maps as a second pass
    proc = run([BIN / "nndiff", "predict", "--discrepancy", "-i", images, "-o", tmp_path / "pred2", "-d", DATASET_ID,
                "-c", "3d_fullres", "-f", 0, "-tr", TRAINER, "-device", DEVICE, "-npp", "1", "-nps", "1"],
               trained_ddmd.env)
    assert "discrepancy maps: 2 files" in proc.output  # X of the case + scores.csv
    assert_valid_label_maps(tmp_path / "pred2", images, ["synth_ts_000"])
    assert (tmp_path / "pred2" / "discrepancy" / "synth_ts_000_X.nii.gz").is_file()


def test_discrepancy_maps_have_the_input_geometry_and_scores_are_written(trained_ddmd, nnunet_paths, tmp_path):
    from nnunet_diffusion.inference.ddmd_maps import write_discrepancy_maps
    images = trained_ddmd.raw / "imagesTs"
    written = write_discrepancy_maps(model_folder(trained_ddmd, TRAINER), images,
                                     tmp_path, intra_maps=True, progress=False,  # folds: found as nnU-Net does
                                     trainers=TRAINERS)
    out = tmp_path / "discrepancy"
    cases = ["synth_ts_000", "synth_ts_001"]
    assert sorted(p.name for p in written) == sorted([f"{c}_{m}.nii.gz" for c in cases for m in "XY"] +
                                                     ["scores.csv"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    for case in cases:
        ref = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        ref_arr = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(images / f"{case}_{c:04d}.nii.gz")))
                            for c in range(4)])
        for m in "XY":
            img = sitk.ReadImage(str(out / f"{case}_{m}.nii.gz"))
            assert img.GetSize() == ref.GetSize()
            assert np.allclose(img.GetSpacing(), ref.GetSpacing()) and np.allclose(img.GetOrigin(), ref.GetOrigin())
            assert np.allclose(img.GetDirection(), ref.GetDirection())
            arr = sitk.GetArrayFromImage(img)
            assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() > 0
            # nnU-Net crops to the non-zero region of the images: the maps are 0 exactly outside its bounding box
            nz = np.argwhere((ref_arr != 0).any(0))
            lo, hi = nz.min(0), nz.max(0) + 1
            inside = np.zeros(arr.shape, bool)
            inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
            assert (arr[~inside] == 0).all() and (arr[inside] > 0).mean() > 0.5
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == cases
    for r in rows:
        inter_c = [float(v) for k, v in r.items() if k.startswith("inter_")]
        assert len(inter_c) == 4 and float(r["inter"]) > 0 and float(r["intra"]) > 0
        assert np.isclose(float(r["inter"]), np.mean(inter_c), rtol=1e-4)  # eq. 12: X is the mean over modalities
    with pytest.raises(NNDiffError, match="no images for case"):
        write_discrepancy_maps(model_folder(trained_ddmd, TRAINER), images, tmp_path, [0], "checkpoint_final.pth",
                               cases=["nope"], progress=False, trainers=TRAINERS)


def test_bad_config_and_untrained_ae2_are_explained(planned, nnunet_paths, monkeypatch):
    cls = TRAINERS[TRAINER]
    hp = cls.hparams()
    with pytest.raises(NNDiffConfigError, match="ae2_normal must be one of patch, voxel; got 'slice'"):
        dataclasses.replace(hp, ae2_normal="slice")  # DDMDSpec refuses it: no trainer ever sees it
    with pytest.raises(NNDiffConfigError, match="ae1_balanced must be true or false; got 'yes'"):
        dataclasses.replace(hp, ae1_balanced="yes")
    monkeypatch.setattr(cls, "hparams", classmethod(lambda c: dataclasses.replace(hp, ae2_normal="patch")))
    trainer = make_trainer(planned, cls, 0)
    trainer.initialize()
    trainer.unwrapped_network().ae1.updates.fill_(4)  # AE-1 trained, AE-2 never saw a normal patch
    with pytest.raises(NNDiffTrainingError, match="AE-2 never trained.*2d configuration.*_voxel"):
        trainer._enter_diffusion_stage()


def test_patch_mode_steps_ae2_only_for_batches_with_a_normal_patch(planned, nnunet_paths, monkeypatch):
    """The paper's image-level labels inside train_step: AE-2 (eq. 10) is stepped only when the batch holds a
    patch without tumour; AE-1 (eq. 9) every time."""
    cls = TRAINERS[TRAINER]
    hp = cls.hparams()
    monkeypatch.setattr(cls, "hparams", classmethod(lambda c: dataclasses.replace(hp, ae2_normal="patch")))
    trainer = make_trainer(planned, cls, 0)
    trainer.initialize()
    net = trainer.unwrapped_network()
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 4, *patch)
    target = torch.zeros(2, 3, *patch)
    target[:, :, 10:14, 10:14, 10:14] = 1  # tumour in both patches (BraTS regions)
    ae1_before = [p.detach().clone() for p in net.ae1.parameters()]
    ae2_before = [p.detach().clone() for p in net.ae2.parameters()]
    out = trainer.train_step({"data": data, "target": target})
    assert np.isnan(out["ae2_loss"]) and out["normal"] == 0
    assert all(torch.equal(a, b) for a, b in zip(ae2_before, net.ae2.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ae1_before, net.ae1.parameters()))
    assert (int(net.ae1.updates), int(net.ae2.updates)) == (1, 0)
    target[1] = 0  # the second patch is normal now
    out = trainer.train_step({"data": data, "target": target})
    assert np.isfinite(out["ae2_loss"]) and out["normal"] == 0.5
    assert not all(torch.equal(a, b) for a, b in zip(ae2_before, net.ae2.parameters()))
    assert (int(net.ae1.updates), int(net.ae2.updates)) == (2, 1)
    # §4.1's balanced mixture for AE-1 (eq. 9): 2 abnormal + 1 normal patch weigh 1/4, 1/4, 1/2
    seen, ae_loss = [], ddmd.ae_loss

    def spy(ensemble, b, voxel_mask=None, weights=None):
        seen.append((ensemble is net.ae1, None if weights is None else weights.tolist()))
        return ae_loss(ensemble, b, voxel_mask, weights)
    monkeypatch.setattr(ddmd, "ae_loss", spy)
    target3 = torch.zeros(3, 3, *patch)
    target3[:2, :, 10:14, 10:14, 10:14] = 1
    trainer.train_step({"data": torch.randn(3, 4, *patch), "target": target3})
    assert seen[0][0] and seen[0][1] == pytest.approx([0.25, 0.25, 0.5]) and seen[1] == (False, None)


def test_autoencoders_from_another_run_skip_stage_1(trained_ddmd, nnunet_paths, monkeypatch):
    """NNDIFF_DDMD_AES: DDMD-light starts from the tiny run's autoencoders (same plans, configuration, fold)."""
    from nnunet_diffusion.errors import NNDiffCheckpointError
    ckpt_file = model_folder(trained_ddmd, TRAINER) / "fold_0" / "checkpoint_final.pth"
    source = torch.load(ckpt_file, map_location="cpu", weights_only=False)["network_weights"]
    light = TRAINERS["nnUNetTrainerDDMD_light"]
    hp = TRAINERS[TRAINER].hparams()  # the tiny autoencoders' sizes, DDMD-light's conditioning (X only)
    monkeypatch.setattr(light, "hparams", classmethod(lambda c: dataclasses.replace(hp, intra_discrepancy=False)))
    monkeypatch.setenv("NNDIFF_DDMD_AES", TRAINER)  # a trainer name, found in $nnUNet_results
    trainer_ctx = trained_ddmd
    trainer = make_trainer(trainer_ctx, light, 0)
    assert trainer.stage_epochs == [0, hp.diffusion_epochs] and trainer.ae_checkpoint == str(ckpt_file)
    trainer.initialize()
    trainer._load_autoencoders()
    own = trainer.unwrapped_network().state_dict()
    keys = [k for k in own if k.startswith(("ae1.", "ae2."))]
    assert keys and all(torch.equal(own[k], source[k]) for k in keys)
    assert trainer.unwrapped_network().denoiser.stem.in_channels == 4 + 1 + 3  # b + X + x_t
    monkeypatch.setenv("NNDIFF_DDMD_AES", str(ckpt_file))  # a checkpoint file, given to fold 1
    other_fold = make_trainer(trainer_ctx, light, 1)
    other_fold.initialize()
    with pytest.raises(NNDiffCheckpointError, match="fold 0 != 1"):
        other_fold._load_autoencoders()
    monkeypatch.setenv("NNDIFF_DDMD_AES", "nnUNetTrainerDDMD_nope")
    with pytest.raises(NNDiffConfigError, match="NNDIFF_DDMD_AES='nnUNetTrainerDDMD_nope': no finished DDMD"):
        make_trainer(trainer_ctx, light, 0)


def test_the_papers_2d_regime_trains_and_predicts_on_the_2d_configuration(planned, tmp_path):
    """The documented default on BraTS: DDMD on nnU-Net's 2d configuration (slices; AE-2 only on tumour-free slices,
    AE-1's batches balanced), trained and predicted through the console scripts."""
    run([BIN / "nnUNetv2_preprocess", "-d", DATASET_ID, "-c", "2d", "-np", "1"], planned.env)
    trainer = "nnUNetTrainerDDMD_tiny2d"
    assert TRAINERS[trainer].hparams().ae2_normal == "patch" and TRAINERS[trainer].hparams().ae1_balanced
    run([BIN / "nnUNetv2_train", DATASET_ID, "2d", 0, "-tr", trainer, "-device", DEVICE], planned.env)
    ckpt = torch.load(model_folder(planned, trainer).with_name(f"{trainer}__nnUNetPlans__2d") / "fold_0" /
                      "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["init_args"]["configuration"] == "2d" and ckpt["current_epoch"] == 3
    out = tmp_path / "pred"
    run([BIN / "nnUNetv2_predict", "-i", planned.raw / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "2d", "-f", 0,
         "-tr", trainer, "-device", DEVICE, "-npp", "1", "-nps", "1", "--disable_progress_bar"], planned.env)
    cases = sorted(f.name[: -len("_0000.nii.gz")] for f in (planned.raw / "imagesTs").glob("*_0000.nii.gz"))
    assert cases and len(list(out.glob("*.nii.gz"))) == len(cases)
    assert_valid_label_maps(out, planned.raw / "imagesTs", cases)


def test_the_tables_slices_regime_trains_and_predicts_on_3d_fullres(planned, tmp_path):
    """The regime of DDMD's table rows (issue 33 item 4): 2D autoencoders on the axial slices of each 3D patch, AE-2
    on the tumour-free ones, the 3D denoiser, trained and predicted through the console scripts on 3d_fullres."""
    trainer = "nnUNetTrainerDDMD_tiny_slices"
    hp = TRAINERS[trainer].hparams()
    assert (hp.ae_input, hp.ae2_normal) == ("slices", "patch") == (TRAINERS["nnUNetTrainerDDMD_table"].hparams().ae_input,
                                                                 TRAINERS["nnUNetTrainerDDMD_table"].hparams().ae2_normal)
    proc = train(planned.env, trainer, 0)
    assert "DDMD stage 1 (autoencoders)" in proc.output
    ckpt = torch.load(model_folder(planned, trainer) / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert ckpt["current_epoch"] == 3
    out = tmp_path / "pred"
    run([BIN / "nnUNetv2_predict", "-i", planned.raw / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "3d_fullres",
         "-f", 0, "-tr", trainer, "-device", DEVICE, "-npp", "1", "-nps", "1", "--disable_progress_bar"], planned.env)
    cases = sorted(f.name[: -len("_0000.nii.gz")] for f in (planned.raw / "imagesTs").glob("*_0000.nii.gz"))
    assert cases and len(list(out.glob("*.nii.gz"))) == len(cases)
    assert_valid_label_maps(out, planned.raw / "imagesTs", cases)
