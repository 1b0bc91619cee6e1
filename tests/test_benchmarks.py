"""benchmarks/: the tables say what was measured, the NNDM defaults are what the speed benchmark times, and a
broken measurement stops the run instead of producing a table."""
import pytest

from benchmarks import speed
from benchmarks.__main__ import accuracy_table, main, render, speed_table
from benchmarks.accuracy import sampling_grid
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


def test_the_samples_axis_is_taken_at_its_own_steps_and_no_setting_is_measured_twice():
    assert sampling_grid([1, 10], [1, 4, 16], 10) == [("ddim", 1, 1), ("ddim", 10, 1), ("ddim", 10, 4),
                                                      ("ddim", 10, 16)]
    assert sampling_grid([5], [1], 10) == [("ddim", 5, 1), ("ddim", 10, 1)]


def _run(meta_cmd: str) -> dict:
    return {"command": meta_cmd, "started": "2026-01-01 00:00 UTC", "machine": "m", "versions": {"torch": "x"}}


def test_results_md_says_how_and_when_each_part_was_measured():
    sr = {"head": "nndm", "case_shape": [1, 2, 3], "patch_size": [1, 2, 3], "batch_size": 2,
          "train_step nnUNetTrainer": 2.0, "predict nnUNetTrainer": 4.0, "peak RSS (GB)": 1.0}
    row = {"trainer": "t", "setting": "ddim 10 steps x 4 samples", "seconds_per_case": 1.0,
           "metrics": {"whole tumor": {"dice": 0.5, "hd95": 3.0}}}
    text = render({"meta": _run("python -m benchmarks --part speed"), "quick": False, "fast": {"x": {"A": "1"}},
                   "results": [sr]},
                  {"meta": _run("python -m benchmarks --part accuracy"), "quick": False, "samples": [1, 4],
                   "samples_steps": 10, "trainer_defaults": True,
                   "accuracy": {"cases": ["c1"], "rows": [row], "notes": ["r: no samples axis"]}})
    assert "Measured by `python -m benchmarks --part speed`" in text
    assert "Measured by `python -m benchmarks --part accuracy`" in text
    assert "samples 1, 4) is taken at 10 DDIM steps" in text and "trainer default" in text
    assert "r: no samples axis." in text
    assert "| t | ddim 10 steps x 4 samples | 1.00 | 50.0 | 3.0 |" in text


def test_rendering_without_a_stored_part_stops_before_writing(tmp_path):
    out = tmp_path / "RESULTS.md"
    with pytest.raises(SystemExit, match=r"speed.json is missing: run `python -m benchmarks --part speed`"):
        main(["--part", "render", "--results-dir", str(tmp_path / "results"), "--out", str(out)])
    assert not out.exists()
