"""Every environment variable this package reads, with its help text: one registry, which the code that reads a
variable takes the name from and ``make docs`` (devtools/docs.py) renders into documentation/reference/environment.md.

- predict-time (``NNDIFF_STEPS``, ...): ``inference/options.py``'s ``ENV_VARS`` (read when ``nnUNetv2_predict``
  builds the network; ``nndiff predict`` sets them from flags);
- training-time: :data:`TRAINING_VARIABLES` (read when ``nnUNetv2_train`` builds a trainer);
- benchmarks and tests: :data:`DEVELOPMENT_VARIABLES`;
- nnU-Net's own variables this package sets or needs: :data:`NNUNET_VARIABLES`.

tests/test_doc_reference.py fails when a ``NNDIFF_*`` name in the code is missing here.
"""
from __future__ import annotations

BASELINE = "NNDIFF_BASELINE"
DDMD_AES = "NNDIFF_DDMD_AES"
UNLABELLED = "NNDIFF_UNLABELLED"
BENCH_DEVICE = "NNDIFF_BENCH_DEVICE"
TEST_DEVICE = "NNDIFF_TEST_DEVICE"
TEST_COMPILE = "NNDIFF_TEST_COMPILE"
TEST_SLURM = "NNDIFF_TEST_SLURM"

TRAINING_VARIABLES = {
    BASELINE: "NNDM: start from a trained nnU-Net of the same plans, configuration and fold (a checkpoint file, a "
              "model folder or a trainer name looked up in $nnUNet_results); stage 1 is skipped and the backbone "
              "loaded from it. Ignored when resuming (--c). nndiff grid makes an NNDM job wait for that fold of "
              "the baseline.",
    DDMD_AES: "DDMD: take the autoencoders (AE-1, AE-2) from a finished DDMD training of the same plans, "
              "configuration and fold (a checkpoint file, a model folder or a trainer name); stage 1 is skipped, "
              "e.g. to train DDMD and DDMD-light on the same autoencoders. Required when ae_epochs = 0 and the "
              "variant uses the discrepancy features. Ignored when resuming (--c).",
    UNLABELLED: "ReCoSeg: a folder of images without labels (nnU-Net's <case>_<XXXX><file ending> naming) that "
                "the synthesis stage also trains on; overrides the trainer config's unlabelled_folder.",
}

DEVELOPMENT_VARIABLES = {
    BENCH_DEVICE: "python -m benchmarks (speed part): cpu or cuda; default cuda when there is a GPU, else cpu.",
    TEST_DEVICE: "tests: the device of the end-to-end tests' nnUNetv2_train / nnUNetv2_predict calls (-device); "
                 "default cpu.",
    TEST_COMPILE: "tests: 1 sets nnUNet_compile in the end-to-end tests (torch.compile of the trainers' "
                  "compiled_parts); default 0.",
    TEST_SLURM: "tests: 1 runs the opt-in test of nndiff grid on a real SLURM controller (needs sbatch on PATH).",
}

NNUNET_VARIABLES = {
    "nnUNet_extTrainer": "set by `eval \"$(nndiff env)\"` (and by nndiff predict, nndiff demo, nndiff grid): "
                         "nnU-Net's trainer lookup also searches the folder holding this package's trainers; the "
                         "user's own folders stay first.",
    "nnUNet_raw": "nnU-Net's raw data folder; yours to set (nnU-Net's documentation/setting_up_paths.md). "
                  "nndiff make-synthetic and convert-brats write there.",
    "nnUNet_preprocessed": "nnU-Net's preprocessed data folder; yours to set.",
    "nnUNet_results": "nnU-Net's trained models folder; yours to set. Trainer names in NNDIFF_BASELINE and "
                      "NNDIFF_DDMD_AES are looked up there.",
}


def predict_variables() -> dict:
    """The predict-time variables and their help, as ``inference/options.py`` defines them."""
    from .inference.options import ENV_VARS
    return dict(ENV_VARS)


def all_variables() -> dict:
    """Every ``NNDIFF_*`` variable and its help."""
    return {**predict_variables(), **TRAINING_VARIABLES, **DEVELOPMENT_VARIABLES}
