"""benchmarks/table.py's machinery on small made-up inputs: budget accounting, bootstrap interval, paired test and
verdict, the default-choosing rule and resume. Expected values are worked out by hand in the comments."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from benchmarks import table


def test_total_epochs_counts_every_stage_of_a_staged_head_and_num_epochs_otherwise():
    from dataclasses import replace

    from nnunet_diffusion.config import spec, total_epochs
    stages = {"nndm": dict(stage1_epochs=3, stage2_epochs=4, stage3_epochs=5), "recoseg": dict(stage1_epochs=3,
              stage2_epochs=4), "ddmd": dict(ae_epochs=7, diffusion_epochs=11), "medsegdiff": dict(num_epochs=99),
              "nnunet": dict(num_epochs=99)}
    hp = {head: replace(spec(head), **values) for head, values in stages.items()}
    assert total_epochs(hp["nndm"]) == 3 + 4 + 5       # NNDM's baseline stage counts too
    assert total_epochs(hp["nndm"], from_baseline=True) == 4 + 5   # started from a trained nnU-Net
    assert total_epochs(hp["recoseg"]) == 3 + 4
    assert total_epochs(hp["recoseg"], from_baseline=True) == 3 + 4
    assert total_epochs(hp["ddmd"]) == 7 + 11
    assert total_epochs(hp["medsegdiff"]) == 99
    assert total_epochs(hp["nnunet"]) == 99
    assert hp["nndm"].optimizer_steps == 12 * hp["nndm"].num_iterations_per_epoch


def test_optimizer_steps_of_the_demo_variants():
    # nnunet.toml [variants.demo]: 20 epochs x 10 iterations; nndm.toml [variants.demo]: (15 + 4 + 1) x 10
    assert table.optimizer_steps("nnunet", "demo") == 200
    assert table.optimizer_steps("nndm", "demo") == 200


def _checkpoint(path, trainer, epochs, epoch_seconds, **extra):
    log = {"epoch_start_timestamps": [100.0 * i for i in range(epochs)],
           "epoch_end_timestamps": [100.0 * i + epoch_seconds for i in range(epochs)]}
    torch.save({"trainer_name": trainer, "current_epoch": epochs, "logging": log, **extra}, path)
    return path


def test_training_budget_adds_the_baseline_an_nndm_training_started_from(tmp_path):
    base = _checkpoint(tmp_path / "baseline.pth", "nnUNetTrainer_demo", 6, 2.5)
    nndm = _checkpoint(tmp_path / "nndm.pth", "nnUNetTrainerNNDM_demo", 34, 3.0,
                       nnunet_diffusion={"nndm_baseline": str(base)})
    assert table.training_budget(base) == table.Budget(steps=6 * 10, seconds=6 * 2.5)
    assert table.training_budget(nndm) == table.Budget(steps=34 * 10 + 6 * 10, seconds=34 * 3.0 + 6 * 2.5)
    base.unlink()
    with pytest.raises(FileNotFoundError, match="baseline.pth"):
        table.training_budget(nndm)


def test_training_budget_refuses_a_checkpoint_of_an_unknown_trainer(tmp_path):
    f = _checkpoint(tmp_path / "x.pth", "SomebodyElsesTrainer", 3, 1.0)
    with pytest.raises(ValueError, match="SomebodyElsesTrainer"):
        table.training_budget(f)


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    # 20 values, half 0 and half 1: mean 0.5, standard error sqrt(0.25 / 20) = 0.1118, 95 %: +-0.219
    lo, hi = table.bootstrap_interval([0.0] * 10 + [1.0] * 10)
    assert lo == pytest.approx(0.5 - 0.219, abs=0.04) and hi == pytest.approx(0.5 + 0.219, abs=0.04)
    assert table.bootstrap_interval([0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert table.bootstrap_interval([0.3]) == (0.3, 0.3)
    with pytest.raises(ValueError):
        table.bootstrap_interval([0.5, math.nan])


def test_paired_test_of_a_head_one_point_better_on_every_case():
    stock = [80.0, 71.0, 90.0, 65.0, 88.0, 77.0, 93.0, 60.0, 85.0, 79.0]
    head = [s + 1.0 for s in stock]
    p = table.paired_test(head, stock)
    # exact Wilcoxon signed-rank, n = 10, all differences positive: p = 2 / 2^10
    assert p.n == 10 and p.mean_difference == pytest.approx(1.0) and p.interval == (1.0, 1.0)
    assert p.p_value == pytest.approx(2 / 2 ** 10)
    assert table.verdict(p) == "better"
    assert table.verdict(table.paired_test(stock, head)) == "worse"
    # for HD95 lower is better: a head whose HD95 is one mm lower on every case is better
    assert table.verdict(table.paired_test(stock, head), higher_is_better=False) == "better"


def test_a_head_equal_to_stock_or_mixed_is_no_significant_difference():
    stock = [80.0, 70.0, 90.0, 60.0]
    same = table.paired_test(stock, stock)
    assert same.p_value == 1.0 and table.verdict(same) == "no significant difference"
    mixed = table.paired_test([81.0, 69.0, 91.0, 59.0], stock)
    assert table.verdict(mixed) == "no significant difference"
    with pytest.raises(ValueError, match="same order"):
        table.paired_test([1.0, 2.0], [1.0])


def test_the_default_is_the_cheapest_setting_within_one_dice_point_of_the_best():
    rows = [{"setting": "1 step", "cost": 1, "dice": 80.0},
            {"setting": "5 steps", "cost": 5, "dice": 85.5},
            {"setting": "10 steps", "cost": 10, "dice": 86.0},
            {"setting": "100 steps", "cost": 100, "dice": 86.2},
            {"setting": "broken", "cost": 0, "dice": math.nan}]
    # best 86.2; within 1 point: >= 85.2 -> 5, 10 and 100 steps; the cheapest is 5 steps
    assert table.cheapest_within(rows)["setting"] == "5 steps"
    assert table.cheapest_within(rows, tolerance=0.3)["setting"] == "10 steps"  # >= 85.9
    # equal cost: the more accurate one
    tie = [{"setting": "a", "cost": 4, "dice": 85.0}, {"setting": "b", "cost": 4, "dice": 85.9}]
    assert table.cheapest_within(tie)["setting"] == "b"
    with pytest.raises(ValueError):
        table.cheapest_within([{"setting": "x", "cost": 1, "dice": math.nan}])


def test_table_state_resumes_from_what_was_recorded(tmp_path):
    path = tmp_path / "table" / "state.json"
    s = table.TableState(path)
    assert not s.done("train nnUNetTrainer_table")
    s.record("train nnUNetTrainer_table", {"steps": 60, "seconds": 12.5})
    again = table.TableState(path)
    assert again.done("train nnUNetTrainer_table") and again.get("train nnUNetTrainer_table")["steps"] == 60
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]  # no temporary file left behind


def test_resume_every_writes_checkpoint_latest_between_the_snapshots(nnunet_paths, monkeypatch):
    """A variant with save_every = 4, resume_every = 2 and keep_snapshots: nnU-Net's own rule (its save_every
    attribute) writes checkpoint_latest.pth every 2 epochs, and only the one after 4 epochs is also kept as
    checkpoint_ep0004.pth, the snapshot a steps-accuracy curve measures."""
    from dataclasses import replace

    from conftest import make_trainer
    from nnunet_diffusion import nnunet_compat
    from nnunet_diffusion.trainers import TRAINERS
    base = TRAINERS["nnUNetTrainer_tiny"]

    class nnUNetTrainer_resumeprobe(base):
        @classmethod
        def hparams(cls):
            return replace(base.hparams(), save_every=4, resume_every=2, keep_snapshots=True)

    t = make_trainer(nnunet_paths, nnUNetTrainer_resumeprobe, 0)
    assert t.save_every == 2
    written = []
    monkeypatch.setattr(nnunet_compat, "checkpoint_dict", lambda trainer: {})  # which files, not their contents
    monkeypatch.setattr(type(t), "_save_atomic", staticmethod(lambda ckpt, f: written.append(Path(f).name)))
    for done in range(1, 9):
        t.current_epoch = done - 1  # nnU-Net saves inside on_epoch_end, before it counts the epoch
        if done % t.save_every == 0:
            t.save_checkpoint(str(Path(t.output_folder) / "checkpoint_latest.pth"))
    assert written == ["checkpoint_latest.pth", "checkpoint_latest.pth", "checkpoint_ep0004.pth",
                       "checkpoint_latest.pth", "checkpoint_latest.pth", "checkpoint_ep0008.pth"]


def test_resume_every_is_bookkeeping_and_range_checked():
    from nnunet_diffusion import config
    from nnunet_diffusion.spec import SpecError
    hp = config.spec("nnunet", "table")
    assert "resume_every" in hp.PREDICT_ONLY  # a resumed training may change it and stay one training
    with pytest.raises(SpecError, match="resume_every"):
        type(hp)(**{**hp.as_dict(), "resume_every": 0})


@pytest.mark.e2e
def test_a_kept_snapshot_counts_its_steps_and_nnunet_predicts_from_it(trained, tmp_path):
    """nnUNetTrainer_tiny (2 epochs x 4 iterations, keep_snapshots) keeps checkpoint_ep0001.pth after its first
    epoch; nnUNetv2_predict loads it by name (-chk), and the budget read from each checkpoint is 4 and 8 steps."""
    from conftest import BIN, DATASET_ID, DEVICE, model_folder, run
    fold = model_folder(trained, "nnUNetTrainer_tiny") / "fold_0"
    assert sorted(p.name for p in fold.glob("checkpoint_ep*.pth")) == ["checkpoint_ep0001.pth"]
    assert table.training_budget(fold / "checkpoint_ep0001.pth").steps == 1 * 4
    assert table.training_budget(fold / "checkpoint_final.pth").steps == 2 * 4
    out = tmp_path / "pred"
    run([BIN / "nnUNetv2_predict", "-i", trained.raw / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "3d_fullres",
         "-f", "0", "-tr", "nnUNetTrainer_tiny", "-chk", "checkpoint_ep0001.pth", "-device", DEVICE, "-npp", "1",
         "-nps", "1", "--disable_progress_bar"], trained.env)
    assert len(list(out.glob("*.nii.gz"))) == len(list((trained.raw / "imagesTs").glob("*_0000.nii.gz")))


def _made_up_run():
    stock = {"trainer": "nnUNetTrainer_table", "setting": "stock", "seconds_per_case": 2.0, "cases": ["a", "b", "c"],
             "dice": {"WT": [0.90, 0.80, 0.70]}, "hd95": {"WT": [3.0, 4.0, 5.0]}}
    head = {"trainer": "nnUNetTrainerX_table", "setting": "ddim 5 steps x 1 samples", "seconds_per_case": 5.0,
            "cases": ["a", "b", "c"], "dice": {"WT": [0.91, 0.81, 0.71]}, "hd95": {"WT": [3.0, 4.0, 5.0]}}
    return stock, head


def test_score_against_stock_gives_means_intervals_and_the_paired_verdicts():
    stock, head = _made_up_run()
    s = table.score_against(stock, stock, ["WT"])
    assert s["dice"]["WT"]["mean"] == pytest.approx(0.8) and s["against_stock"] == {}
    h = table.score_against(head, stock, ["WT"])
    c = h["against_stock"]["WT"]
    # +0.01 on each of 3 cases: exact Wilcoxon p = 2 / 2^3 = 0.25, not significant; HD95 identical: p = 1
    assert c["mean_difference"] == pytest.approx(0.01) and c["p_value"] == pytest.approx(0.25)
    assert c["verdict"] == "no significant difference" and c["hd95_p_value"] == 1.0


def test_markdown_table_has_a_row_per_setting_with_budget_interval_verdict_and_cost():
    stock, head = _made_up_run()
    rows = [{"trainer": m["trainer"], "setting": m["setting"], "seconds_per_case": m["seconds_per_case"],
             **table.score_against(m, stock, ["WT"])} for m in (stock, head)]
    result = {"regions": ["WT"], "rows": rows, "budget": {"nnUNetTrainer_table": {"steps": 500, "seconds": 600.0},
                                                          "nnUNetTrainerX_table": {"steps": 500, "seconds": 1200.0}}}
    lines = table.markdown(result).splitlines()
    assert lines[0].startswith("| trainer | prediction setting | optimiser steps | training wall time | Dice WT (%)")
    assert lines[2].startswith("| nnUNetTrainer_table | stock | 500 | 10 min | 80.0 [")
    assert "(the reference)" in lines[2] and lines[2].endswith("| 2.00 | 1.00 |")
    assert "WT: no significant difference (+1.0, p=0.250)" in lines[3] and lines[3].endswith("| 5.00 | 2.50 |")
    assert "| 20 min |" in lines[3]
    result["defaults"] = {"nnUNetTrainerX_table": {"rows": [{"setting": "ddim 1 steps x 1 samples", "dice": 3.0}]}}
    lines = table.markdown(result).splitlines()
    assert lines[3].startswith("| nnUNetTrainerX_table † |") and lines[2].startswith("| nnUNetTrainer_table |")


def test_the_summary_sentence_names_who_is_better_worse_or_no_different_and_says_none_plainly():
    def row(trainer, setting, **verdicts):
        return {"trainer": trainer, "setting": setting,
                "against_stock": {r: {"verdict": v} for r, v in verdicts.items()}}
    same, better, worse = "no significant difference", "better", "worse"
    result = {"budget_steps": 2000, "heldout_cases": list(range(20)), "rows": [
        row("nnUNetTrainer_table", "stock"),
        row("nnUNetTrainerNNDM_table", "refinement off (its backbone)", WT=same, TC=same),
        row("nnUNetTrainerNNDM_table", "ddim 5 steps x 1 samples", WT=better, TC=worse),
        row("nnUNetTrainerDDMD_table", "ddim 1 steps x 1 samples", WT=worse, TC=worse)]}
    text = table.summary_sentence(result)
    assert text.startswith("At an equal budget of 2000 optimiser steps, on 20 held-out phantoms: better than stock "
                           "nnU-Net in some region: nnUNetTrainerNNDM_table (WT). Worse in every region: "
                           "nnUNetTrainerDDMD_table. Worse in some region: nnUNetTrainerNNDM_table (TC). No "
                           "significant difference in any region: nnUNetTrainerNNDM_table with its refinement off.")
    result["rows"] = result["rows"][:2]
    assert "better than stock nnU-Net in some region: none. Worse in some region: none. No significant" in \
        table.summary_sentence(result)


def test_p_values_below_a_thousandth_are_not_printed_as_zero():
    assert (table.p_text(0.0000191), table.p_text(0.001), table.p_text(0.0432)) == ("p<0.001", "p=0.001", "p=0.043")


def test_curves_png_is_written(tmp_path):
    result = {"regions": ["WT", "TC"], "curves": {
        "stock": [{"steps": 100, "dice": {"WT": 0.5, "TC": 0.2}}, {"steps": 200, "dice": {"WT": 0.8, "TC": 0.6}}]}}
    png = tmp_path / "curves.png"
    table.plot_curves(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))


def test_every_trainer_of_the_table_trains_the_same_budget():
    # trainer_configs/*.toml [variants.table]: 200 epochs x 10 iterations, staged heads split the same 200 epochs
    heads = ("nnunet", "nndm", "medsegdiff", "recoseg", "modiff", "ddmd")
    assert {h: table.optimizer_steps(h, "table") for h in heads} == {h: 2000 for h in heads}


def test_stock_check_flags_a_region_below_the_floor_at_the_last_snapshot():
    curve = [{"steps": 2000, "dice": {"WT": 0.94, "TC": 0.91, "ET": 0.772}},
             {"steps": 400, "dice": {"WT": 0.5, "TC": 0.1, "ET": 0.0}}]
    c = table.stock_check(curve)
    assert c["steps"] == 2000 and not c["sane"] and c["below_floor"] == ["ET"]
    assert c["since"]["steps"] == 400 and c["since"]["change"]["ET"] == pytest.approx(0.772)
    curve[0]["dice"]["ET"] = 0.81
    assert table.stock_check(curve)["sane"]
    assert "since" not in table.stock_check(curve[:1])


MADE_UP_TOML = """# head comment
[defaults]
num_epochs = 1000
# inference: the paper's chain
sampler = "ddpm"                 # old trailing note
sampling_steps = 1000
num_samples = 5
fusion = "mean"

