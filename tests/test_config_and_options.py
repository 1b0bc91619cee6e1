"""trainer_configs/ (variants are data, one class per name) and the NNDIFF_* predict-time options."""
import pickle

import pytest

from nnunet_diffusion import config
from nnunet_diffusion.errors import NNDiffConfigError
from nnunet_diffusion.inference.options import ENV_VARS, SamplingOptions, options_from_env
from nnunet_diffusion.trainers import TRAINERS, nndm


def test_nndm_defaults_are_the_papers_values_except_the_documented_fast_sampling():
    hp, paper = config.spec("nndm"), config.spec("nndm", "paper")
    for h in (hp, paper):
        assert (h.num_train_timesteps, h.beta_start, h.beta_end) == (1000, 1e-4, 0.02)  # NNDM §5.1
        assert h.beta_schedule == "linear_beta" and h.refiner_lr == 1e-4                  # NNDM §5.1
    # §4.2 epsilon-prediction, §4.3 T steps of the DDPM reverse process: the `_paper` variant
    assert (paper.prediction_type, paper.sampler, paper.sampling_steps) == ("epsilon", "ddpm", 1000)
    # the defaults: few deterministic steps on a residual-predicting refiner (issue 10's cost target), once per
    # window, the step count chosen by `make table` (1: every setting scored within 0.1 Dice point of the best);
    # the demo (the phantom benchmark's model) samples and is built exactly as the defaults
    assert (hp.prediction_type, hp.sampler, hp.sampling_steps, hp.num_samples, hp.tta_refine) == \
        ("sample", "ddim", 1, 1, "window")
    demo = config.spec("nndm", "demo")
    keys = ("prediction_type", "sampler", "sampling_steps", "num_samples", "tta_refine", "refiner_channels",
            "refiner_res_blocks", "num_train_timesteps")
    assert {k: getattr(demo, k) for k in keys} == {k: getattr(hp, k) for k in keys}


def test_every_variant_is_a_generated_subclass_registered_once():
    for head, base in (("nndm", nndm.nnUNetTrainerNNDM),):
        for v in config.variant_names(head):
            name = f"{base.__name__}_{v}"
            cls = TRAINERS[name]
            assert issubclass(cls, base) and cls.variant == v
            assert cls.__module__ == base.__module__ and getattr(nndm, name) is cls
            assert pickle.loads(pickle.dumps(cls)) is cls
    assert "nnUNetTrainer_tiny" in TRAINERS and "nnUNetTrainerNNDM_tiny" in TRAINERS


def test_tiny_variants_are_short():
    for name in ("nnUNetTrainer_tiny", "nnUNetTrainerNNDM_tiny"):
        hp = TRAINERS[name].hparams()
        assert hp.total_epochs <= 2 and hp.num_iterations_per_epoch <= 5


def test_a_variant_overrides_only_its_keys():
    base, tiny = config.spec("nndm"), config.spec("nndm", "tiny")
    assert tiny.sampling_steps == 3 and tiny.beta_end == base.beta_end


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(NNDiffConfigError, match=r"unknown nndm variant 'tinny'.*tiny"):
        config.resolve("nndm", "tinny")


DEFAULTS = SamplingOptions(True, 1000, "ddpm", 1, 0, "window")


def test_env_overrides_defaults():
    opts = options_from_env(DEFAULTS, 1000, {"NNDIFF_STEPS": "10", "NNDIFF_SAMPLER": "DDIM", "NNDIFF_REFINE": "0",
                                             "NNDIFF_SAMPLES": "3", "NNDIFF_SEED": "7", "NNDIFF_TTA_REFINE": "mirror"})
    assert opts == SamplingOptions(False, 10, "ddim", 3, 7, "mirror")
    assert options_from_env(DEFAULTS, 1000, {}) == DEFAULTS


@pytest.mark.parametrize("env,match", [
    ({"NNDIFF_STEPS": "0"}, r"NNDIFF_STEPS.*1\.\.1000"),
    ({"NNDIFF_STEPS": "1001"}, r"NNDIFF_STEPS.*1\.\.1000"),
    ({"NNDIFF_STEPS": "ten"}, r"NNDIFF_STEPS must be an integer; got 'ten'"),
    ({"NNDIFF_SAMPLES": "0"}, r"NNDIFF_SAMPLES.*samples must be >= 1"),
    ({"NNDIFF_SEED": "-1"}, r"NNDIFF_SEED.*seed must be >= 0"),
    ({"NNDIFF_SAMPLER": "euler"}, r"NNDIFF_SAMPLER.*ddpm, ddim"),
    ({"NNDIFF_REFINE": "maybe"}, r"NNDIFF_REFINE must be 0 or 1"),
    ({"NNDIFF_TTA_REFINE": "none"}, r"NNDIFF_TTA_REFINE.*window, mirror"),
])
def test_bad_env_values_name_the_variable(env, match):
    with pytest.raises(NNDiffConfigError, match=match):
        options_from_env(DEFAULTS, 1000, env)


def test_every_env_variable_is_documented_in_the_predict_options_page():
    from pathlib import Path
    page = (Path(__file__).parents[1] / "documentation" / "how_to" / "predict_options.md").read_text()
    for var in ENV_VARS:
        assert var in page, var
