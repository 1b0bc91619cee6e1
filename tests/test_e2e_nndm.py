"""NNDM end to end through nnU-Net's own, unpatched console scripts on a tiny synthetic dataset:
plan/preprocess → train (baseline and NNDM, same split) → predict with and without refinement, plus
resume (--c), --val, -f all, starting from a trained baseline, and the bad inputs of the Foundation issue."""
import dataclasses
import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET_ID, DEVICE, make_trainer, model_folder, predict, run, train
from nnunet_diffusion.errors import NNDiffCheckpointError, NNDiffTrainingError
from nnunet_diffusion.trainers import TRAINERS

pytestmark = pytest.mark.e2e


def assert_valid_label_maps(pred_dir: Path, images_dir: Path, cases):
    for case in cases:
        pred = sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(images_dir / f"{case}_0000.nii.gz"))
        assert pred.GetSize() == ref.GetSize()
        assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())
        assert np.allclose(pred.GetDirection(), ref.GetDirection())
        values = set(np.unique(sitk.GetArrayFromImage(pred)).tolist())
        assert values <= {0, 1, 2, 3}, values


def test_stock_console_scripts_train_both_trainers_on_the_same_split(trained):
    out = trained.train_nndm.output
    assert "Using trainer 'nnUNetTrainerNNDM_tiny' from" in out and "nnunet_ext" in out
    assert "NNDM stage 1 (nnU-Net)" in out and "NNDM stage 3 (joint)" in out
    base, nndm = model_folder(trained, "nnUNetTrainer_tiny"), model_folder(trained, "nnUNetTrainerNNDM_tiny")
    for folder in (base, nndm):
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
        assert (folder / "fold_0" / "validation" / "summary.json").is_file()  # nnU-Net's final validation ran
    ckpt = torch.load(nndm / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerNNDM_tiny"
    assert ckpt["nnunet_diffusion"]["nndm_stage_epochs"] == [1, 0, 1]
    assert int(ckpt["network_weights"]["refiner_updates"]) == 4  # 4 joint iterations trained the refiner
    assert int(ckpt["network_weights"]["region_based"]) == 1
    # one split for both: the validation cases are the same
    val = lambda f: sorted(p.name for p in (f / "fold_0" / "validation").glob("*.nii.gz"))  # noqa: E731
    assert val(base) == val(nndm) and len(val(base)) == 2


def test_predict_with_and_without_refinement_writes_valid_label_maps(trained, tmp_path):
    images = trained.raw / "imagesTs"
    cases = ["synth_ts_000", "synth_ts_001"]
    refined = predict(trained.env, "nnUNetTrainerNNDM_tiny", 0, images, tmp_path / "refined")
    plain = predict(trained.env, "nnUNetTrainerNNDM_tiny", 0, images, tmp_path / "plain", NNDIFF_REFINE=0)
    base = predict(trained.env, "nnUNetTrainer_tiny", 0, images, tmp_path / "baseline")
    for folder in ("refined", "plain", "baseline"):
        assert_valid_label_maps(tmp_path / folder, images, cases)
    print(f"predict 2 cases: NNDM refined {refined.seconds:.1f} s, refine off {plain.seconds:.1f} s, "
          f"nnUNetTrainer {base.seconds:.1f} s")


def _preprocessed_case(ctx):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = str(ctx.preprocessed / "nnUNetPlans_3d_fullres")
    ds = infer_dataset_class(folder)(folder)
    data, _, _, _ = ds.load_case(ds.identifiers[0])
    return torch.from_numpy(np.asarray(data[:]))


def test_refine_off_reproduces_the_backbone_of_the_same_checkpoint(trained, nnunet_paths, monkeypatch):
    """NNDIFF_REFINE=0 through nnU-Net's predictor == nnU-Net's predictor on a plain network holding only
    the checkpoint's backbone weights (sliding window, Gaussian, 8 mirrors included)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    monkeypatch.setenv("NNDIFF_REFINE", "0")
    folder = model_folder(trained, "nnUNetTrainerNNDM_tiny")
    nndm = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    nndm.initialize_from_trained_model_folder(str(folder), (0,))
    assert type(nndm.network).__name__ == "NNDMNetwork" and not nndm.network.sampling.refine

    weights = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    backbone_weights = {k[len("backbone."):]: v for k, v in weights["network_weights"].items()
                        if k.startswith("backbone.")}
    pm, cm, dj = nndm.plans_manager, nndm.configuration_manager, nndm.dataset_json
    plain = nnUNetTrainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dj),
                                                     pm.get_label_manager(dj).num_segmentation_heads, False)
    stock = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    stock.manual_initialization(plain, pm, cm, [backbone_weights], dj, "nnUNetTrainer",
                                weights["inference_allowed_mirroring_axes"])
    data = _preprocessed_case(trained)
    a = nndm.predict_logits_from_preprocessed_data(data)
    b = stock.predict_logits_from_preprocessed_data(data)
    assert torch.equal(a, b)

    monkeypatch.setenv("NNDIFF_REFINE", "1")
    refined = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    refined.initialize_from_trained_model_folder(str(folder), (0,))
    assert not torch.equal(refined.predict_logits_from_preprocessed_data(data), a)


def test_nnunet_trainer_lookup_finds_our_single_class_objects(nnunet_paths):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    for name in ("nnUNetTrainerNNDM_tiny", "nnUNetTrainer_tiny", "nnUNetTrainerNNDM"):
        assert recursive_find_trainer_class_by_name(name) is TRAINERS[name]


def test_unknown_variant_name_is_explained_by_the_stock_cli(planned):
    proc = run([BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", "nnUNetTrainerNNDM_tinny", "-device",
                DEVICE], planned.env, check=False)
    assert proc.returncode != 0
    assert "unknown nndm variant 'tinny'" in proc.output and "tiny" in proc.output


def test_out_of_range_env_option_stops_predict_before_any_output(trained, tmp_path):
    proc = run([BIN / "nnUNetv2_predict", "-i", trained.raw / "imagesTs", "-o", tmp_path / "out", "-d", DATASET_ID,
                "-c", "3d_fullres", "-f", 0, "-tr", "nnUNetTrainerNNDM_tiny", "-device", DEVICE],
               trained.env, check=False, NNDIFF_STEPS=5000)
    assert proc.returncode != 0
    assert "NNDIFF_STEPS" in proc.output and "1..1000" in proc.output
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_nndiff_predict_passes_flags_as_options(trained, tmp_path):
    proc = run([BIN / "nndiff", "predict", "--steps", "0", "-i", trained.raw / "imagesTs", "-o", tmp_path, "-d",
                DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", "nnUNetTrainerNNDM_tiny", "-device", DEVICE],
               trained.env, check=False)
    # the flag's value is checked before nnU-Net starts, and the message names the flag the user typed
    assert proc.returncode == 2 and "nndiff predict --steps: sampling steps must be >= 1; got 0" in proc.output
    assert "Traceback" not in proc.output
    run([BIN / "nndiff", "predict", "--steps", "2", "--samples", "2", "--sampler", "ddpm", "--seed", "3",
         "-i", trained.raw / "imagesTs", "-o", tmp_path / "p", "-d", DATASET_ID, "-c", "3d_fullres", "-f", 0,
         "-tr", "nnUNetTrainerNNDM_tiny", "-device", DEVICE, "-npp", "1", "-nps", "1"], trained.env)
    assert_valid_label_maps(tmp_path / "p", trained.raw / "imagesTs", ["synth_ts_000", "synth_ts_001"])


def test_val_reruns_the_final_validation(trained):
    summary = model_folder(trained, "nnUNetTrainerNNDM_tiny") / "fold_0" / "validation" / "summary.json"
    before = summary.stat().st_mtime
    train(trained.env, "nnUNetTrainerNNDM_tiny", 0, "--val")
    assert summary.stat().st_mtime > before
    assert "mean" in json.loads(summary.read_text())


def test_resume_after_a_kill_continues_in_the_right_stage(planned):
    """Kill training right after the first epoch's checkpoint, then --c: it resumes at epoch 1 (stage 3)."""
    fold_dir = model_folder(planned, "nnUNetTrainerNNDM_tiny") / "fold_1"
    proc = subprocess.Popen([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "1", "-tr",
                             "nnUNetTrainerNNDM_tiny", "-device", DEVICE], env=planned.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (fold_dir / "checkpoint_latest.pth").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (fold_dir / "checkpoint_latest.pth").exists() and not (fold_dir / "checkpoint_final.pth").exists()
    latest = torch.load(fold_dir / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and "refiner_optimizer_state" in latest["nnunet_diffusion"]
    # compared on --c: the spec, and the residual source "auto" chose
    assert latest["trainer_config"] == dict(TRAINERS["nnUNetTrainerNNDM_tiny"].hparams().as_dict(),
                                            residual_source_used="backbone")
    resumed = train(planned.env, "nnUNetTrainerNNDM_tiny", 1, "--c")
    assert "Epoch 1" in resumed.output and "Epoch 0" not in resumed.output
    assert "NNDM stage 3 (joint)" in resumed.output
    final = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and int(final["network_weights"]["refiner_updates"]) == 4


def test_fold_all_starting_from_a_trained_baseline(planned, tmp_path):
    train(planned.env, "nnUNetTrainer_tiny", "all")
    proc = train(planned.env, "nnUNetTrainerNNDM_tiny", "all", NNDIFF_BASELINE="nnUNetTrainer_tiny")
    baseline_ckpt = model_folder(planned, "nnUNetTrainer_tiny") / "fold_all" / "checkpoint_final.pth"
    assert f"backbone initialised from the trained baseline {baseline_ckpt}" in proc.output
    assert "NNDM stage 1" not in proc.output and "Epoch 1" not in proc.output  # only the joint epoch ran
    ckpt = torch.load(model_folder(planned, "nnUNetTrainerNNDM_tiny") / "fold_all" / "checkpoint_final.pth",
                      map_location="cpu", weights_only=False)
    assert ckpt["nnunet_diffusion"]["nndm_stage_epochs"] == [0, 0, 1]
    assert ckpt["nnunet_diffusion"]["nndm_baseline"] == str(baseline_ckpt)
    predict(planned.env, "nnUNetTrainerNNDM_tiny", "all", planned.raw / "imagesTs", tmp_path / "pred")
    assert_valid_label_maps(tmp_path / "pred", planned.raw / "imagesTs", ["synth_ts_000", "synth_ts_001"])


def test_baseline_of_another_fold_is_refused(trained, nnunet_paths, monkeypatch):
    baseline = model_folder(trained, "nnUNetTrainer_tiny") / "fold_0" / "checkpoint_final.pth"
    monkeypatch.setenv("NNDIFF_BASELINE", str(baseline))
    trainer = make_trainer(trained, TRAINERS["nnUNetTrainerNNDM_tiny"], fold=3)
    assert trainer.stage_epochs[0] == 0
    trainer.initialize()
    with pytest.raises(NNDiffCheckpointError, match=r"fold 0 != 3"):
        trainer._load_baseline()
    monkeypatch.setenv("NNDIFF_BASELINE", "nnUNetTrainerNotTrained")
    with pytest.raises(Exception, match=r"no finished baseline checkpoint found.*nnUNetTrainerNotTrained__"):
        make_trainer(trained, TRAINERS["nnUNetTrainerNNDM_tiny"], fold=3)


def test_checkpoint_of_another_trainer_is_refused(trained, nnunet_paths):
    src = model_folder(trained, "nnUNetTrainer_tiny") / "fold_0" / "checkpoint_final.pth"
    trainer = make_trainer(trained, TRAINERS["nnUNetTrainerNNDM_tiny"], fold=4)
    dst = Path(trainer.output_folder) / "checkpoint_final.pth"
    shutil.copy(src, dst)
    with pytest.raises(NNDiffCheckpointError, match=r"written by trainer 'nnUNetTrainer_tiny'.*NNDM_tiny"):
        trainer.load_checkpoint(str(dst))


def test_resuming_under_a_changed_training_config_is_refused(trained, nnunet_paths, monkeypatch):
    """--c after a trainer_configs edit: a key that changes training stops it, naming the key, before the run starts;
    a predict-time key (the shipped sampler) does not, nor a key added since (logged), nor a finished training, nor a
    checkpoint without a recorded config."""
    cls = TRAINERS["nnUNetTrainerNNDM_tiny"]
    ckpt = model_folder(trained, "nnUNetTrainerNNDM_tiny") / "fold_0" / "checkpoint_final.pth"
    hp = cls.hparams()
    trainer = make_trainer(trained, cls, fold=0)
    trainer.load_checkpoint(str(ckpt))
    trainer.current_epoch = 1  # as if checkpoint_latest.pth of an unfinished run
    trainer.check_resumed_config()
    monkeypatch.setattr(cls, "hparams",
                        classmethod(lambda c: dataclasses.replace(hp, sampling_steps=hp.sampling_steps + 1)))
    trainer.check_resumed_config()
    real_recorded = cls.recorded_config
    monkeypatch.setattr(cls, "recorded_config", lambda self: dict(real_recorded(self), a_key_added_since=3))
    trainer.check_resumed_config()
    monkeypatch.setattr(cls, "recorded_config", real_recorded)
    log = Path(trainer.log_file).read_text()
    assert "predates the trainer config key(s) ['a_key_added_since']: resuming with their values [3]" in log
    monkeypatch.setattr(cls, "hparams", classmethod(lambda c: dataclasses.replace(hp, refiner_lr=hp.refiner_lr * 2)))
    with pytest.raises(NNDiffCheckpointError, match=r"another nndm trainer config \(refiner_lr .* -> .*\).*--c"):
        trainer.check_resumed_config()
    with pytest.raises(NNDiffCheckpointError, match="refiner_lr"):
        trainer.on_train_start()  # nnUNetv2_train --c runs this after loading the checkpoint
    trainer.current_epoch = trainer.num_epochs  # --c on a finished training trains nothing
    trainer.check_resumed_config()
    trainer.current_epoch = 1
    trainer._resumed_from = (str(ckpt), None)  # a checkpoint of an older version
    trainer.check_resumed_config()


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_non_finite_diffusion_loss_stops_with_a_message_and_changes_nothing(trained, nnunet_paths):
    folder = model_folder(trained, "nnUNetTrainerNNDM_tiny") / "fold_0"
    trainer = make_trainer(trained, TRAINERS["nnUNetTrainerNNDM_tiny"], fold=0)
    trainer.load_checkpoint(str(folder / "checkpoint_final.pth"))
    trainer.current_epoch = 1  # the joint stage
    trainer.lr_scheduler.step(trainer.current_epoch)
    net = trainer.unwrapped_network()
    net.refiner.register_forward_hook(lambda m, i, o: o * float("nan"))  # a diverged refiner
    before = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}  # weights (not the settings)
    hashes = {p.name: _sha(p) for p in folder.glob("checkpoint_*.pth")}
    trainer.set_deep_supervision_enabled(True)
    patch = trainer.configuration_manager.patch_size
    target = [torch.randint(0, 2, (2, 3, *[int(round(p * s)) for p, s in zip(patch, scale)])).float()
              for scale in trainer._get_deep_supervision_scales()]
    batch = {"data": torch.randn(2, 4, *patch), "target": target}
    with pytest.raises(NNDiffTrainingError, match=r"L_diff loss is not finite.*Last good checkpoint"):
        trainer.train_step(batch)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hashes == {p.name: _sha(p) for p in folder.glob("checkpoint_*.pth")}


def test_trainer_checkpoint_save_load_round_trip(trained, nnunet_paths, tmp_path):
    folder = model_folder(trained, "nnUNetTrainerNNDM_tiny") / "fold_0"
    a = make_trainer(trained, TRAINERS["nnUNetTrainerNNDM_tiny"], fold=0)
    a.load_checkpoint(str(folder / "checkpoint_final.pth"))
    copy = tmp_path / "copy.pth"
    a.save_checkpoint(str(copy))
    b = make_trainer(trained, TRAINERS["nnUNetTrainerNNDM_tiny"], fold=0)
    b.load_checkpoint(str(copy))
    sa, sb = a.unwrapped_network().state_dict(), b.unwrapped_network().state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
                                          for k in sa)
    assert sb["_extra_state"]["sampling"]["steps"] == 3  # the prediction settings travel too (tiny: DDIM 3)
    ra, rb = a.refiner_optimizer.state_dict()["state"], b.refiner_optimizer.state_dict()["state"]
    assert ra.keys() == rb.keys() and len(ra) > 0
    assert all(torch.equal(ra[i]["exp_avg"], rb[i]["exp_avg"]) for i in ra)
    assert (b.stage_epochs, b.num_epochs) == (a.stage_epochs, a.num_epochs)
    assert b.current_epoch == a.current_epoch + 1  # nnU-Net's convention: a checkpoint stores current_epoch + 1
    np.testing.assert_equal(b.logger.get_value("nndm_train_diff_losses", None),  # NaN in stage 1: equal here
                            a.logger.get_value("nndm_train_diff_losses", None))


def test_a_checkpoint_predicts_with_its_recorded_settings_after_the_toml_changed(trained, nnunet_paths, monkeypatch,
                                                                                capfd):
    """The sampler a model was trained with travels in its checkpoint: a later edit of trainer_configs/ (here the
    tiny variant's DDIM 3 steps turned into DDPM 7) does not change what nnU-Net's predictor samples; NNDIFF_* and
    ``nndiff predict``'s flags still override it, and a line says which settings came from where."""
    import dataclasses

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_diffusion import registry
    from nnunet_diffusion.inference.options import Overrides, prediction_overrides
    real = registry.settings

    def edited(name, variant=None):
        s = real(name, variant)
        return dataclasses.replace(s, sampler="ddpm", sampling_steps=7) if name == "nndm" else s
    monkeypatch.setattr(registry, "settings", edited)
    folder = str(model_folder(trained, "nnUNetTrainerNNDM_tiny"))

    def network():
        p = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
        p.initialize_from_trained_model_folder(folder, (0,))
        return p.network

    net = network()
    assert (net.recorded.sampler, net.recorded.steps) == ("ddim", 3) and net.recorded_from == "checkpoint"
    assert (net.sampling.sampler, net.sampling.steps) == ("ddim", 3)
    assert "sampler='ddim' (checkpoint)" in capfd.readouterr().out
    monkeypatch.setenv("NNDIFF_STEPS", "2")
    net = network()
    assert (net.sampling.sampler, net.sampling.steps) == ("ddim", 2)
    assert "steps=2 (environment (NNDIFF_STEPS))" in capfd.readouterr().out
    with prediction_overrides(Overrides((("steps", 1, "nndiff predict --steps"),))):
        net = network()
    assert net.sampling.steps == 1  # the flag wins over the variable