[variants.tiny]
sampler = "ddim"
sampling_steps = 3
num_samples = 1
"""


def test_set_default_sampler_rewrites_only_the_defaults_keys_and_replaces_its_own_comment():
    why = ["chosen by the rule", "second line"]
    once = table.set_default_sampler(MADE_UP_TOML, "ddim", 10, 1, why)
    lines = once.splitlines()
    i = lines.index('sampler = "ddim"')
    assert lines[i - 2:i] == ["# [make table] chosen by the rule", "# [make table] second line"]
    assert lines[i + 1:i + 3] == ["sampling_steps = 10", "num_samples = 1"]
    assert "# inference: the paper's chain" in lines and 'fusion = "mean"' in lines
    # the variant's keys are untouched
    assert once.endswith('[variants.tiny]\nsampler = "ddim"\nsampling_steps = 3\nnum_samples = 1\n')
    # a second run replaces the first run's comment instead of adding another
    # a reason longer than a line is wrapped, every line marked and within COMMENT_WIDTH columns
    long = table.set_default_sampler(MADE_UP_TOML, "ddim", 10, 1, ["word " * 60])
    marked = [line for line in long.splitlines() if line.startswith("# [make table]")]
    assert len(marked) == 3 and all(len(line) <= table.COMMENT_WIDTH for line in marked)
    assert " ".join(line.removeprefix("# [make table] ") for line in marked) == ("word " * 60).strip()
    twice = table.set_default_sampler(once, "ddim", 5, 1, ["new reason"])
    assert twice.count("# [make table]") == 1 and "sampling_steps = 5" in twice
    with pytest.raises(ValueError, match="lacks"):
        table.set_default_sampler("[defaults]\nsampler = 'ddpm'\n", "ddim", 5, 1, [])


def test_apply_defaults_writes_the_chosen_setting_and_its_measurement(tmp_path):
    (tmp_path / "ddmd.toml").write_text(MADE_UP_TOML)
    rows = [{"setting": "ddim 10 steps x 1 samples", "dice": 80.4, "tags": []},
            {"setting": "ddim 100 steps x 1 samples", "dice": 81.0, "tags": []},
            {"setting": "ddpm 1000 steps x 5 samples", "dice": 80.9, "tags": ["shipped", "paper"]}]
    result = {"date": "2026-12-01 10:00 UTC", "budget_steps": 2000, "defaults": {"nnUNetTrainerDDMD_table": {
        "rows": rows, "tolerance": 1.0,
        "chosen": {"setting": "ddim 10 steps x 1 samples", "sampler": "ddim", "steps": 10, "samples": 1,
                   "dice": 80.4}}}}
    done = table.apply_defaults(result, tmp_path)
    text = (tmp_path / "ddmd.toml").read_text()
    assert done == [f"{tmp_path / 'ddmd.toml'}: [defaults] sampler ddim 10 steps x 1 samples"]
    assert 'sampler = "ddim"\nsampling_steps = 10\nnum_samples = 1' in text
    comment = " ".join(line.removeprefix("# [make table] ") for line in text.splitlines()
                       if line.startswith("# [make table]"))
    assert "best: ddim 100 steps x 1 samples, 81.0; the paper's chain ddpm 1000 steps x 5 samples, 80.9" in comment


def test_a_head_whose_training_maps_follow_the_inference_sampler_keeps_its_defaults(tmp_path):
    """ReCoSeg draws its training residual maps with the inference sampler (issue 32): writing another sampler into
    its [defaults] would change what the next segmenter trains on, a model nobody measured. The sweep is reported,
    the TOML stays."""
    (tmp_path / "recoseg.toml").write_text(MADE_UP_TOML)
    rows = [{"setting": "ddim 1 steps x 1 samples", "dice": 90.5, "tags": []},
            {"setting": "ddim 2 steps x 1 samples", "dice": 90.7, "tags": ["shipped"]}]
    d = {"rows": rows, "tolerance": 1.0,
         "chosen": {"setting": "ddim 1 steps x 1 samples", "sampler": "ddim", "steps": 1, "samples": 1, "dice": 90.5}}
    result = {"date": "2026-12-01 10:00 UTC", "budget_steps": 2000, "defaults": {"nnUNetTrainerReCoSeg_table": d}}
    done = table.apply_defaults(result, tmp_path)
    assert (tmp_path / "recoseg.toml").read_text() == MADE_UP_TOML
    assert len(done) == 1 and "[defaults] kept" in done[0] and 'residual_sampler = "inference"' in done[0]
    assert "chosen: ddim 1 steps x 1 samples, 90.5" in done[0]


def test_a_head_that_did_not_learn_keeps_its_defaults(tmp_path):
    """All settings near the Dice of random masks: the rule would pick the cheapest on no evidence; the TOML stays."""
    (tmp_path / "medsegdiff.toml").write_text(MADE_UP_TOML)
    rows = [{"setting": "ddim 1 steps x 1 samples", "dice": 3.1, "tags": []},
            {"setting": "ddpm 100 steps x 5 samples", "dice": 3.4, "tags": ["shipped", "paper"]}]
    d = {"rows": rows, "tolerance": 1.0,
         "chosen": {"setting": "ddim 1 steps x 1 samples", "sampler": "ddim", "steps": 1, "samples": 1, "dice": 3.1}}
    assert not table.learned(d) and table.learned({"rows": [{"dice": 50.0}]})
    result = {"date": "2026-12-01 10:00 UTC", "budget_steps": 2000,
              "defaults": {"nnUNetTrainerMedSegDiff_table": d}}
    done = table.apply_defaults(result, tmp_path)
    assert (tmp_path / "medsegdiff.toml").read_text() == MADE_UP_TOML
    assert len(done) == 1 and "[defaults] kept" in done[0] and "ddpm 100 steps x 5 samples) scored 3.4" in done[0]


def test_the_sweep_measures_several_samples_only_for_a_model_that_learned():
    """MoDiff-like head: steps axis at 1 sample, samples axis at DDIM 10, its paper chain DDPM 250 x 16. The first
    pass holds every one-sample setting and the chain's one-sample twin; the costly second pass runs only when the
    first's best reaches the floor, and what it skipped is returned."""
    from types import SimpleNamespace as O
    from benchmarks.accuracy import sampling_grid
    named = {"shipped": O(sampler="ddpm", steps=250, samples=16), "paper": O(sampler="ddpm", steps=250, samples=16)}
    first, second = table.sweep_passes(sampling_grid([1, 10, 100], [1, 4, 16], 10), named)
    assert first == [("ddim", 1, 1), ("ddim", 10, 1), ("ddim", 100, 1), ("ddpm", 250, 1)]
    assert second == [("ddim", 10, 4), ("ddim", 10, 16), ("ddpm", 250, 16)]
    assert table.setting_tags(("ddpm", 250, 16), named) == ["shipped", "paper"]
    assert table.setting_tags(("ddpm", 250, 1), named) == ["shipped at 1 sample", "paper at 1 sample"]
    assert table.setting_tags(("ddim", 10, 4), named) == []
    # a one-sample chain (NNDM's paper: DDPM 1000 x 1) has no twin and nothing in the second pass
    first, second = table.sweep_passes([("ddim", 5, 1)], {"paper": O(sampler="ddpm", steps=1000, samples=1)})
    assert first == [("ddim", 5, 1), ("ddpm", 1000, 1)] and second == []

    measured = []

    def measure_at(dice):
        def measure(g):
            measured.append(g)
            return {"setting": g, "dice": dice(g)}
        return measure
    rows, skipped = table.sweep([("ddim", 1, 1), ("ddpm", 250, 1)], [("ddpm", 250, 16)], measure_at(lambda g: 4.0))
    assert measured == [("ddim", 1, 1), ("ddpm", 250, 1)] and skipped == [("ddpm", 250, 16)] and len(rows) == 2
    measured.clear()
    rows, skipped = table.sweep([("ddim", 1, 1), ("ddpm", 250, 1)], [("ddpm", 250, 16)],
                                measure_at(lambda g: 30.0 + 20.0 * (g[1] > 1)))  # the chain at 1 sample: 50
    assert measured == [("ddim", 1, 1), ("ddpm", 250, 1), ("ddpm", 250, 16)] and skipped == [] and len(rows) == 3


