"""The prediction settings a network records in its state dict (so a checkpoint keeps them), the user's overrides
laid over them, and settings pinned by a caller; on the NNDM network of tests/test_nndm_network.py."""
from dataclasses import replace

import pytest
import torch

from nnunet_diffusion.errors import NNDiffConfigError
from nnunet_diffusion.inference.options import (Overrides, SamplingOptions, current_overrides, overrides_from_env,
                                                prediction_overrides)
from test_nndm_network import DDIM3, make_network

TOML_TODAY = SamplingOptions(refine=True, steps=7, sampler="ddpm", samples=2, seed=0, tta_refine="window")


def reloaded(state, sampling=TOML_TODAY, overrides=Overrides()):
    """A network built as nnU-Net's predictor builds one today (the trainer config's settings), then loaded."""
    net = make_network(sampling=sampling, overrides=overrides)
    net.load_state_dict(state)
    return net


def test_the_state_dict_carries_the_settings_the_model_was_built_with(capsys):
    state = make_network(sampling=DDIM3).state_dict()
    assert state["_extra_state"]["sampling"]["steps"] == 3
    net = reloaded(state)
    assert net.sampling == DDIM3 and net.recorded_from == "checkpoint"
    assert "steps=3 (checkpoint)" in capsys.readouterr().out


def test_overrides_are_laid_over_the_recorded_settings_and_named():
    state = make_network(sampling=DDIM3).state_dict()
    net = reloaded(state, overrides=overrides_from_env({"NNDIFF_STEPS": "2", "NNDIFF_SEED": "5"}))
    assert net.sampling == replace(DDIM3, steps=2, seed=5)
    assert net.overrides.sources() == {"steps": "environment (NNDIFF_STEPS)", "seed": "environment (NNDIFF_SEED)"}


def test_a_bad_override_names_where_it_came_from():
    with pytest.raises(NNDiffConfigError, match=r"nndiff predict --steps: sampling steps must be in 1\.\.100"):
        make_network(overrides=Overrides((("steps", 1000, "nndiff predict --steps"),)))


def test_a_pinned_setting_survives_loading_weights_and_unpinning_restores_the_recorded_one():
    state = make_network(sampling=DDIM3).state_dict()
    net = reloaded(state)
    pinned = replace(DDIM3, refine=False)
    net.set_sampling(pinned)
    net.load_state_dict(state)  # nnU-Net's predictor loads the weights again for every case
    assert net.sampling == pinned
    net.set_sampling(None)
    assert net.sampling == DDIM3


def test_a_checkpoint_from_before_recorded_settings_predicts_with_todays_config_and_says_so():
    state = make_network(sampling=DDIM3).state_dict()
    del state["_extra_state"]
    net = reloaded(state)
    assert net.sampling == TOML_TODAY and "records no prediction settings" in net.recorded_from


def test_nndiff_predict_flags_win_over_the_variables_within_their_block(monkeypatch):
    monkeypatch.setenv("NNDIFF_STEPS", "4")
    monkeypatch.setenv("NNDIFF_SEED", "9")
    assert current_overrides().sources()["steps"] == "environment (NNDIFF_STEPS)"
    with prediction_overrides(Overrides((("steps", 2, "nndiff predict --steps"),))):
        inside = current_overrides()
        assert dict((f, v) for f, v, _ in inside.items) == {"seed": 9, "steps": 2}
    assert dict((f, v) for f, v, _ in current_overrides().items)["steps"] == 4


def test_the_recorded_settings_are_those_of_the_trainer_config_not_the_overrides():
    """A training whose final validation runs under NNDIFF_* (the table's) must not record those."""
    net = make_network(sampling=DDIM3, overrides=overrides_from_env({"NNDIFF_STEPS": "1"}))
    assert net.sampling.steps == 1 and net.state_dict()["_extra_state"]["sampling"]["steps"] == 3
    assert torch.is_tensor(net.state_dict()["region_based"])
