"""NNDM's refiner on out-of-fold residuals (issue 32), end to end through nnU-Net's console scripts: a tiny stock
baseline trained on both folds of a two-fold split, then NNDM on fold 0 started from it (NNDIFF_BASELINE), whose
default residual source ("auto") becomes "oof" because every fold of the baseline is trained."""
import json
import shutil

import pytest
import torch

from conftest import model_folder, nnunet_env, train
from nnunet_diffusion.trainers.out_of_fold import SOURCE_FILE, oof_folder, out_of_fold_sources

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_folds(planned, tmp_path_factory):
    """The session's planned dataset copied, with a two-fold splits_final.json (4 + 4 of its 8 cases)."""
    root = tmp_path_factory.mktemp("oof")
    for part in ("raw", "preprocessed"):
        shutil.copytree(planned.root / part, root / part)
    env = nnunet_env(root)
    pre = root / "preprocessed" / planned.preprocessed.name
    (pre / "splits_final.json").unlink(missing_ok=True)
    cases = sorted(p.name[:-len(".pkl")] for p in (pre / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    assert len(cases) == 8
    splits = [{"train": cases[4:], "val": cases[:4]}, {"train": cases[:4], "val": cases[4:]}]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    return env, splits


def test_the_refiner_trains_on_the_other_folds_predictions(two_folds):
    env, splits = two_folds
    ctx = type("ctx", (), {"env": env})
    missing = train(env, "nnUNetTrainerNNDM_oof", 0, check=False, NNDIFF_BASELINE="nnUNetTrainer_tiny")
    assert missing.returncode != 0  # no baseline trained yet: a clear error, not a silent in-sample refiner
    assert "no finished baseline checkpoint found" in missing.output
    train(env, "nnUNetTrainer_tiny", 0)
    partial = train(env, "nnUNetTrainerNNDM_oof", 0, check=False, NNDIFF_BASELINE="nnUNetTrainer_tiny")
    assert partial.returncode != 0
    assert "need fold 1 of the baseline nnUNetTrainer_tiny" in partial.output and "nnUNetv2_train" in partial.output
    train(env, "nnUNetTrainer_tiny", 1)

    run = train(env, "nnUNetTrainerNNDM_tiny", 0, NNDIFF_BASELINE="nnUNetTrainer_tiny")  # residual_source "auto"
    assert "NNDM refiner's training residual: oof (nnU-Net's cascade corruption on)" in run.output
    baseline = model_folder(ctx, "nnUNetTrainer_tiny")
    folder = oof_folder(baseline, "3d_fullres")
    sources = out_of_fold_sources(splits, 0)
    assert {sources[c] for c in splits[0]["train"]} == {1}  # fold 0 trains on fold 1's validation cases
    recorded = json.loads((folder / SOURCE_FILE).read_text())
    assert sorted(recorded) == sorted(splits[0]["train"] + splits[0]["val"])
    for case, fingerprint in recorded.items():
        # never the model that trained on it: fold 0's training cases by fold 1, its validation cases by fold 0
        assert f"fold_{1 if case in splits[0]['train'] else 0}/" in fingerprint
        assert (folder / f"{case}.b2nd").is_file()
    ckpt = torch.load(model_folder(ctx, "nnUNetTrainerNNDM_tiny") / "fold_0" / "checkpoint_final.pth",
                      map_location="cpu", weights_only=False)
    assert ckpt["trainer_config"]["residual_source_used"] == "oof"
    assert int(ckpt["network_weights"]["refiner_updates"]) > 0
