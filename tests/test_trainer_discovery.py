"""A user's own trainer, a subclass of one of ours in a folder of their own listed in ``nnUNet_extTrainer``, is found
by nnU-Net's real lookup (``recursive_find_trainer_class_by_name``) whether that folder comes before or after ours;
a misspelt variant of one of our heads that no folder defines still gets our list of variants (issue 35).

Before the fix, our module's ``__getattr__`` raised the "unknown nndm variant 'mine'" help inside nnU-Net's
``hasattr`` search of our folder, which stopped the search before it reached a user's folder listed after ours.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATASET, train
from nnunet_diffusion.environment import ext_trainer_dir

USER_TRAINERS = '''
from nnunet_diffusion.trainers import nnUNetTrainerNNDM_table, nnUNetTrainerNNDM_tiny, nnUNetTrainerReCoSeg_tiny


class nnUNetTrainerNNDM_mine(nnUNetTrainerNNDM_table):
    """A user's change of one thing, as nnU-Net users write nnUNetTrainer_Xepochs."""


class nnUNetTrainerNNDM_minetiny(nnUNetTrainerNNDM_tiny):
    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file("user trainer nnUNetTrainerNNDM_minetiny in use")


class nnUNetTrainerReCoSeg_mine(nnUNetTrainerReCoSeg_tiny):
    pass
'''

LOOKUP = r'''
import json, os, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunet_diffusion.trainers import TRAINERS

ours, user = sys.argv[1], sys.argv[2]
out = {}
for order, folders in (("user_after_ours", [ours, user]), ("user_before_ours", [user, ours]), ("ours_only", [ours])):
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(folders)
    res = out[order] = {}
    for name in ("nnUNetTrainerNNDM_mine", "nnUNetTrainerReCoSeg_mine", "nnUNetTrainerNNDM_tabel",
                 "nnUNetTrainerNNDM_table"):
        try:
            cls = recursive_find_trainer_class_by_name(name)
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        base = cls.__bases__[0]
        res[name] = {"name": cls.__name__, "ours": TRAINERS.get(name) is cls, "module": cls.__module__,
                     "base": base.__name__, "base_is_ours": TRAINERS.get(base.__name__) is base}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user_trainers")
    (folder / "my_trainers.py").write_text(USER_TRAINERS)
    return folder


@pytest.fixture(scope="module")
def lookups(user_folder) -> dict:
    """nnU-Net's own lookup, in a fresh interpreter, for each order of the folders (one subprocess: the lookup
    imports nnU-Net's whole trainer tree)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NNDIFF_", "nnUNet_extTrainer"))}
    proc = subprocess.run([sys.executable, "-c", LOOKUP, ext_trainer_dir(), str(user_folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("order", ["user_after_ours", "user_before_ours"])
@pytest.mark.parametrize("name, base", [("nnUNetTrainerNNDM_mine", "nnUNetTrainerNNDM_table"),
                                        ("nnUNetTrainerReCoSeg_mine", "nnUNetTrainerReCoSeg_tiny")])
def test_a_users_subclass_is_found_in_either_order(lookups, order, name, base):
    found = lookups[order][name]
    assert "error" not in found, found
    assert found["name"] == name and found["module"] == "my_trainers" and not found["ours"]
    assert found["base"] == base and found["base_is_ours"], found


@pytest.mark.parametrize("order", ["user_after_ours", "user_before_ours", "ours_only"])
def test_a_misspelt_variant_no_folder_defines_gets_our_list_of_variants(lookups, order):
    error = lookups[order]["nnUNetTrainerNNDM_tabel"].get("error", "")
    assert "unknown nndm variant 'tabel'" in error and "table" in error and "tiny" in error, error


@pytest.mark.parametrize("order", ["user_after_ours", "user_before_ours", "ours_only"])
def test_our_own_trainers_are_still_our_single_class_objects(lookups, order):
    found = lookups[order]["nnUNetTrainerNNDM_table"]
    assert found.get("ours") is True, found


def test_without_a_user_folder_the_users_name_gets_our_help(lookups):
    error = lookups["ours_only"]["nnUNetTrainerNNDM_mine"].get("error", "")
    assert "unknown nndm variant 'mine'" in error, error


@pytest.mark.e2e
def test_stock_nnunet_train_trains_a_users_subclass_listed_after_ours(planned, user_folder):
    """``nnUNetv2_train ... -tr nnUNetTrainerNNDM_minetiny`` (a user's subclass of nnUNetTrainerNNDM_tiny in their
    own folder, listed in nnUNet_extTrainer after ours, the order that failed) trains the tiny schedule through
    nnU-Net's own console script; its checkpoint_final.pth is written by that class."""
    env = dict(planned.env, nnUNet_extTrainer=os.pathsep.join([ext_trainer_dir(), str(user_folder)]))
    proc = train(env, "nnUNetTrainerNNDM_minetiny", 0)
    assert f"Using trainer 'nnUNetTrainerNNDM_minetiny' from: {user_folder}" in proc.output
    fold = Path(env["nnUNet_results"]) / DATASET / "nnUNetTrainerNNDM_minetiny__nnUNetPlans__3d_fullres" / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerNNDM_minetiny"
    assert ckpt["current_epoch"] == 2  # the tiny schedule: 1 nnU-Net + 1 joint epoch
    logs = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "user trainer nnUNetTrainerNNDM_minetiny in use" in logs
