"""``nndiff demo`` (issue 24): its comparison is at equal budget, and it says where its outputs are.

The end-to-end test runs the real console script (``nndiff demo --variant tiny``: phantoms in the BraTS layout,
convert-brats, nnU-Net's planning, training, prediction, compare, back-conversion) and reads the optimiser steps of
the two trainings from their own checkpoints, so an unequal comparison cannot come back unnoticed.
"""
import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from nnunet_diffusion import demo
from nnunet_diffusion.budget import Budget
from nnunet_diffusion.errors import NNDiffError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _iterations(head: str, variant: str) -> int:
    toml = tomllib.loads((ROOT / "trainer_configs" / f"{head}.toml").read_text())
    return toml["variants"][variant].get("num_iterations_per_epoch", toml["defaults"]["num_iterations_per_epoch"])


def test_every_demo_variant_gives_stock_and_nndm_the_same_budget():
    # read from the TOMLs by hand: stock epochs x iterations against NNDM's three stages x iterations
    for variant in ("demo", "tiny"):
        stock = tomllib.loads((ROOT / "trainer_configs" / "nnunet.toml").read_text())["variants"][variant]
        nndm = tomllib.loads((ROOT / "trainer_configs" / "nndm.toml").read_text())["variants"][variant]
        stock_steps = stock["num_epochs"] * _iterations("nnunet", variant)
        nndm_steps = (nndm["stage1_epochs"] + nndm["stage2_epochs"] + nndm["stage3_epochs"]) * _iterations("nndm",
                                                                                                           variant)
        assert stock_steps == nndm_steps, variant
        assert demo.planned_budget(variant, demo.demo_heads(all_heads=False)) == stock_steps
    assert demo.planned_budget("demo", demo.demo_heads(all_heads=True)) == 200


def test_unequal_budgets_stop_the_demo_before_training():
    # DDMD's tiny variant trains (1 + 2) x 4 = 12 steps, the others 8: the full tour refuses it, naming both
    with pytest.raises(NNDiffError, match=r"equal budget.*nnUNetTrainer_tiny: 8.*nnUNetTrainerDDMD_tiny: 12.*\[variants.tiny\]"):
        demo.planned_budget("tiny", demo.demo_heads(all_heads=True))


def test_trained_budgets_refuse_checkpoints_with_unequal_steps(tmp_path):
    def checkpoint(trainer, epochs):
        fold = tmp_path / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
        fold.mkdir(parents=True)
        log = {"epoch_start_timestamps": [10.0 * i for i in range(epochs)],
               "epoch_end_timestamps": [10.0 * i + 2 for i in range(epochs)]}
        torch.save({"trainer_name": trainer, "current_epoch": epochs, "logging": log}, fold / "checkpoint_final.pth")
    checkpoint("nnUNetTrainer_tiny", 2)       # 2 x 4 = 8 steps
    checkpoint("nnUNetTrainerNNDM_tiny", 1)   # 1 x 4 = 4 steps: stopped early
    with pytest.raises(NNDiffError, match="unequal optimiser steps.*nnUNetTrainer_tiny: 8.*nnUNetTrainerNNDM_tiny: 4"):
        demo.trained_budgets(tmp_path, {"nnunet": "nnUNetTrainer_tiny", "nndm": "nnUNetTrainerNNDM_tiny"})


def test_comparison_table_names_each_rows_budget_and_puts_lesionwise_beside_legacy():
    # the layout of nndiff compare's summary.json: metrics -> method -> region -> metric -> cases -> mean
    def per_region(wt, tc, et, lw):
        regions = {"whole tumor": wt, "tumor core": tc, "enhancing tumor": et, "mean over regions": 0.0}
        return {r: {"dice": {"cases": {"mean": v}}, "lesionwise_dice": {"cases": {"mean": lw}}}
                for r, v in regions.items()}
    summary = {"metrics": {"S": per_region(0.9, 0.8, 0.7, 0.5), "N": per_region(0.95, 0.8, 0.1, 0.25),
                           "N_refine_off": per_region(0.7, 0.7, 0.7, 0.125)},
               "lesionwise": {"convention": "brats2023"}}
    budgets = {"S": Budget(200, 120.0), "N": Budget(200, 150.4)}
    lines = demo.comparison_table(summary, {"S": "S", "N": "N", "N_refine_off": "N"}, budgets)
    assert "Equal budget: every trainer took 200 optimiser steps" in lines[0]
    assert lines[1].split() == ["method", "steps", "train", "WT", "TC", "ET", "LW", "WT", "LW", "TC", "LW", "ET"]
    assert lines[2].split() == ["S", "200", "120s", "90.0", "80.0", "70.0", "50.0", "50.0", "50.0"]
    assert lines[4].split() == ["N_refine_off", "200", "150s", "70.0", "70.0", "70.0", "12.5", "12.5", "12.5"]
    assert "brats2023" in lines[5]
    assert lines[6] == "N: above stock nnU-Net in WT; below it in ET (legacy Dice)."
    assert lines[7] == "N_refine_off: below stock nnU-Net in WT, TC (legacy Dice)."  # ET equal: neither


def test_the_refiner_source_line_names_the_source_its_checkpoint_recorded(tmp_path):
    for source, words in (("backbone", "in-sample"), ("oof", "out-of-fold"), ("dropout", "feature dropout")):
        torch.save({"trainer_config": {"residual_source_used": source}}, tmp_path / "c.pth")
        line = demo.refiner_source_line(tmp_path / "c.pth", "nnUNetTrainerNNDM_demo")
        assert line.strip().startswith("nnUNetTrainerNNDM_demo's refiner trained on") and words in line


