"""benchmarks/: the tables say what was measured, the NNDM defaults are what the speed benchmark times, and a
broken measurement stops the run instead of producing a table."""
import pytest

from benchmarks import speed
from benchmarks.__main__ import accuracy_table, speed_table
from nnunet_diffusion import config


def test_speed_table_gives_ratios_to_the_stock_trainer_of_the_same_process():
    r = {"head": "nndm", "train_step nnUNetTrainer": 2.0, "train_step stage 3 (joint)": 2.5,
         "predict nnUNetTrainer": 4.0, "predict cost of one denoiser pass per window (from 1 and 5 DDIM steps)": 0.1,
         "predict default (ddim, 5 steps x 1 samples)": 5.0, "peak RSS (GB)": 1.5}
    rows = speed_table([r]).splitlines()
    assert "| nndm | train step stage 3 (joint) | 2.50 | 1.25 |" in rows
    assert "| nndm | predict default (ddim, 5 steps x 1 samples) | 5.00 | 1.25 |" in rows
    assert any("one denoiser pass" in x and x.endswith("|  |") for x in rows)  # a cost, not a ratio


def test_accuracy_table_shows_dice_in_percent_and_hd95_per_region():
    rows = [{"trainer": "t", "setting": "ddim 5 steps x 1 samples", "seconds_per_case": 1.0,
             "metrics": {"whole tumor": {"dice": 0.9, "hd95": 3.0}, "mean over regions": {"dice": 0.9, "hd95": 3}}}]
    lines = accuracy_table(rows).splitlines()
    assert lines[0] == "| trainer | setting | s / case | Dice whole tumor | HD95 whole tumor (mm) |"
    assert lines[2] == "| t | ddim 5 steps x 1 samples | 1.00 | 90.0 | 3.0 |"


def test_every_head_with_an_expensive_default_has_a_faster_setting_and_nndm_needs_none():
    assert set(speed.FAST) | {"nndm"} == set(speed.TRAINERS)
    hp = config.resolve("nndm")
    assert hp["sampler"] == "ddim" and hp["sampling_steps"] * hp["num_samples"] <= 10


def test_a_failing_head_measurement_raises(tmp_path):
    # an empty work folder: the child finds no planned dataset and exits non-zero; nothing may be filled in
    with pytest.raises(RuntimeError, match="speed benchmark of nndm failed"):
        speed.run_heads(tmp_path, ["nndm"], ["default"])