def test_provenance_line_names_date_machine_data_budget_versions_and_command():
    result = {"date": "2026-12-01 10:00 UTC", "machine": "2 CPU cores (X)", "heldout_cases": ["a", "b"],
              "phantoms": {"heldout_seed": 7, "train_cases": 24, "seed": 0, "edition": "2021", "spacing": 4.0},
              "budget_steps": 2000, "versions": {"torch": "2.14.1", "nnunetv2": "2.8.1"},
              "command": "python -m benchmarks.table",
              "plans": {"spacing": [4.0] * 3, "median_image_size_in_voxels": [38.0, 45.0, 36.0],
                        "patch_size": [40, 48, 40], "batch_size": 2}}
    line = table.provenance_line(result)
    for part in ("2026-12-01 10:00 UTC", "2 CPU cores (X)", "2 held-out phantoms (seed 7)", "24 training phantoms",
                 "at 4.0 mm (nnU-Net's plans: median image 38 x 45 x 36 voxels, patch 40 x 48 x 40 voxels, batch 2)",
                 "every trainer 2000 optimiser steps", "torch 2.14.1, nnunetv2 2.8.1",
                 "`python -m benchmarks.table`"):
        assert part in line, part


@pytest.mark.e2e
def test_an_interrupted_measurement_resumes_at_the_next_case_and_matches_nnunetv2_predict(trained, nnunet_paths,
                                                                                        tmp_path, capsys):
    """The table's two ways of predicting (raw held-out files, preprocessed validation cases) keep every finished
    case with its seconds; after an interruption (a case's record and segmentation gone) only that case is predicted
    again. The raw path's segmentations are nnUNetv2_predict's (same model, CPU), label for label."""
    import json

    import numpy as np
    import SimpleITK as sitk

    from benchmarks.accuracy import _predictor, finished_cases, predict_cases, predict_raw_cases
    from conftest import BIN, DATASET_ID, model_folder, run
    folder = model_folder(trained, "nnUNetTrainer_tiny")
    images = trained.raw / "imagesTs"
    cases = sorted(f.name[: -len("_0000.nii.gz")] for f in images.glob("*_0000.nii.gz"))
    inputs = {c: sorted(str(f) for f in images.glob(f"{c}_*.nii.gz")) for c in cases}
    assert len(cases) == 2 and all(len(v) == 4 for v in inputs.values())
    ref = tmp_path / "nnUNetv2_predict"
    run([BIN / "nnUNetv2_predict", "-i", images, "-o", ref, "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr",
         "nnUNetTrainer_tiny", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], trained.env)

    def labels(path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    def same_segmentation(a, b) -> bool:
        """Label for label, up to float rounding: the two processes' sliding windows may sum in another order, and
        this 8-step model has voxels at probability 0.5, where that flips a label (seen once in a full e2e run, the
        test alone passing); a wrong pipeline differs in far more than 0.1 % of the voxels."""
        x, y = labels(a), labels(b)
        return x.shape == y.shape and np.mean(x != y) <= 1e-3

    out = tmp_path / "raw"
    assert predict_raw_cases(_predictor(folder), inputs, out) > 0
    assert sorted(finished_cases(out, cases)) == cases
    for c in cases:
        assert same_segmentation(out / f"{c}.nii.gz", ref / f"{c}.nii.gz"), c
    kept = (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns
    (out / f"{cases[1]}.seconds").unlink()
    (out / f"{cases[1]}.nii.gz").unlink()
    assert sorted(finished_cases(out, cases)) == cases[:1]
    capsys.readouterr()
    predict_raw_cases(_predictor(folder), inputs, out, progress="[held out]")
    assert (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns == kept  # not predicted again
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[held out]")]
    assert len(lines) == 1 and lines[0].startswith("[held out]: case 2/2 ")  # the one case predicted, after the kept
    assert same_segmentation(out / f"{cases[1]}.nii.gz", ref / f"{cases[1]}.nii.gz")

    val = json.loads((trained.preprocessed / "splits_final.json").read_text())[0]["val"]
    pre = tmp_path / "preprocessed"
    first = predict_cases(folder, val, pre, resume=True)
    recorded = finished_cases(pre, val)
    assert sorted(recorded) == sorted(val) and first == pytest.approx(sum(recorded.values()) / len(val))
    kept = (pre / f"{val[0]}.nii.gz").stat().st_mtime_ns
    (pre / f"{val[-1]}.seconds").unlink()
    again = predict_cases(folder, val, pre, resume=True, progress="[val]")
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"[val]: case {len(val)}/{len(val)} ")
    assert (pre / f"{val[0]}.nii.gz").stat().st_mtime_ns == kept and sorted(finished_cases(pre, val)) == sorted(val)
    assert again == pytest.approx(sum(finished_cases(pre, val).values()) / len(val))


def test_target_sentences_say_which_head_misses_its_cost_target_and_what_meeting_it_would_cost():
    # stock 2.0 s / case held out, 1.5 s on the validation cases; targets: NNDM 1.3x, others 3x
    def default(chosen, rows):
        return {"chosen": {"setting": chosen}, "tolerance": 1.0,
                "rows": [{"setting": s, "seconds_per_case": sec, "dice": d} for s, sec, d in rows]}
    result = {"validation_stock_seconds": 1.5, "rows": [
        {"trainer": "nnUNetTrainer_table", "setting": "stock", "seconds_per_case": 2.0},
        {"trainer": "nnUNetTrainerNNDM_table", "setting": "refinement off (its backbone)", "seconds_per_case": 2.0},
        {"trainer": "nnUNetTrainerNNDM_table", "setting": "ddim 2 steps x 1 samples", "seconds_per_case": 2.4},
        {"trainer": "nnUNetTrainerX_table", "setting": "ddim 10 steps x 1 samples", "seconds_per_case": 10.0},
        {"trainer": "nnUNetTrainerY_table", "setting": "ddim 1 steps x 1 samples", "seconds_per_case": 30.0}],
        "defaults": {
            "nnUNetTrainerNNDM_table": default("ddim 2 steps x 1 samples", [("ddim 2 steps x 1 samples", 1.8, 90.0)]),
            # 3 x 1.5 s = 4.5 s: only the 1-step setting is under it; best 80.5, so 10.5 points below
            "nnUNetTrainerX_table": default("ddim 10 steps x 1 samples", [
                ("ddim 1 steps x 1 samples", 1.0, 70.0), ("ddim 10 steps x 1 samples", 5.0, 80.0),
                ("ddim 100 steps x 1 samples", 40.0, 80.5)]),
            "nnUNetTrainerY_table": default("ddim 1 steps x 1 samples", [("ddim 1 steps x 1 samples", 15.0, 60.0)])}}
    nndm, x, y = table.target_sentences(result)  # NNDM's refinement-off row is not a default: no sentence
    assert nndm == "nnUNetTrainerNNDM_table at its default (ddim 2 steps x 1 samples): 1.20x stock, within the " \
                   "target of 1.3x."
    assert x.startswith("nnUNetTrainerX_table at its default (ddim 10 steps x 1 samples): 5.00x stock, over the "
                        "target of 3x;")
    assert x.endswith("within 3x stock its best setting is ddim 1 steps x 1 samples at 70.0 (10.5 points below its "
                      "best).")
    assert "15.00x stock, over the target of 3x" in y
    assert y.endswith("none of its settings is within 3x stock (the fastest, ddim 1 steps x 1 samples, 10.0x on the "
                      "validation cases).")


def test_the_section_says_whether_the_heldout_times_come_from_one_run_of_the_command():
    one = {"rows": [{"run": "a"}, {"run": "a", "resumed_cases": 0}]}
    assert table.timing_runs(one) == "every row in the same process"
    two = table.timing_runs({"rows": [{"run": "a"}, {"run": "b"}]})
    assert "several runs" in two and "finished by 2 run(s)" in two and "earlier run" not in two
    split = table.timing_runs({"rows": [{"run": "a"}, {"run": "a", "resumed_cases": 3}]})
    assert "several runs" in split and "1 row(s) with cases from an earlier run" in split
    assert table.timing_runs({"rows": [{"setting": "stock"}]}) == "the run that measured each row not recorded"


def test_results_section_of_a_made_up_run_has_every_block():
    """RESULTS.md's section of one run: provenance with the plans' sizes, the budget check, the table, one verdict per
    head, the curves PNG, the chosen defaults and the cost-target sentences."""
    stock, head = _made_up_run()
    rows = [{"trainer": m["trainer"], "setting": m["setting"], "seconds_per_case": m["seconds_per_case"],
             **table.score_against(m, stock, ["WT"])} for m in (stock, head)]
    result = {"date": "2026-12-01 10:00 UTC", "machine": "2 CPU cores (X)", "heldout_cases": stock["cases"],
              "phantoms": {"heldout_seed": 7, "train_cases": 24, "seed": 0, "edition": "2021", "spacing": 4.0},
              "plans": {"spacing": [4.0] * 3, "median_image_size_in_voxels": [38, 45, 36], "patch_size": [40, 48, 40],
                        "batch_size": 2},
              "budget_steps": 500, "versions": {"torch": "2.14.1"}, "command": "python -m benchmarks --part table",
              "regions": ["WT"], "rows": rows, "tolerance": 1.0, "paper_chain_measured": True,
              "validation_stock_seconds": 1.0,
              "budget": {"nnUNetTrainer_table": {"steps": 500, "seconds": 600.0},
                         "nnUNetTrainerX_table": {"steps": 500, "seconds": 1200.0}},
              "stock_check": {"steps": 500, "dice": {"WT": 0.9}, "floor": 0.8, "sane": True, "below_floor": []},
              "defaults": {"nnUNetTrainerX_table": {"tolerance": 1.0, "chosen": {"setting": head["setting"],
                                                                                  "dice": 80.0},
                                                    "rows": [{"setting": head["setting"], "seconds_per_case": 2.5,
                                                              "dice": 80.0}]},
                           "nnUNetTrainerY_table": {"tolerance": 1.0, "chosen": {"setting": "ddim 1 steps x 1 samples",
                                                                                  "dice": 3.0},
                                                    "rows": [{"setting": "ddim 1 steps x 1 samples", "cost": 1,
                                                              "seconds_per_case": 2.0, "dice": 3.0}],
                                                    "not_measured": [{"setting": "ddpm 250 steps x 16 samples",
                                                                      "tags": ["shipped", "paper"]}]}}}
    result["stock_check"]["since"] = {"steps": 400, "change": {"WT": 0.016}}
    text = " ".join("\n".join(table.section(result, "table_curves.png")).split())  # paragraphs are wrapped
    for part in ("median image 38 x 45 x 36 voxels", "every region reaches the 80 %", "| nnUNetTrainerX_table |",
                 "Since 400 steps it changed by +1.6 points: a region still rising",
                 "nnUNetTrainerX_table (ddim 5 steps x 1 samples): Dice not significantly different from stock in WT.",
                 "![Dice per region against optimiser steps", "- nnUNetTrainerX_table: ddim 5 steps x 1 samples (80.0",
                 "2.50x stock, within the target of 3x.",
                 "- nnUNetTrainerY_table: ddim 1 steps x 1 samples (3.0; best ddim 1 steps x 1 samples 3.0); below the "
                 "50 of a model that learned", "the settings with several samples not measured (the one-sample ones "
                 "showed a model that did not learn): ddpm 250 steps x 16 samples (shipped, paper)",
                 "† did not learn to segment in 500 optimiser steps, the budget at which stock nnU-Net has plateaued: "
                 "the best sampling setting of each scored below 50 mean Dice on fold 0's validation cases "
                 "(nnUNetTrainerY_table 3.0 (ddim 1 steps x 1 samples))"):
        assert part in text, part


def test_the_table_refuses_unequal_budgets_before_making_anything(tmp_path):
    # the _tiny variants: DDMD trains (1 + 2) x 4 = 12 steps, stock nnU-Net 2 x 4 = 8
    with pytest.raises(SystemExit, match=r"the table compares trainers at equal budget.*nnUNetTrainer_tiny: 8.*"
                                         r"nnUNetTrainerDDMD_tiny: 12.*\[variants.tiny\]"):
        table.main(["--variant", "tiny", "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_nnunet_final_validation_of_a_table_training_uses_the_heads_validation_sampler():
    # trainer_configs/medsegdiff.toml [defaults]: val_sampler = "ddim", val_sampling_steps = 10 (its shipped chain:
    # ddpm 100 steps x 5 samples); stock nnU-Net does not sample
    import tomllib
    from pathlib import Path
    toml = tomllib.loads((Path(__file__).resolve().parents[1] / "trainer_configs" / "medsegdiff.toml").read_text())
    d = toml["defaults"]
    assert table.final_validation_env("nnUNetTrainerMedSegDiff_table") == {
        "NNDIFF_SAMPLER": d["val_sampler"], "NNDIFF_STEPS": str(d["val_sampling_steps"]), "NNDIFF_SAMPLES": "1"}
    assert table.final_validation_env("nnUNetTrainer_table") == {}


def test_a_head_that_did_not_learn_is_scored_at_its_cheapest_setting_and_its_cost_target_not_assessed():
    rows = [{"setting": "ddim 1 steps x 1 samples", "cost": 1, "dice": 3.0},
            {"setting": "ddpm 1000 steps x 1 samples", "cost": 1000, "dice": 8.9}]
    d = {"rows": rows, "tolerance": 1.0, "chosen": rows[1]}
    assert table.heldout_choice(d) == rows[0]
    learned_rows = [dict(r, dice=r["dice"] + 80) for r in rows]
    assert table.heldout_choice({"rows": learned_rows, "chosen": learned_rows[1]}) == learned_rows[1]
    result = {"rows": [{"trainer": "nnUNetTrainer_table", "setting": "stock", "seconds_per_case": 2.0},
                       {"trainer": "nnUNetTrainerDDMD_table", "setting": rows[0]["setting"], "seconds_per_case": 3.0}],
              "defaults": {"nnUNetTrainerDDMD_table": d}}
    not_assessed = ("nnUNetTrainerDDMD_table: no default chosen (its model did not learn in the budget, so no "
                    "cheaper setting can be shown to keep a trained model's accuracy): its cost target is not assessed")
    assert table.target_sentences(result) == [not_assessed + "."]
    # with the one-sample run of its shipped chain measured, the sentence says what that chain costs against stock
    rows[1]["tags"], rows[1]["seconds_per_case"] = ["shipped at 1 sample", "paper at 1 sample"], 300.0
    d["not_measured"] = [{"setting": "ddpm 1000 steps x 5 samples", "tags": ["shipped", "paper"]}]
    result["validation_stock_seconds"] = 2.0
    assert table.target_sentences(result) == [
        not_assessed + "; its shipped sampler, ddpm 1000 steps x 5 samples, is over the target of 3x by its first "
        "sample alone: ddpm 1000 steps x 1 samples took 300 s / case on fold 0's validation cases, 150x stock's there."]


def _refiner_run(tmp_path, records):
    """A TableRun holding made-up state records, without the working folder a real run prepares."""
    import argparse
    run = object.__new__(table.TableRun)
    run.args = argparse.Namespace(variant="table")
    run.state = table.TableState(tmp_path / "state.json")
    for k, v in records.items():
        run.state.record(k, v)
    return run


def test_refiner_section_scores_every_row_against_stock_fold_0(tmp_path):
    cases = [f"c{i}" for i in range(8)]
    stock = [0.80, 0.82, 0.78, 0.85, 0.81, 0.79, 0.83, 0.80]

    def rec(trainer, setting, et, lw=None):
        r = {"trainer": trainer, "setting": setting, "seconds_per_case": 2.0 if "NNDM" in trainer else 1.0,
             "cases": cases, "dice": {"ET": et}, "hd95": {"ET": [4.0] * 8}}
        if lw is not None:
            r["lesionwise_dice"] = {"ET": lw}
        return r
    records = {"heldout nnUNetTrainer_table stock": rec("nnUNetTrainer_table", "stock", stock, stock),
               "heldout nnUNetTrainer_table_refiner stock": rec("nnUNetTrainer_table_refiner", "stock", stock),
               "train nnUNetTrainer_table": {"steps": 2000, "seconds": 600.0, "load_average_after": [5.4, 5.2, 4.6]}}
    for variant in table.REFINERS.values():
        t = f"nnUNetTrainerNNDM_{variant}"
        # refined: every case 2 points higher than stock (a paired test must call it better); off: stock itself
        records[f"heldout {t} refinement off (its backbone)"] = rec(t, "refinement off (its backbone)", stock)
        records[f"heldout {t} refined (shipped sampler)"] = rec(t, "refined (shipped sampler)",
                                                               [v + 0.02 for v in stock],
                                                               [math.nan] + [v + 0.02 for v in stock[1:]])
        records[f"train refiner {t}"] = {"refiner_steps": 520, "steps": 2520, "seconds": 750.0,
                                         "load_average_after": [2.3, 2.3, 2.3]}
    run = _refiner_run(tmp_path, records)
    section = run.refiner_result()
    rows = {(r["trainer"], r["setting"]): r for r in section["rows"]}
    refined = rows[("nnUNetTrainerNNDM_refiner_oof", "refined (shipped sampler)")]
    assert refined["against_stock"]["ET"]["verdict"] == "better"
    assert math.isclose(refined["against_stock"]["ET"]["mean_difference"], 0.02, abs_tol=1e-12)
    # the NaN case (no lesion in either) is left out of the lesion-wise mean: 7 cases, mean of stock[1:] + 0.02
    assert refined["lesionwise_dice"]["ET"]["cases"] == 7
    assert math.isclose(refined["lesionwise_dice"]["ET"]["mean"], sum(stock[1:]) / 7 + 0.02)
    off = rows[("nnUNetTrainerNNDM_refiner_oof", "refinement off (its backbone)")]
    assert off["against_stock"]["ET"]["verdict"] == "no significant difference"  # identical: p = 1
    assert refined["per_case"]["dice"]["ET"][0] == stock[0] + 0.02  # per-case scores kept for recomputation
    assert section["cpu_count"] == os.cpu_count()
    text = table.refiner_markdown(dict(section, cpu_count=2))
    assert "520 refiner steps on stock's 2000, 12 min |" in text  # 750 s, the refiner's own
    assert "| nnUNetTrainerNNDM_refiner_oof | refined" in text
    # stock's load 5.4 at its end on 2 cores: beside other work, marked; the refiners' 2.3 is not
    assert "2000 steps, 10 min ‡ |" in text and "‡ trained beside other work" in text
    assert "nnUNetTrainer_table (5.4 / 5.2 / 4.6 at its end)." in text
    assert "ET: better (+2.0, p=" in text and "| 2.00 | 2.00 |" in text


def test_a_training_that_ended_beside_other_work_is_marked():
    """On 2 cores a training alone keeps the load near 2; 1.5 x 2 = 3 is the line. A load of 3.3 at its end (15 min)
    is over it, 2.6 is not; a record without load averages (an older run) is never marked."""
    result = {"cpu_count": 2, "budget": {"a": {"load_average_after": [2.2, 2.8, 3.3]},
                                         "b": {"load_average_after": [2.2, 2.3, 2.6]}, "c": {}}}
    assert table.busy(result, result["budget"]["a"]) and not table.busy(result, result["budget"]["b"])
    assert not table.busy(result, result["budget"]["c"])
    assert not table.busy(dict(result, cpu_count=4), result["budget"]["a"])  # 3.3 < 1.5 x 4
    text = table.busy_sentence(result)
    assert "a (2.2 / 2.8 / 3.3 at its end)" in text and "b (" not in text
    assert table.busy_sentence({"cpu_count": 2, "budget": {"b": result["budget"]["b"]}}) == ""
    # a training that shared the CPU for a while but ended alone: the 5-min load sampled at each epoch marks it
    d = {"load_average_after": [2.2, 2.3, 2.4], "load_average_5min_max": 3.6}
    assert table.busy(result, d) and not table.busy(result, dict(d, load_average_5min_max=2.5))
    text = table.busy_sentence({"cpu_count": 2, "budget": {"d": d}})
    assert "d (2.2 / 2.3 / 2.4 at its end; 5-min load up to 3.6 during it)" in text


def test_a_table_training_keeps_the_load_sampled_at_each_epoch_of_every_attempt(tmp_path, monkeypatch):
    """_run_training samples the 5-min load as each epoch starts, into logs/<name>.<attempt>.loads.json as it goes
    (an interrupted attempt keeps its samples), and records the highest of every attempt."""
    import nnunet_diffusion.environment as environment
    run = _refiner_run(tmp_path, {})
    run.logs = tmp_path / "logs"
    run.logs.mkdir()
    run.args.device = "cpu"
    run.model_folder = lambda trainer: tmp_path / trainer
    (run.logs / "train_T.0.log").write_text("an interrupted attempt\n")
    (run.logs / "train_T.0.loads.json").write_text("[3.9, 2.1]")
    loads = iter([(2.0, 2.2, 2.0), (2.0, 2.4, 2.0), (2.0, 2.3, 2.0), (2.1, 2.3, 2.2)])
    monkeypatch.setattr(table.os, "getloadavg", lambda: next(loads))

    def fake_train_fold(*args, on_epoch=None, **kw):  # nnUNetv2_train is not what is tested: two epochs
        on_epoch()
        on_epoch()
    monkeypatch.setattr(environment, "train_fold", fake_train_fold)
    _, load = run._run_training("T", 0, {}, 2, "[t]")
    assert json.loads((run.logs / "train_T.1.loads.json").read_text()) == [2.4, 2.3]
    assert load == {"load_average_before": [2.0, 2.2, 2.0], "load_average_after": [2.1, 2.3, 2.2],
                    "load_average_5min_max": 3.9}


def test_refiner_section_is_absent_until_every_row_is_measured(tmp_path):
    run = _refiner_run(tmp_path, {})
    assert run.refiner_result() is None
    assert "not been measured" in table.refiner_markdown(None)


# ------------------------------------------------------------------------------- issue 33: own plateau and x0 rows
def test_the_plateau_and_x0_rows_come_from_the_heads_trainer_configs_and_their_budgets_are_checked(tmp_path):
    run = _refiner_run(tmp_path, {})
    run.heads = [("nnunet", "nnUNetTrainer"), ("medsegdiff", "nnUNetTrainerMedSegDiff")]
    run.budget = 2000
    extra = run.extra_trainings()
    assert ("medsegdiff", "nnUNetTrainerMedSegDiff", "table_plateau", "plateau") in extra
    assert ("medsegdiff", "nnUNetTrainerMedSegDiff", "table_x0", "x0") in extra
    assert all(h != "nnunet" for h, *_ in extra)  # stock is the reference, not a head
    run.check_extra_budgets()  # 8000 = 4 x 2000 and 2000
    assert run.extra_kind("nnUNetTrainerMedSegDiff_table_x0") == "x0"
    assert run.extra_kind("nnUNetTrainerMedSegDiff_table") is None
    run.budget = 1000
    with pytest.raises(table.NNDiffError, match=r"medsegdiff.toml \[variants.table_plateau\]: 8000 optimiser steps"):
        run.check_extra_budgets()
    # every head of the table: the three epsilon heads of issue 33 have both rows, at the right budgets
    run.heads, run.budget = list(table.HEADS), 2000
    run.check_extra_budgets()
    kinds = {(h, kind) for h, _, _, kind in run.extra_trainings()}
    assert {(h, k) for h in ("medsegdiff", "modiff", "ddmd") for k in ("plateau", "x0")} <= kinds
    assert ("recoseg", "in-sample") in kinds  # issue 32: ReCoSeg's in-sample residual maps, for contrast
    assert run.extra_kind("nnUNetTrainerReCoSeg_table_insample") == "in-sample"


def test_plateau_rows_stay_out_of_the_equal_budget_summary_and_say_why_they_stopped():
    def row(trainer, kind=None, **verdicts):
        return {"trainer": trainer, "setting": "s", "kind": kind,
                "against_stock": {r: {"verdict": v} for r, v in verdicts.items()}}
    result = {"budget_steps": 2000, "heldout_cases": list(range(20)), "rows": [
        row("nnUNetTrainer_table"),
        row("nnUNetTrainerMedSegDiff_table", WT="worse"),
        row("nnUNetTrainerMedSegDiff_table_plateau", "plateau", WT="better"),
        row("nnUNetTrainerMoDiff_table_plateau", "plateau", WT="worse")],
        "budget": {"nnUNetTrainerMedSegDiff_table_plateau": {
                       "steps": 5200, "seconds": 6000.0, "cap_steps": 8000,
                       "early_stop": {"reason": "plateau: the EMA pseudo Dice has not risen ..."}},
                   "nnUNetTrainerMoDiff_table_plateau": {"steps": 8000, "seconds": 9000.0, "cap_steps": 8000,
                                                         "early_stop": None}}}
    text = table.summary_sentence(result)
    assert "better than stock nnU-Net in some region: none." in text  # the plateau row is not at the equal budget
    assert ("Trained to their own plateau (up to 4x the budget): nnUNetTrainerMedSegDiff_table_plateau stopped at "
            "5200 steps (plateau), 100 min: better than stock in WT; nnUNetTrainerMoDiff_table_plateau ran to its cap "
            "of 8000 steps without a plateau, 150 min: worse than stock in WT.") in text


def test_apply_defaults_prefers_the_model_trained_to_its_plateau_when_it_learned(tmp_path):
    (tmp_path / "medsegdiff.toml").write_text(MADE_UP_TOML)

    def record(setting, steps, dice):
        return {"rows": [{"setting": setting, "dice": dice, "tags": []}], "tolerance": 1.0,
                "chosen": {"setting": setting, "sampler": "ddim", "steps": steps, "samples": 1, "dice": dice}}
    result = {"date": "2026-12-06 10:00 UTC", "budget_steps": 2000, "defaults": {
        "nnUNetTrainerMedSegDiff_table": record("ddim 5 steps x 1 samples", 5, 3.0),          # did not learn
        "nnUNetTrainerMedSegDiff_table_plateau": record("ddim 25 steps x 1 samples", 25, 70.0)}}
    done = table.apply_defaults(result, tmp_path)
    assert done == [f"{tmp_path / 'medsegdiff.toml'}: [defaults] sampler ddim 25 steps x 1 samples"]
    assert "sampling_steps = 25" in (tmp_path / "medsegdiff.toml").read_text()


def test_config_changes_name_the_training_keys_that_differ_from_today(monkeypatch):
    """A model trained with 100 epochs where today's nnUNetTrainer_table has 200, and before initial_lr was recorded;
    a different save_every (bookkeeping, predict-only) is not a change."""
    from nnunet_diffusion import config
    now = config.spec("nnunet", "table").as_dict()
    assert table.config_changes("nnUNetTrainer_table", dict(now)) == []
    old = dict(now, num_epochs=100, save_every=7)
    assert table.config_changes("nnUNetTrainer_table", old) == ["num_epochs 100 -> 200"]
    import dataclasses

    from nnunet_diffusion.trainers import TRAINERS
    spec = dataclasses.replace(config.spec("nnunet", "table"), initial_lr=0.01)  # today's sets a key the model predates
    monkeypatch.setattr(TRAINERS["nnUNetTrainer_table"], "hparams", classmethod(lambda c: spec))
    assert table.config_changes("nnUNetTrainer_table", now) == ["initial_lr (added since) = 0.01"]
    assert table.config_changes("nnUNetTrainer_table", dict(now, initial_lr=0.01)) == []
    assert table.config_changes("nnUNetTrainerGone_table", now) == ["(no such trainer today)"]


def test_config_sentence_says_when_the_table_predates_todays_configs():
    from nnunet_diffusion import config
    now = config.spec("nnunet", "table").as_dict()
    assert "does not record the trainer configs" in table.config_sentence({})
    assert table.config_sentence({"trainer_configs": {"nnUNetTrainer_table": now}}) == ""
    s = table.config_sentence({"trainer_configs": {"nnUNetTrainer_table": dict(now, num_epochs=100),
                                                   "nnUNetTrainerNNDM_table": None}})
    assert "nnUNetTrainer_table: num_epochs 100 -> 200" in s
    assert "nnUNetTrainerNNDM_table: (its checkpoint records no config)" in s


class _OrderRecorder:
    """A TableRun that records which trainings main() asks for, in order, and trains nothing."""
    calls: list = []

    def __init__(self, args, heads, budget):
        self.heads = heads

    def __getattr__(self, name):
        return lambda *a, **k: None

    def train(self, head, trainer, fold=0, **kw):
        _OrderRecorder.calls.append((trainer, fold))

    def extra_trainings(self):
        return [("medsegdiff", "nnUNetTrainerMedSegDiff", "table_plateau", "plateau")]

    def refiner_trainings(self):
        _OrderRecorder.calls.append(("refiners", None))

    def measure_training(self, head, cls, variant=None, kind=None):
        _OrderRecorder.calls.append(("measure", f"{cls}_{variant or 'table'}"))

    def refiner_result(self):
        return None


@pytest.mark.parametrize("argv, expected", [
    ([], ["stock 0", "heads", "stock 1-4", "refiners"]),
    (["--refiner", "off"], ["stock 0", "heads"]),
    (["--refiner", "only"], ["stock 0", "stock 1-4", "refiners"]),
    (["--stock-folds-only"], ["stock 0", "stock 1-4"]),
])
def test_the_table_trains_stock_fold_0_then_the_heads_before_the_folds_only_the_refiner_needs(monkeypatch, argv,
                                                                                                  expected):
    monkeypatch.setattr(table, "TableRun", _OrderRecorder)
    monkeypatch.setattr(table, "planned_budget", lambda *a: 2000)
    monkeypatch.setattr(table, "refiner_markdown", lambda section: "")
    monkeypatch.setattr(table.table_uncertainty, "train_second_stock", lambda run: None)
    monkeypatch.setattr(table.table_uncertainty, "measure", lambda run: None)
    _OrderRecorder.calls = []
    assert table.main(argv) == 0

    measured = [c for c in _OrderRecorder.calls if c[0] == "measure"]
    for i, (trainer, _) in enumerate(_OrderRecorder.calls):  # every head is measured as soon as it is trained
        if trainer not in ("measure", "refiners", "nnUNetTrainer_table"):
            assert _OrderRecorder.calls[i + 1] == ("measure", trainer)
    if "heads" not in expected:
        assert not measured
    _OrderRecorder.calls = [c for c in _OrderRecorder.calls if c[0] != "measure"]

    def phase(call):
        trainer, fold = call
        if trainer == "refiners":
            return "refiners"
        if trainer == "nnUNetTrainer_table":
            return "stock 0" if fold == 0 else "stock 1-4"
        return "heads"
    phases = []
    for call in _OrderRecorder.calls:
        if not phases or phases[-1] != phase(call):
            phases.append(phase(call))
    assert phases == expected
    # (the heads' loop names stock again: its fold 0 is recorded done by then, and skipped)
    assert list(dict.fromkeys(f for t, f in _OrderRecorder.calls if t == "nnUNetTrainer_table")) == (
        [0] if "stock 1-4" not in expected else [0, 1, 2, 3, 4])
    if "heads" in expected:  # every head at the equal budget, then its extra trainings
        trained = [t for t, _ in _OrderRecorder.calls]
        assert {f"{cls}_table" for _, cls in table.HEADS[1:]} <= set(trained)
        assert "nnUNetTrainerMedSegDiff_table_plateau" in trained


def test_heldout_settings_of_one_training_are_its_rows_of_the_whole_list(tmp_path):
    from nnunet_diffusion.inference.options import SamplingOptions
    chosen = {"setting": "ddim 10 steps x 1 samples", "sampler": "ddim", "steps": 10, "samples": 1, "cost": 10,
              "dice": 80.0}
    plateau = dict(chosen, setting="ddim 5 steps x 4 samples", steps=5, samples=4, cost=20)
    run = _refiner_run(tmp_path, {"default nnUNetTrainerNNDM_table": {"rows": [chosen], "chosen": chosen,
                                                                       "tolerance": 1.0},
                                  "default nnUNetTrainerMedSegDiff_table_plateau": {
                                      "rows": [plateau], "chosen": plateau, "tolerance": 1.0}})
    run.heads = [("nnunet", "nnUNetTrainer"), ("nndm", "nnUNetTrainerNNDM")]
    stock = run.heldout_settings_of("nnunet", "nnUNetTrainer", "table")
    assert [(t, label, change) for t, label, change in stock] == [("nnUNetTrainer_table", "stock", None)]
    nndm = run.heldout_settings_of("nndm", "nnUNetTrainerNNDM", "table")
    assert [label for _, label, _ in nndm] == ["refinement off (its backbone)", "ddim 10 steps x 1 samples"]
    o = SamplingOptions(sampler="ddpm", steps=100, samples=5)
    assert nndm[0][2](o).refine is False
    assert (nndm[1][2](o).sampler, nndm[1][2](o).steps, nndm[1][2](o).samples) == ("ddim", 10, 1)
    own = run.heldout_settings_of("medsegdiff", "nnUNetTrainerMedSegDiff", "table_plateau", "plateau")
    assert [(t, label) for t, label, _ in own] == [("nnUNetTrainerMedSegDiff_table_plateau",
                                                     "own plateau, ddim 5 steps x 4 samples")]
    x0 = run.heldout_settings_of("medsegdiff", "nnUNetTrainerMedSegDiff", "table_x0", "x0")
    assert x0[0][1].startswith("x0 (NOT the paper's), ") and x0[0][2] is None
    # the whole list is the heads' rows in order (the extra rows of these two heads: none is declared for NNDM)
    assert [label for _, label, _ in run.heldout_settings()] == ["stock", "refinement off (its backbone)",
                                                                  "ddim 10 steps x 1 samples"]