def test_cli_and_demo_do_not_import_each_other():
    def imported(module):
        tree = ast.parse((ROOT / "nnunet_diffusion" / f"{module}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {"cli", "nnunet_diffusion.cli"} & imported("demo")
    assert not {"cli", "demo", "nnunet_diffusion.cli", "nnunet_diffusion.demo"} & imported("environment")


@pytest.mark.e2e
def test_demo_end_to_end_trains_stock_and_nndm_at_equal_steps_and_says_where_outputs_are(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NNDIFF_", "nnUNet_"))}
    env.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2",
               PYTHONWARNINGS="ignore::FutureWarning")
    work = tmp_path / "demo"
    proc = subprocess.run([str(BIN / "nndiff"), "demo", "--variant", "tiny", "--workdir", str(work)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = proc.stdout

    # the steps, read from the two trainings' own checkpoints: completed epochs x the TOML's iterations per epoch
    results = work / "nnUNet_results" / demo.DATASET
    steps = {}
    for head, trainer in (("nnunet", "nnUNetTrainer_tiny"), ("nndm", "nnUNetTrainerNNDM_tiny")):
        ckpt = torch.load(results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth",
                          map_location="cpu", weights_only=False)
        assert len(ckpt["logging"]["epoch_end_timestamps"]) == ckpt["current_epoch"]
        steps[trainer] = ckpt["current_epoch"] * _iterations(head, "tiny")
        assert not (ckpt.get("nnunet_diffusion") or {}).get("nndm_baseline")  # NNDM trained its own stage 1
    assert steps == {"nnUNetTrainer_tiny": 8, "nnUNetTrainerNNDM_tiny": 8}  # 2 x 4 and (1 + 0 + 1) x 4
    saved = json.loads((work / "demo_results.json").read_text())["budgets"]
    assert {t: b["steps"] for t, b in saved.items()} == steps

    # the table: its header says equal budget, every row (NNDM with its refinement off too) names 8 steps
    assert "Equal budget: every trainer took 8 optimiser steps" in out
    lines = [line.split() for line in out.splitlines()]
    rows = [w for w in lines if len(w) > 1 and w[0].startswith(("nnUNetTrainer_tiny", "nnUNetTrainerNNDM_tiny"))
            and w[1].isdigit()]
    # and one plain sentence per method against stock, e.g. "nnUNetTrainerNNDM_tiny: below stock nnU-Net in TC ..."
    verdicts = [" ".join(w) for w in lines if w and w[0].endswith(":") and w[0].startswith("nnUNetTrainerNNDM_tiny")]
    assert len(verdicts) == 2 and all("stock nnU-Net" in v for v in verdicts)
    assert {r[0] for r in rows} == {"nnUNetTrainer_tiny", "nnUNetTrainerNNDM_tiny", "nnUNetTrainerNNDM_tiny_refine_off"}
    assert all(r[1] == "8" for r in rows) and all(len(r) == 3 + 6 for r in rows)  # legacy + lesion-wise Dice
    assert all(0 <= float(v) <= 100 for r in rows for v in r[3:])  # every cell a Dice in percent
    # which residuals NNDM's refiner trained on (issue 32): a demo has no five-fold baseline, so its own backbone's
    assert "nnUNetTrainerNNDM_tiny's refiner trained on residuals e = y - y_hat from its backbone's own output" in out

    # the outputs it names exist, and the last lines say what to open first
    tail = out[out.index("Where the outputs are:"):]
    assert "open this first" in tail
    assert (work / "compare" / "table.md").is_file() and list((work / "compare" / "figures").glob("case_*.png"))
    assert sorted(p.name for p in (work / "BraTS2021_submission").iterdir())  # BraTS-format predictions
    assert not (work / "predictions_validation_recoseg").exists()  # ReCoSeg only with --all-heads


def test_a_logged_runs_log_has_each_line_while_the_command_still_runs(tmp_path):
    """``tail -f`` on a training's log shows each line as it comes (ReCoSeg's residual maps take 50 min between two
    epochs): the command prints a line, then waits until that line is in the log before it exits 0 (exit 1 after
    30 s: the log was buffered)."""
    import sys

    from nnunet_diffusion.environment import run_logged
    log = tmp_path / "run.log"
    child = ("import pathlib, sys, time\n"
             "print('first', flush=True)\n"
             "deadline = time.time() + 30\n"
             f"while 'first' not in pathlib.Path({str(log)!r}).read_text():\n"
             "    if time.time() > deadline: sys.exit(1)\n"
             "    time.sleep(0.05)\n"
             "print('second')\n")
    run_logged([sys.executable, "-c", child], dict(os.environ), log, "live")
    assert log.read_text().splitlines() == ["first", "second"]


def test_a_logged_run_counts_matching_lines_from_where_an_interrupted_run_stopped(tmp_path, capsys):
    """run_logged's bar starts at ``initial`` (a resumed training: the epochs its checkpoint finished) and advances
    once per matching line; the command's output lands in the log."""
    import sys

    from nnunet_diffusion.environment import run_logged
    log = tmp_path / "logs" / "run.log"
    cmd = [sys.executable, "-c", "print('Epoch 3'); print('train_loss 0.5'); print('Epoch 4')"]
    seen = []  # on_match: called once per matching line, as it arrives (the table samples the load there)
    assert run_logged(cmd, dict(os.environ), log, "resumed", total=5, pattern=r"Epoch \d+$", initial=3,
                      on_match=lambda: seen.append(log.read_text().splitlines()[-1])) >= 0
    assert log.read_text().splitlines() == ["Epoch 3", "train_loss 0.5", "Epoch 4"]
    assert seen == ["Epoch 3", "Epoch 4"]
    bar = capsys.readouterr().err
    assert bar.lstrip("\r").startswith("resumed:  60%") and "5/5" in bar and "0/5" not in bar  # 3 + 2 lines
