"""Out-of-fold residuals for NNDM's refiner (issue 32): which fold model predicts which case, refusal of a missing
fold, the cascade's corruption transforms switched off, and ŷ from the cascade's one-hot channels."""
import json

import pytest
import torch

from nnunet_diffusion.errors import NNDiffConfigError
from nnunet_diffusion.trainers import out_of_fold as oof

# nnU-Net's 5-fold split of 10 cases a..j (each case in exactly one validation set)
CASES = list("abcdefghij")
SPLITS = [{"train": [c for c in CASES if c not in CASES[2 * k:2 * k + 2]], "val": CASES[2 * k:2 * k + 2]}
          for k in range(5)]


def test_every_training_case_gets_the_fold_that_held_it_out():
    for f in range(5):
        sources = oof.out_of_fold_sources(SPLITS, f)
        assert sorted(sources) == sorted(SPLITS[f]["train"] + SPLITS[f]["val"])
        for case, g in sources.items():
            assert case in SPLITS[g]["val"] and case not in SPLITS[g]["train"]
            assert (g != f) == (case in SPLITS[f]["train"])  # training cases never by the fold's own model
    # by hand: fold 0 trains on c..j; c, d are fold 1's validation cases, e, f fold 2's, g, h fold 3's, i, j fold 4's;
    # its own validation cases a, b are held out by fold 0
    assert oof.out_of_fold_sources(SPLITS, 0) == {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2, "g": 3, "h": 3,
                                                  "i": 4, "j": 4}


def test_fold_all_takes_every_case_from_the_fold_that_held_it_out():
    sources = oof.out_of_fold_sources(SPLITS, "all")
    assert sources == {c: i // 2 for i, c in enumerate(CASES)}  # a, b by fold 0; c, d by fold 1; ...


def test_a_case_is_never_predicted_by_a_model_that_trained_on_it():
    bad = json.loads(json.dumps(SPLITS))
    bad[1]["train"].append("c")  # fold 1 holds c out and trains on it
    with pytest.raises(NNDiffConfigError, match="case c is both trained on and held out by fold 1"):
        oof.out_of_fold_sources(bad, 0)
    orphan = json.loads(json.dumps(SPLITS))
    orphan[0]["train"].append("z")
    with pytest.raises(NNDiffConfigError, match="training case z of fold 0 is in no fold's validation set"):
        oof.out_of_fold_sources(orphan, 0)
    with pytest.raises(NNDiffConfigError, match="fold 5 is not in splits_final.json"):
        oof.out_of_fold_sources(SPLITS, 5)


def test_a_missing_fold_is_refused_naming_it_and_the_command(tmp_path):
    baseline = tmp_path / "nnUNetTrainer_table__nnUNetPlans__3d_fullres"
    for g in (1, 2, 4):
        (baseline / f"fold_{g}").mkdir(parents=True)
        (baseline / f"fold_{g}" / "checkpoint_final.pth").write_bytes(b"x")
    assert oof.missing_folds(baseline, range(5)) == [0, 3]
    with pytest.raises(NNDiffConfigError, match=r"need fold 3 of the baseline nnUNetTrainer_table .*fold_3.*"
                                                r"nnUNetv2_train Dataset503_X 3d_fullres 3 -tr nnUNetTrainer_table "
                                                r"-p nnUNetPlans --npz"):
        oof.require_folds(baseline, [1, 2, 3, 4], "Dataset503_X", "3d_fullres", "nnUNetPlans")
    oof.require_folds(baseline, [1, 2, 4], "Dataset503_X", "3d_fullres", "nnUNetPlans")  # all there: no error


def test_a_map_of_another_checkpoint_is_stale(tmp_path):
    (tmp_path / oof.SOURCE_FILE).write_text(json.dumps({"a": "ckpt1", "b": "ckpt1"}))
    have = {"a", "b"}
    assert oof.stale_cases(tmp_path, {"a": "ckpt1", "b": "ckpt2", "c": "ckpt1"}, lambda c: c in have) == ["b", "c"]
    have.discard("a")  # recorded but its file is gone
    assert oof.stale_cases(tmp_path, {"a": "ckpt1"}, lambda c: c in have) == ["a"]


def test_y_hat_from_the_cascade_channels_regions_and_labels():
    # one-hot of labels (1, 2, 3) on 4 voxels: label 1, 2, 3, background
    onehot = torch.tensor([[[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]])  # (B=1, 3 labels, 4 voxels)
    regions = [(1, 2, 3), (2, 3), (3,)]  # BraTS: whole tumour, tumour core, enhancing
    y = oof.y_hat_from_onehot(onehot, (1, 2, 3), regions, has_regions=True)
    assert y.tolist() == [[[1., 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0]]]
    y = oof.y_hat_from_onehot(onehot, (1, 2, 3), None, has_regions=False)
    assert y.tolist() == [[[0., 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]]


def test_the_cascade_corruption_can_be_switched_off():
    from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
    from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
        RemoveRandomConnectedComponentFromOneHotEncodingTransform
    from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_diffusion import nnunet_compat

    def kinds(compose):
        return [type(getattr(t, "transform", t)).__name__ for t in compose.transforms]
    full = nnUNetTrainer.get_training_transforms((32, 32, 32), (0, 0), None, (0, 1, 2), False, is_cascaded=True,
                                                 foreground_labels=(1, 2, 3), regions=[(1, 2, 3), (2, 3), (3,)])
    assert {ApplyRandomBinaryOperatorTransform.__name__,
            RemoveRandomConnectedComponentFromOneHotEncodingTransform.__name__} <= set(kinds(full))
    clean = nnunet_compat.without_cascade_corruption(full)
    assert kinds(clean) == [k for k in kinds(full) if k not in (
        ApplyRandomBinaryOperatorTransform.__name__, RemoveRandomConnectedComponentFromOneHotEncodingTransform.__name__)]
    assert MoveSegAsOneHotToDataTransform.__name__ in kinds(clean)  # ŷ still reaches the data
