"""Shared fixtures: a synthetic dataset planned by nnU-Net's real console script, and trained tiny models.

Everything runs through the installed console scripts (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``,
``nnUNetv2_predict``) in subprocesses, with ``nnUNet_extTrainer`` set exactly as ``nndiff env`` prints it.
Worker processes are kept small for a 2-core machine: nnUNet_n_proc_DA=0 (1 for planning, where 0 crashes),
nnUNet_def_n_proc=1.

The end-to-end tests train and predict on the CPU. On a machine with a GPU, ``NNDIFF_TEST_DEVICE=cuda`` runs the
same console-script calls with ``-device cuda`` (nnU-Net's AMP path) and ``NNDIFF_TEST_COMPILE=1`` sets
``nnUNet_compile`` (torch.compile of the trainers' ``compiled_parts``); CI never sets either.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nnunet_diffusion.environment import environment_with_trainers
from nnunet_diffusion.dataset_conversion.synthetic import make_synthetic_dataset

BIN = Path(sys.executable).parent
DATASET_ID = 990
DATASET = "Dataset990_NNDiffSynthetic"
DEVICE = os.environ.get("NNDIFF_TEST_DEVICE", "cpu")
COMPILE = os.environ.get("NNDIFF_TEST_COMPILE", "0")


def nnunet_env(root: Path) -> dict:
    env = environment_with_trainers()
    for var in [k for k in env if k.startswith("NNDIFF_")]:
        del env[var]
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
               nnUNet_compile=COMPILE, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore::FutureWarning")
    return env


def run(args, env, timeout=900, check=True, **extra_env):
    env = dict(env, **{k: str(v) for k, v in extra_env.items()})
    t0 = time.time()
    proc = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.time() - t0
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited with {proc.returncode}:\n{proc.output[-4000:]}")
    return proc


def train(env, trainer, fold, *flags, **extra_env):
    return run([BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", fold, "-tr", trainer, "-device", DEVICE, *flags],
               env, **extra_env)


def predict(env, trainer, fold, input_dir, output_dir, **extra_env):
    return run([BIN / "nnUNetv2_predict", "-i", input_dir, "-o", output_dir, "-d", DATASET_ID, "-c", "3d_fullres",
                "-f", fold, "-tr", trainer, "-device", DEVICE, "-npp", "1", "-nps", "1", "--disable_progress_bar"],
               env, **extra_env)


def model_folder(ctx, trainer):
    return Path(ctx.env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """8 training + 2 test cases (32×40×36, 4 channels, BraTS regions), planned and preprocessed."""
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    raw = make_synthetic_dataset(root / "raw", DATASET_ID, num_train=8, num_test=2, progress=False)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", "1", "-np", "1",
         "--verify_dataset_integrity"], env, nnUNet_n_proc_DA=1)
    return SimpleNamespace(root=root, env=env, raw=raw, preprocessed=Path(env["nnUNet_preprocessed"]) / DATASET)


@pytest.fixture(scope="session")
def trained(planned):
    """nnUNetTrainer_tiny and nnUNetTrainerNNDM_tiny trained on fold 0 of the same plans and split."""
    planned.train_baseline = train(planned.env, "nnUNetTrainer_tiny", 0)
    planned.train_nndm = train(planned.env, "nnUNetTrainerNNDM_tiny", 0)
    return planned


def make_trainer(ctx, trainer_cls, fold):
    """A trainer object built as nnU-Net's get_trainer_from_args builds it (without the class lookup)."""
    import torch
    plans = json.loads((ctx.preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((ctx.preprocessed / "dataset.json").read_text())
    plans["continue_training"] = False
    return trainer_cls(plans=plans, configuration="3d_fullres", fold=fold, dataset_json=dataset_json,
                       device=torch.device("cpu"))


@pytest.fixture
def nnunet_paths(planned, monkeypatch):
    """This process's environment pointed at the session's nnU-Net folders (for in-process checks)."""
    for k, v in planned.env.items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("NNDIFF_")]:
        monkeypatch.delenv(k)
    return planned
