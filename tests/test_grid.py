"""``nndiff grid``: bad input (one line, nothing submitted), the SLURM submission submitit would send (checked with
a fake ``sbatch``), resuming, the typed job model (``grid.json`` round trip, bad values refused, dependency order,
the one head-specific branch, the selection step), and one cheap end-to-end grid on this machine through submitit's
local executor followed by nnU-Net's own model selection and ensembling.

The SLURM boundary is faked only where the cluster starts: ``sbatch`` is a 5-line script that records its argument
(the sbatch file submitit wrote) and prints a job id; ``srun`` only has to exist, because submitit's SlurmExecutor
refuses to start without it on PATH. Everything on our side of ``sbatch`` is the real code.
An opt-in test (NNDIFF_TEST_SLURM=1 and a working ``sbatch``) runs a grid on a real SLURM controller.
"""
import argparse
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from nnunet_diffusion import grid as G
from nnunet_diffusion.cli import main
from nnunet_diffusion.environment import ext_trainer_dir
from nnunet_diffusion.errors import NNDiffError
from nnunet_diffusion.grid import local as L
from nnunet_diffusion.grid.jobs import FoldJob, FoldRef, SelectionStep, head_specific_job, ordered

from conftest import BIN, DATASET, DATASET_ID, DEVICE, run

FAKE_SBATCH = """#!/bin/sh
n=$(cat "$FAKE_SLURM_DIR/counter" 2>/dev/null || echo 1000)
n=$((n + 1)); echo $n > "$FAKE_SLURM_DIR/counter"
cp "$1" "$FAKE_SLURM_DIR/sbatch_$n.sh"; echo "$@" >> "$FAKE_SLURM_DIR/calls"
echo "Submitted batch job $n"
"""


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    """nnU-Net folders with a planned-looking Dataset990 (plans + npz-preprocessed cases, no training)."""
    root = tmp_path / "nnunet"
    pre = root / "preprocessed" / DATASET
    data = pre / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    plans = {"dataset_name": DATASET, "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"},
                                "3d_lowres": {"inherits_from": "3d_fullres"}}}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    for case in ("case_000", "case_001"):
        (data / f"{case}.npz").write_bytes(b"")
        (data / f"{case}.pkl").write_bytes(b"")
    for var in ("raw", "preprocessed", "results"):
        (root / var).mkdir(exist_ok=True)
        monkeypatch.setenv(f"nnUNet_{var}", str(root / var))
    for k in [k for k in os.environ if k.startswith("NNDIFF_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    return root


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` that records and answers a job id; ``srun`` that only exists (submitit checks for it)."""
    bindir, record = tmp_path / "fakebin", tmp_path / "slurm_calls"
    bindir.mkdir()
    record.mkdir()
    (bindir / "sbatch").write_text(FAKE_SBATCH)
    (bindir / "srun").write_text("#!/bin/sh\necho 'fake srun: not a cluster' >&2; exit 1\n")
    for f in ("sbatch", "srun"):
        (bindir / f).chmod((bindir / f).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(record))
    return record


def sbatch_scripts(record: Path) -> dict:
    return {int(p.stem.split("_")[1]): p.read_text() for p in record.glob("sbatch_*.sh")}


def sbatch_params(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M))


def grid_cli(*args):
    return main(["grid", *map(str, args)])


# ---------------------------------------------------------------------------------------------- bad input
BAD_INPUT = [
    (["-tr", "nnUNetTrainerNNDM_nope", "-f", "0"], "unknown trainer 'nnUNetTrainerNNDM_nope'"),
    (["-tr", "nnUNetTrainer", "-f", "0", "5"], "fold 5 out of range"),
    (["-tr", "nnUNetTrainer", "-f", "0", "--slurm-partition", "gpu"], "--slurm-partition is a SLURM option"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUT)
def test_bad_input_one_line_nothing_submitted(fake_dataset, fake_slurm, capsys, extra, message):
    executor = "local" if "--slurm-partition" in extra else "slurm"
    rc = grid_cli("-d", DATASET_ID, "-c", "3d_fullres", "--executor", executor, *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert "nothing submitted" in err
    assert not (fake_slurm / "calls").exists()
    assert not list(fake_dataset.glob("results/*/nndiff_grid"))


def test_missing_environment_variable_is_named(fake_dataset, fake_slurm, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_results")
    rc = grid_cli("-d", DATASET_ID, "-tr", "nnUNetTrainer", "-f", "0", "--executor", "slurm")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nnUNet_results not set" in err, err
    assert not (fake_slurm / "calls").exists()


# ---------------------------------------------------------------------------------------------- SLURM submission
def test_slurm_submission_array_dependencies_gpus_environment(fake_dataset, fake_slurm, capsys, monkeypatch):
    """NNDM (NNDIFF_BASELINE=nnUNetTrainer) x 3 folds and nnUNetTrainer x 3 folds: a prepare job (the data are npz,
    so they are unpacked once, first), the baseline array 0-2%2 after it, the NNDM array task-by-task after the
    baseline's (aftercorr), and the model selection after both arrays; GPUs, time limit, partition, requeue and the
    environment are in every training script."""
    monkeypatch.setenv("NNDIFF_BASELINE", "nnUNetTrainer")
    monkeypatch.setenv("NNDIFF_STEPS", "7")
    rc = grid_cli("-d", DATASET_ID, "-c", "3d_fullres", "-tr", "nnUNetTrainer", "nnUNetTrainerNNDM", "-f", 0, 1, 2,
                  "--executor", "slurm", "--slurm-partition", "gpu", "--gpus-per-job", 1, "--timeout-min", 2880,
                  "--max-parallel", 2)
    assert rc == 0, capsys.readouterr().err
    scripts = sbatch_scripts(fake_slurm)
    assert sorted(scripts) == [1001, 1002, 1003, 1004]  # prepare, baseline array, NNDM array, select
    prepare, base, nndm, select = (sbatch_params(scripts[i]) for i in (1001, 1002, 1003, 1004))

    assert "array" not in prepare and "gpus-per-node" not in prepare
    for p in (base, nndm):
        assert p["array"] == "0-2%2"                       # 3 folds, at most 2 at a time
        assert p["gpus-per-node"] == "1" and p["time"] == "2880" and p["partition"] == "gpu"
        assert "requeue" in p and p["signal"].startswith("USR2@")
    assert base["dependency"] == "afterok:1001"
    assert set(nndm["dependency"].split(",")) == {"aftercorr:1002", "afterok:1001"}
    assert select["dependency"] == "afterok:1002:1003" and "gpus-per-node" not in select

    for i in (1002, 1003):
        exports = dict(re.findall(r"^export (\w+)=(.*)$", scripts[i], flags=re.M))
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            assert exports[var] == str(fake_dataset / var.split("_")[1])
        assert ext_trainer_dir() in exports["nnUNet_extTrainer"] and exports["NNDIFF_STEPS"] == "7"
        assert "NNDIFF_BASELINE" not in exports            # only the NNDM jobs get it, in their pickled job
        assert "submitit.core._submit" in scripts[i]

    # the pickled job of NNDM fold 1 (array task 1 of job 1003): its baseline, its environment, its requeue hook
    folder = fake_dataset / "results" / DATASET / "nndiff_grid"
    state = json.loads((folder / "grid.json").read_text())
    assert state["jobs"]["nnUNetTrainerNNDM__fold_1"]["job_id"] == "1003_1"
    assert state["jobs"]["nnUNetTrainer__fold_2"]["job_id"] == "1002_2"
    with open(folder / "slurm" / "1003_1" / "1003_1_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    job = delayed.function
    assert isinstance(job, G.TrainJob) and job.job.trainer == "nnUNetTrainerNNDM" and job.job.fold == 1
    assert job.job.after == (FoldRef("nnUNetTrainer", 1),)
    assert job.job.environment() == {"NNDIFF_BASELINE": "nnUNetTrainer"}
    assert job.environment()["NNDIFF_BASELINE"] == "nnUNetTrainer"
    grid = G.Grid(folder, state)
    assert "--c" not in job.command(grid) and "--npz" in job.command(grid)
    resubmitted = job.checkpoint()
    assert isinstance(resubmitted.function, G.TrainJob) and "--c" in resubmitted.function.command(grid)


def test_slurm_dependency_on_exact_tasks_when_folds_do_not_line_up(fake_dataset, fake_slurm, monkeypatch, capsys):
    """Baseline fold 0 already trained: NNDM fold 0 has nothing to wait for (it joins the first array); NNDM fold 1
    waits for exactly the baseline's fold-1 task."""
    monkeypatch.setenv("NNDIFF_BASELINE", "nnUNetTrainer")
    done = fake_dataset / "results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    (done / "validation").mkdir(parents=True)
    for f in ("checkpoint_final.pth", "validation/summary.json", "validation/case_000.npz"):
        (done / f).write_text("{}")
    (fake_dataset / "preprocessed" / DATASET / "splits_final.json").write_text(json.dumps(
        [{"train": [], "val": []}] * 5))
    for p in (fake_dataset / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres").glob("*.npz"):
        p.with_suffix(".npy").write_bytes(b"")             # unpacked already: no prepare job
    rc = grid_cli("-d", DATASET_ID, "-tr", "nnUNetTrainer", "nnUNetTrainerNNDM", "-f", 0, 1, "--executor", "slurm",
                  "--no-select")
    assert rc == 0, capsys.readouterr().err
    scripts = sbatch_scripts(fake_slurm)
    assert sorted(scripts) == [1001, 1002]
    first, second = sbatch_params(scripts[1001]), sbatch_params(scripts[1002])
    assert first["array"] == "0-1%2" and "dependency" not in first  # baseline fold 1 + NNDM fold 0
    assert "array" not in second and second["dependency"] == "afterok:1001_0"
    state = json.loads((fake_dataset / "results" / DATASET / "nndiff_grid" / "grid.json").read_text())
    assert state["jobs"]["nnUNetTrainer__fold_1"]["job_id"] == "1001_0"
    assert state["jobs"]["nnUNetTrainerNNDM__fold_0"]["job_id"] == "1001_1"
    assert "job_id" not in state["jobs"]["nnUNetTrainer__fold_0"]  # done: not submitted


def test_slurm_out_of_fold_refiner_waits_for_every_baseline_task(fake_dataset, fake_slurm, monkeypatch, capsys):
    """NNDM with out-of-fold residuals (nnUNetTrainerNNDM_oof): a grid that trains only some of the baseline's folds
    (the others not trained either) is refused in one line naming the missing folds' folders and the command that
    trains them, nothing submitted; with all five folds, the refiner's array waits (afterok) for all five baseline
    tasks, and grid.json holds the five [trainer, fold] pairs of each refiner job."""
    monkeypatch.setenv("NNDIFF_BASELINE", "nnUNetTrainer")
    pre = fake_dataset / "preprocessed" / DATASET
    (pre / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 5))
    for p in (pre / "nnUNetPlans_3d_fullres").glob("*.npz"):
        p.with_suffix(".npy").write_bytes(b"")             # unpacked already: no prepare job
    rc = grid_cli("-d", DATASET_ID, "-tr", "nnUNetTrainer", "nnUNetTrainerNNDM_oof", "-f", 0, 1, 2, "--executor",
                  "slurm", "--no-select")
    err = capsys.readouterr().err.strip()
    base = fake_dataset / "results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert rc == 2 and len(err.splitlines()) == 1 and "nothing submitted" in err, err
    assert f"fold(s) 3 4 are neither in this grid nor trained ({base / 'fold_3'}, {base / 'fold_4'})" in err, err
    assert f"nnUNetv2_train {DATASET} 3d_fullres FOLD -tr nnUNetTrainer -p nnUNetPlans --npz" in err, err
    assert not (fake_slurm / "calls").exists()

    rc = grid_cli("-d", DATASET_ID, "-tr", "nnUNetTrainer", "nnUNetTrainerNNDM_oof", "-f", 0, 1, 2, 3, 4,
                  "--executor", "slurm", "--no-select")
    assert rc == 0, capsys.readouterr().err
    scripts = sbatch_scripts(fake_slurm)
    assert sorted(scripts) == [1001, 1002]
    first, second = sbatch_params(scripts[1001]), sbatch_params(scripts[1002])
    assert first["array"] == "0-4%4" and "dependency" not in first
    assert second["array"] == "0-4%4"
    assert second["dependency"] == "afterok:1001_0:1001_1:1001_2:1001_3:1001_4"
    state = json.loads((fake_dataset / "results" / DATASET / "nndiff_grid" / "grid.json").read_text())
    assert state["jobs"]["nnUNetTrainerNNDM_oof__fold_2"]["after"] == [["nnUNetTrainer", f] for f in range(5)]
    assert state["jobs"]["nnUNetTrainerNNDM_oof__fold_2"]["job_id"] == "1002_2"


def test_resume_flags_and_done(tmp_path):
    """--c with a checkpoint to continue from, --val when training finished but validation did not, nothing
    (done) when checkpoint_final.pth, validation/summary.json and the .npz files are there."""
    env = {"nnUNet_results": str(tmp_path), "nnUNet_raw": "r", "nnUNet_preprocessed": "p"}
    spec = {"dataset": DATASET, "configuration": "3d_fullres", "plans": "nnUNetPlans", "device": "cpu", "npz": True,
            "env": env, "jobs": {}}
    grid = G.Grid(tmp_path / "g", spec)
    job = G.TrainJob(str(grid.folder), spec, FoldJob("nnUNetTrainer", 3))
    fold = grid.fold_folder("nnUNetTrainer", 3)
    assert fold == tmp_path / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_3"
    assert job.command(grid)[-2:] == ["cpu", "--npz"]
    fold.mkdir(parents=True)
    (fold / "checkpoint_latest.pth").write_text("")
    assert job.command(grid)[-1] == "--c"
    (fold / "checkpoint_final.pth").write_text("")
    assert job.command(grid)[-1] == "--val" and not grid.is_done("nnUNetTrainer", 3)
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text("{}")
    assert not grid.is_done("nnUNetTrainer", 3)          # --npz asked for, no .npz yet
    (fold / "validation" / "case_1.npz").write_text("")
    assert grid.is_done("nnUNetTrainer", 3)
    spec["jobs"] = {G.job_name("nnUNetTrainer", f): {"trainer": "nnUNetTrainer", "fold": f, "after": None}
                    for f in (2, 3)}
    assert [j.fold for j in G.pending_jobs(grid, ["nnUNetTrainer"], [2, 3])] == [2]


REQUEUE_IN_SIGNAL_HANDLER = """
import signal, sys, time
from nnunet_diffusion import grid as G
from nnunet_diffusion.grid import tasks
tasks.nnunet_script = lambda name: sys.argv[2]
spec = {"dataset": "D", "configuration": "3d_fullres", "plans": "nnUNetPlans", "device": "cpu", "npz": True,
        "env": {"nnUNet_results": sys.argv[1]}, "jobs": {}}
job = G.TrainJob(sys.argv[1] + "/grid", spec, G.FoldJob("nnUNetTrainer", 0))
out = {}
def handler(signum, frame):            # what submitit's handler does: checkpoint(), requeue, exit
    out["resubmitted"] = job.checkpoint()
    raise SystemExit(3)
signal.signal(signal.SIGUSR2, handler)
signal.setitimer(signal.ITIMER_REAL, 3)
signal.signal(signal.SIGALRM, lambda *a: signal.raise_signal(signal.SIGUSR2))
try:
    job()
except SystemExit:
    grid = G.Grid(job.grid_folder, spec)
    print("state", grid.job_state(job.name)["state"], "command", " ".join(out["resubmitted"].function.command(grid)))
"""


def test_checkpoint_inside_signal_handler_stops_training_and_resubmits_with_c(tmp_path):
    """submitit calls TrainJob.checkpoint() from its SIGUSR2 handler while __call__ waits for nnUNetv2_train (here a
    stand-in that sleeps): the training process is stopped (no deadlock on Popen's wait lock), the job file says
    requeued, and the resubmitted job continues with --c."""
    fake = tmp_path / "nnUNetv2_train"
    fake.write_text("#!/bin/sh\nexec sleep 120\n")
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, "-c", REQUEUE_IN_SIGNAL_HANDLER, str(tmp_path), str(fake)],
                          capture_output=True, text=True, timeout=90)
    assert "state requeued command" in proc.stdout and proc.stdout.strip().endswith("--npz --c"), proc.stderr


class FakeLocalJob:
    """Stands in for a submitit LocalJob: 'runs' for two polls, then leaves a finished fold behind (or, for a
    (trainer, fold) in its executor's ``fail``, fails)."""

    def __init__(self, executor, fn, params):
        self.executor, self.fn, self.params, self.polls = executor, fn, params, 0
        self.job_id = str(1000 + len(executor.submitted))

    def done(self):
        self.polls += 1
        if self.polls < 3:
            return False
        if self in self.executor.running:
            self.executor.running.remove(self)
            if self.failed:
                return True
            grid = G.Grid(Path(self.fn.grid_folder), self.fn.spec)
            fold = grid.fold_folder(self.fn.job.trainer, self.fn.job.fold)
            (fold / "validation").mkdir(parents=True, exist_ok=True)
            for f in ("checkpoint_final.pth", "validation/summary.json", "validation/c.npz"):
                (fold / f).write_text("{}")
        return True

    @property
    def failed(self):
        return (self.fn.job.trainer, self.fn.job.fold) in self.executor.fail

    def result(self):
        if self.failed:
            raise RuntimeError("nnUNetv2_train exited with 1")
        return "done"


class FakeLocalExecutor:
    fail = frozenset()   # (trainer, fold) of the jobs that fail

    def __init__(self, folder):
        self.params, self.submitted, self.running, self.log = {}, [], [], []

    def update_parameters(self, **params):
        self.params = dict(params)

    def submit(self, fn):
        job = FakeLocalJob(self, fn, dict(self.params))
        after = fn.job.after
        self.log.append((fn.job.trainer, fn.job.fold, job.params["visible_gpus"],
                         [tuple(j.params["visible_gpus"]) for j in self.running],
                         bool(after) and all(G.Grid(Path(fn.grid_folder), fn.spec).is_done(a.trainer, a.fold)
                                             for a in after)))
        self.submitted.append(job)
        self.running.append(job)
        return job


def test_local_scheduling_gpus_timeout_and_order(fake_dataset, monkeypatch, capsys):
    """submitit's local executor's traps: every job gets its own GPU (visible_gpus) and the grid's timeout (its
    default is 2 minutes); never more jobs than GPUs or --max-parallel; NNDM starts only after its baseline's fold."""
    made = []
    monkeypatch.setattr(L.submitit, "LocalExecutor", lambda folder: made.append(FakeLocalExecutor(folder)) or made[-1])
    monkeypatch.setattr(L, "_visible_gpus", lambda: [0, 1])
    monkeypatch.setenv("NNDIFF_BASELINE", "nnUNetTrainer")
    pre = fake_dataset / "preprocessed" / DATASET
    (pre / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 5))
    for p in (pre / "nnUNetPlans_3d_fullres").glob("*.npz"):
        p.with_suffix(".npy").write_bytes(b"")
    args = argparse.Namespace(
        executor="local", max_parallel=3, timeout_min=720, gpus_per_job=1, d=str(DATASET_ID), tr=[
            "nnUNetTrainer", "nnUNetTrainerNNDM"], c="3d_fullres", p="nnUNetPlans", f=["0", "1", "2"],
        grid_dir=None, no_npz=False, device="cuda", slurm_partition=None, slurm_account=None, slurm_setup=None)
    grid = G.build_grid(args)
    assert G.run_local(grid, G.pending_jobs(grid, args.tr, [0, 1, 2]), select=False, poll_s=0.01) == 0
    ex = made[0]
    assert len(ex.submitted) == 6 and all(j.params["timeout_min"] == 720 for j in ex.submitted)
    for trainer, fold, gpus, busy, baseline_done in ex.log:
        assert len(gpus) == 1 and tuple(gpus) not in busy and len(busy) < 2     # own GPU, at most 2 at a time
        assert baseline_done == (trainer == "nnUNetTrainerNNDM")
    assert [(t, f) for t, f, *_ in ex.log][:2] == [("nnUNetTrainer", 0), ("nnUNetTrainer", 1)]


def test_local_out_of_fold_refiner_waits_for_every_baseline_fold_and_is_cancelled_when_one_failed(
        fake_dataset, monkeypatch, capsys):
    """NNDM with out-of-fold residuals x 5 folds on the local executor: no refiner job starts before all five
    baseline folds are done; when one baseline fold fails, every refiner job is cancelled, naming it (message and
    state file), and the grid reports the failure."""
    made = []
    monkeypatch.setattr(L.submitit, "LocalExecutor", lambda folder: made.append(FakeLocalExecutor(folder)) or made[-1])
    monkeypatch.setattr(L, "_visible_gpus", lambda: [0, 1])
    monkeypatch.setenv("NNDIFF_BASELINE", "nnUNetTrainer")
    pre = fake_dataset / "preprocessed" / DATASET
    (pre / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 5))
    for p in (pre / "nnUNetPlans_3d_fullres").glob("*.npz"):
        p.with_suffix(".npy").write_bytes(b"")
    trainers = ["nnUNetTrainer", "nnUNetTrainerNNDM_oof"]

    def grid_in(folder):
        args = argparse.Namespace(
            executor="local", max_parallel=2, timeout_min=720, gpus_per_job=1, d=str(DATASET_ID), tr=trainers,
            c="3d_fullres", p="nnUNetPlans", f=["0", "1", "2", "3", "4"], grid_dir=str(folder), no_npz=False,
            device="cuda", slurm_partition=None, slurm_account=None, slurm_setup=None)
        return G.build_grid(args)

    monkeypatch.setattr(FakeLocalExecutor, "fail", {("nnUNetTrainer", 3)})
    grid = grid_in(fake_dataset / "grid_failing")
    assert G.run_local(grid, G.pending_jobs(grid, trainers, list(range(5))), select=False, poll_s=0.01) == 1
    out = capsys.readouterr().out
    assert [(t, f) for t, f, *_ in made[0].log] == [("nnUNetTrainer", f) for f in range(5)]   # no refiner started
    for f in range(5):
        name = f"nnUNetTrainerNNDM_oof__fold_{f}"
        assert f"nndiff grid: {name} not started: its baseline nnUNetTrainer__fold_3 failed" in out, out
        state = grid.job_state(name)
        assert state["state"] == "cancelled" and state["error"] == "its baseline nnUNetTrainer__fold_3 failed"

    monkeypatch.setattr(FakeLocalExecutor, "fail", set())
    for d in fake_dataset.glob("results/*/*__nnUNetPlans__3d_fullres"):
        shutil.rmtree(d)
    grid = grid_in(fake_dataset / "grid_ok")
    assert G.run_local(grid, G.pending_jobs(grid, trainers, list(range(5))), select=False, poll_s=0.01) == 0
    ex = made[1]
    assert len(ex.submitted) == 10
    assert [t for t, *_ in ex.log] == ["nnUNetTrainer"] * 5 + ["nnUNetTrainerNNDM_oof"] * 5
    for trainer, fold, gpus, busy, baselines_done in ex.log:
        assert baselines_done == (trainer == "nnUNetTrainerNNDM_oof")   # all five done when a refiner starts


# ---------------------------------------------------------------------------------------------- the typed job model
def test_job_round_trip_through_grid_json(tmp_path):
    """A job is written to grid.json as {"trainer", "fold", "after": [[trainer, fold], ...], "env", "job_id" (once
    submitted)} and read back as the same typed job; the environment is kept sorted whatever order it was given in."""
    jobs = [FoldJob("nnUNetTrainer", 0),
            FoldJob("nnUNetTrainerNNDM", "all", FoldRef("nnUNetTrainer", "all"), {"B": "2", "A": "1"}, "1003_1")]
    assert jobs[0].to_json() == {"trainer": "nnUNetTrainer", "fold": 0, "after": [], "env": {}}
    assert jobs[1].to_json() == {"trainer": "nnUNetTrainerNNDM", "fold": "all", "after": [["nnUNetTrainer", "all"]],
                                 "env": {"A": "1", "B": "2"}, "job_id": "1003_1"}
    assert jobs[1].env == (("A", "1"), ("B", "2")) and jobs[1].name == "nnUNetTrainerNNDM__fold_all"
    grid = G.Grid(tmp_path, {"jobs": {}})
    for job in jobs:
        grid.add_job(job)
    grid.save()
    loaded = G.Grid.load(tmp_path)
    assert sorted(loaded.jobs(), key=lambda j: j.name) == sorted(jobs, key=lambda j: j.name)  # grid.json sorts keys
    assert loaded.job("nnUNetTrainer__fold_1") is None
    loaded.set_job_id("nnUNetTrainer__fold_0", "local:7")
    assert loaded.job("nnUNetTrainer__fold_0").job_id == "local:7"
    assert FoldJob.from_json({"trainer": "t", "fold": 2}) == FoldJob("t", 2)   # after, env, job_id may be missing
    assert pickle.loads(pickle.dumps(jobs[1])) == jobs[1]


def test_grid_json_of_an_earlier_version_single_after_pair_or_null_loads(tmp_path):
    """A grid.json written when a job waited for one job at most ("after": [trainer, fold] or null) loads, and is
    written back in today's form (a list of pairs); a job waiting for several round-trips; a FoldJob pickled when
    'after' was one FoldRef (a SLURM job requeued across the upgrade) unpickles with a tuple."""
    old = {"jobs": {
        "nnUNetTrainerNNDM__fold_1": {"trainer": "nnUNetTrainerNNDM", "fold": 1, "after": ["nnUNetTrainer", 1],
                                      "env": {"NNDIFF_BASELINE": "nnUNetTrainer"}, "job_id": "1003_1"},
        "nnUNetTrainer__fold_1": {"trainer": "nnUNetTrainer", "fold": 1, "after": None, "env": {}}}}
    (tmp_path / "grid.json").write_text(json.dumps(old))
    grid = G.Grid.load(tmp_path)
    nndm = grid.job("nnUNetTrainerNNDM__fold_1")
    assert nndm == FoldJob("nnUNetTrainerNNDM", 1, (FoldRef("nnUNetTrainer", 1),),
                           {"NNDIFF_BASELINE": "nnUNetTrainer"}, "1003_1")
    assert grid.job("nnUNetTrainer__fold_1").after == ()
    assert nndm.to_json()["after"] == [["nnUNetTrainer", 1]]

    several = FoldJob("nnUNetTrainerNNDM_oof", 2, tuple(FoldRef("nnUNetTrainer", f) for f in range(5)))
    assert several.to_json()["after"] == [["nnUNetTrainer", f] for f in range(5)]
    assert FoldJob.from_json(several.to_json()) == several
    assert FoldJob("t", 0, [FoldRef("b", 0), FoldRef("b", 0)]).after == (FoldRef("b", 0),)   # duplicates dropped

    legacy = FoldJob("nnUNetTrainerNNDM", 1)
    object.__setattr__(legacy, "after", FoldRef("nnUNetTrainer", 1))
    assert pickle.loads(pickle.dumps(legacy)).after == (FoldRef("nnUNetTrainer", 1),)
    object.__setattr__(legacy, "after", None)
    assert pickle.loads(pickle.dumps(legacy)).after == ()

    spec = {"dataset": DATASET, "configuration": "3d_fullres", "plans": "nnUNetPlans", "npz": False,
            "env": {"nnUNet_results": str(tmp_path)}, "jobs": {}}
    queued = G.Grid(tmp_path / "g", spec)
    done = queued.fold_folder("nnUNetTrainer", 0)
    (done / "validation").mkdir(parents=True)
    (done / "checkpoint_final.pth").write_text("")
    (done / "validation" / "summary.json").write_text("{}")
    assert G.job_status(queued, replace(several, job_id="7")) == (
        "queued", "job 7; waits for " + ", ".join(f"nnUNetTrainer__fold_{f}" for f in range(1, 5)))
    queued.add_job(several)
    [pending] = G.pending_jobs(queued, ["nnUNetTrainerNNDM_oof"], [2])
    assert pending.after == tuple(FoldRef("nnUNetTrainer", f) for f in range(1, 5))   # fold 0 done: dropped


BAD_JOBS = [
    ({"trainer": "t", "fold": "x"}, "fold 'x' of t is not a fold (0, 1, ... or 'all')"),
    ({"trainer": "t", "fold": -1}, "fold -1 of t is not a fold"),
    ({"trainer": "t", "fold": True}, "fold True of t is not a fold"),
    ({"trainer": "", "fold": 0}, "trainer '' is not a trainer name"),
    ({"fold": 0}, "key(s) 'trainer' missing"),
    ({"trainer": "t", "fold": 0, "folds": [1]}, "unknown key(s) 'folds' (a job has trainer, fold, after, env, job_id)"),
    ({"trainer": "t", "fold": 0, "after": "b"}, "after: 'b' is not a [trainer, fold] pair"),
    ({"trainer": "t", "fold": 0, "after": ["b", "1"]}, "after: fold '1' of b is not a fold"),
    ({"trainer": "t", "fold": 0, "after": [["b", 0], "x"]}, "after: 'x' is not a [trainer, fold] pair"),
    ({"trainer": "t", "fold": 0, "after": [["b", 0], ["t", 0]]}, "t__fold_0: a job cannot wait for itself"),
    ({"trainer": "t", "fold": 0, "after": ["t", 0]}, "t__fold_0: a job cannot wait for itself"),
    ({"trainer": "t", "fold": 0, "env": {"A": 1}}, "t__fold_0: env 'A'=1: names and values must be strings"),
    ({"trainer": "t", "fold": 0, "env": ["A"]}, "t__fold_0: 'env' must map variable names to values"),
    ({"trainer": "t", "fold": 0, "job_id": 12}, "t__fold_0: job_id 12 is not a job id"),
]


@pytest.mark.parametrize("value,message", BAD_JOBS)
def test_bad_job_refused_naming_file_job_and_key(tmp_path, value, message):
    """A bad value in grid.json's jobs is refused in one line naming the file, the job, the key and the value."""
    (tmp_path / "grid.json").write_text(json.dumps({"jobs": {"j": value}}))
    with pytest.raises(NNDiffError) as e:
        G.Grid.load(tmp_path).job("j")
    assert str(e.value).startswith(f"{tmp_path / 'grid.json'}: job j: {message}"), str(e.value)


def test_job_under_another_name_refused(tmp_path):
    grid = G.Grid(tmp_path, {"jobs": {"a__fold_0": FoldJob("b", 0).to_json()}})
    with pytest.raises(NNDiffError, match=r"grid.json: job a__fold_0 holds the job of b__fold_0"):
        grid.job("a__fold_0")


def test_dependency_order_and_done_dependencies_dropped(tmp_path):
    """The jobs another job waits for first, then the other independent ones, then the dependent ones (each group in
    the given order); a dependency that is already done is dropped, so its job runs with the independent ones."""
    b0, b1, b2 = (FoldJob("base", f) for f in (0, 1, 2))
    r0, r2 = (FoldJob("refiner", f, FoldRef("base", f)) for f in (0, 2))
    other = FoldJob("other", 0)
    assert ordered([other, r2, b0, b1, r0, b2]) == [b0, b2, other, b1, r2, r0]

    spec = {"dataset": DATASET, "configuration": "3d_fullres", "plans": "nnUNetPlans", "npz": False,
            "env": {"nnUNet_results": str(tmp_path)}, "jobs": {}}
    grid = G.Grid(tmp_path / "g", spec)
    for job in (b0, b1, r0, FoldJob("refiner", 1, FoldRef("base", 1))):
        grid.add_job(job)
    done = grid.fold_folder("base", 0)
    (done / "validation").mkdir(parents=True)
    (done / "checkpoint_final.pth").write_text("")
    (done / "validation" / "summary.json").write_text("{}")
    pending = G.pending_jobs(grid, ["base", "refiner"], [0, 1])
    assert [(j.name, j.after) for j in pending] == [("base__fold_1", ()), ("refiner__fold_0", ()),
                                                    ("refiner__fold_1", (FoldRef("base", 1),))]
    assert grid.job("refiner__fold_0").after == (FoldRef("base", 0),)    # grid.json itself keeps the dependency


def test_head_specific_job_nndm_waits_for_its_baseline(tmp_path):
    """The grid's one head-specific branch: an NNDM job started with NNDIFF_BASELINE gets it in its environment and
    waits for that fold of the baseline when the baseline is in the grid; other jobs are left as they are."""
    grid = G.Grid(tmp_path, {"dataset": DATASET, "configuration": "3d_fullres", "plans": "nnUNetPlans",
                             "env": {"nnUNet_results": str(tmp_path)}, "jobs": {}})
    nndm, stock = FoldJob("nnUNetTrainerNNDM", 1), FoldJob("nnUNetTrainer", 1)
    trainers = ["nnUNetTrainer", "nnUNetTrainerNNDM"]
    assert head_specific_job(nndm, "", trainers, grid) == nndm
    assert head_specific_job(stock, "nnUNetTrainer", trainers, grid) == stock
    assert head_specific_job(nndm, "nnUNetTrainer", trainers, grid) == FoldJob(
        "nnUNetTrainerNNDM", 1, FoldRef("nnUNetTrainer", 1), {"NNDIFF_BASELINE": "nnUNetTrainer"})
    checkpoint = str(tmp_path / "some" / "checkpoint_final.pth")          # a path: nothing to wait for
    assert head_specific_job(nndm, checkpoint, trainers, grid) == FoldJob(
        "nnUNetTrainerNNDM", 1, env={"NNDIFF_BASELINE": checkpoint})
    with pytest.raises(NNDiffError, match="fold 1 of nnUNetTrainer_tiny is neither in this grid"):
        head_specific_job(nndm, "nnUNetTrainer_tiny", trainers, grid)


def test_head_specific_job_out_of_fold_refiner_waits_for_every_baseline_fold(tmp_path):
    """NNDM whose residual source is "oof" waits for every fold of the baseline (n from splits_final.json, else 5;
    fold "all" also for the baseline's fold all) that the grid trains, the others being trained already; missing
    ones are refused in one line naming their folders. "auto" waits for every fold when each is in the grid or
    trained (then it uses "oof"), else for the same fold only (it uses "backbone"), as a "backbone" job always does."""
    def grid(folds, n_splits=None):
        pre = tmp_path / "pre"
        (pre / DATASET).mkdir(parents=True, exist_ok=True)
        splits = pre / DATASET / "splits_final.json"
        splits.unlink(missing_ok=True)
        if n_splits:
            splits.write_text(json.dumps([{"train": [], "val": []}] * n_splits))
        return G.Grid(tmp_path, {"dataset": DATASET, "configuration": "3d_fullres", "plans": "nnUNetPlans",
                                 "folds": folds, "jobs": {},
                                 "env": {"nnUNet_results": str(tmp_path / "res"), "nnUNet_preprocessed": str(pre)}})

    def refs(*folds):
        return tuple(FoldRef("nnUNetTrainer", f) for f in folds)

    trainers = ["nnUNetTrainer", "nnUNetTrainerNNDM_oof", "nnUNetTrainerNNDM", "nnUNetTrainerNNDM_refiner_insample"]
    env = {"NNDIFF_BASELINE": "nnUNetTrainer"}
    five = grid([0, 1, 2, 3, 4])
    assert head_specific_job(FoldJob("nnUNetTrainerNNDM_oof", 2), "nnUNetTrainer", trainers, five) == FoldJob(
        "nnUNetTrainerNNDM_oof", 2, refs(0, 1, 2, 3, 4), env)
    assert head_specific_job(FoldJob("nnUNetTrainerNNDM", 2), "nnUNetTrainer", trainers, five).after == \
        refs(0, 1, 2, 3, 4)                                                 # "auto": every fold is in the grid
    assert head_specific_job(FoldJob("nnUNetTrainerNNDM_refiner_insample", 2), "nnUNetTrainer", trainers,
                             five).after == refs(2)                         # "backbone": the same fold
    assert head_specific_job(FoldJob("nnUNetTrainerNNDM_oof", "all"), "nnUNetTrainer", trainers,
                             grid([0, 1, 2, 3, 4, "all"])).after == refs(0, 1, 2, 3, 4, "all")
    assert head_specific_job(FoldJob("nnUNetTrainerNNDM_oof", 1), "nnUNetTrainer", trainers,
                             grid([0, 1, 2], n_splits=3)).after == refs(0, 1, 2)   # splits_final.json's 3 folds

    some = grid([0, 1, 2])
    assert head_specific_job(FoldJob("nnUNetTrainerNNDM", 2), "nnUNetTrainer", trainers, some).after == refs(2)
    with pytest.raises(NNDiffError) as e:
        head_specific_job(FoldJob("nnUNetTrainerNNDM_oof", 2), "nnUNetTrainer", trainers, some)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and message.endswith("nothing submitted")
    assert f"fold(s) 3 4 are neither in this grid nor trained ({some.fold_folder('nnUNetTrainer', 3)}, " \
           f"{some.fold_folder('nnUNetTrainer', 4)})" in message
    for f in (3, 4):                                     # trained outside the grid: nothing to wait for there
        some.fold_folder("nnUNetTrainer", f).mkdir(parents=True)
        (some.fold_folder("nnUNetTrainer", f) / "checkpoint_final.pth").write_text("")
    for trainer in ("nnUNetTrainerNNDM_oof", "nnUNetTrainerNNDM"):
        assert head_specific_job(FoldJob(trainer, 2), "nnUNetTrainer", trainers, some).after == refs(0, 1, 2)
    alone = ["nnUNetTrainerNNDM_oof"]                    # the baseline not in the grid: every fold trained already
    with pytest.raises(NNDiffError, match=r"fold\(s\) 0 1 2 are neither in this grid nor trained"):
        head_specific_job(FoldJob("nnUNetTrainerNNDM_oof", 2), "nnUNetTrainer", alone, grid([2]))
    for f in (0, 1, 2):
        some.fold_folder("nnUNetTrainer", f).mkdir(parents=True)
        (some.fold_folder("nnUNetTrainer", f) / "checkpoint_final.pth").write_text("")
    assert head_specific_job(FoldJob("nnUNetTrainerNNDM_oof", 2), "nnUNetTrainer", alone, grid([2])).after == ()


def test_selection_step(tmp_path):
    """nnUNetv2_find_best_configuration over the trainers whose cross-validation folds are all done; ensembling only
    with the .npz files and two trainers or more."""
    spec = {"dataset": DATASET, "configuration": "3d_fullres", "plans": "nnUNetPlans", "npz": True,
            "env": {"nnUNet_results": str(tmp_path), "nnUNet_def_n_proc": "2"}, "trainers": ["a", "b"],
            "folds": [0, 1, "all"], "jobs": {}}
    grid = G.Grid(tmp_path / "g", spec)
    with pytest.raises(NNDiffError, match=r"no trainer has all folds \[0, 1\] done \(missing: a__fold_0, a__fold_1, "
                                          r"b__fold_0, b__fold_1\); nothing selected"):
        SelectionStep.of(grid)
    for t, f in (("a", 0), ("a", 1), ("b", 0)):
        d = grid.fold_folder(t, f)
        (d / "validation").mkdir(parents=True)
        for name in ("checkpoint_final.pth", "validation/summary.json", "validation/c.npz"):
            (d / name).write_text("")
    step = SelectionStep.of(grid)
    assert step == SelectionStep(DATASET, "3d_fullres", "nnUNetPlans", ("a",), (0, 1), "2", False)
    assert step.command("find") == ["find", DATASET, "-c", "3d_fullres", "-p", "nnUNetPlans", "-tr", "a", "-f", "0",
                                    "1", "-np", "2", "--disable_ensembling"]
    spec["folds"] = ["all"]
    with pytest.raises(NNDiffError, match="model selection needs cross-validation folds"):
        SelectionStep.of(grid)


def test_train_job_pickled_before_typed_jobs_still_loads():
    """A SLURM job requeued across the upgrade: its pickle holds the job as grid.json's dict; it loads as a FoldJob."""
    job = G.TrainJob("/g", {"jobs": {}}, FoldJob("nnUNetTrainerNNDM", 1, FoldRef("nnUNetTrainer", 1)))
    job.job = job.job.to_json()
    loaded = pickle.loads(pickle.dumps(job))
    assert loaded.job == FoldJob("nnUNetTrainerNNDM", 1, FoldRef("nnUNetTrainer", 1)) and loaded.resume is False


def test_grid_modules_import_no_circle():
    """The grid package's modules import each other without a circle, and the job model imports none of them."""
    import ast
    folder = Path(G.__file__).parent
    edges = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        edges[path.stem] = {node.module.split(".")[0] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert edges["jobs"] == set() and edges["process"] == set()
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import circle: {' -> '.join(visiting + [module])}"
        if module not in done:
            visiting.append(module)
            for other in edges[module]:
                visit(other)
            visiting.pop()
            done.add(module)

    for module in edges:
        if module != "__init__":
            visit(module)
    assert all("__init__" not in e for e in edges.values())


# ---------------------------------------------------------------------------------------------- end to end (local)
def _wait_for(predicate, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _start_grid(cmd, env):
    """The grid command in its own process group, so that a failed test stops its local jobs too."""
    return subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _stop_grid(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)      # the driver cancels its jobs, as on Ctrl-C
        time.sleep(5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _finish_grid(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        _stop_grid(proc)


@pytest.mark.e2e
def test_local_grid_resume_select_and_ensemble(planned, tmp_path):
    """nnUNetTrainer_tiny and nnUNetTrainerNNDM_tiny (NNDIFF_BASELINE=nnUNetTrainer_tiny) x folds 0 1 through
    submitit's local executor, 2 at a time. The baseline's fold 1 is killed mid-training: its NNDM fold is not
    started, the grid reports the failure; the re-run skips the three finished jobs, resumes fold 1 with --c and
    then runs nnUNetv2_find_best_configuration (-f 0 1) on the results; nnUNetv2_ensemble then merges the two
    heads' probabilities on the test images."""
    env = dict(planned.env, nnUNet_results=str(tmp_path / "results"), NNDIFF_BASELINE="nnUNetTrainer_tiny")
    grid_dir = tmp_path / "grid"
    cmd = [BIN / "nndiff", "grid", "-d", DATASET_ID, "-c", "3d_fullres", "-tr", "nnUNetTrainer_tiny",
           "nnUNetTrainerNNDM_tiny", "-f", "0", "1", "--executor", "local", "--max-parallel", "2", "--device",
           DEVICE, "--gpus-per-job", "0", "--timeout-min", "30", "--grid-dir", grid_dir]
    results = tmp_path / "results" / DATASET
    base1 = results / "nnUNetTrainer_tiny__nnUNetPlans__3d_fullres" / "fold_1"
    proc = _start_grid(cmd, env)
    try:
        # kill the baseline's fold 1 once it has written the checkpoint of its first epoch (of 2)
        _wait_for(lambda: (base1 / "checkpoint_latest.pth").exists(), 1800, "the first checkpoint of fold 1")
        state = json.loads((grid_dir / "jobs" / "nnUNetTrainer_tiny__fold_1.json").read_text())
        os.kill(state["pid"], signal.SIGKILL)
    except BaseException:
        _stop_grid(proc)
        raise
    out = _finish_grid(proc, 1800)
    assert proc.returncode == 1, out
    assert "nnUNetTrainerNNDM_tiny__fold_1 not started: its baseline nnUNetTrainer_tiny__fold_1 failed" in out
    status = G.status_table(G.Grid.load(grid_dir))
    assert re.search(r"nnUNetTrainer_tiny\s+1\s+failed", status) and re.search(r"nnUNetTrainer_tiny\s+0\s+done",
                                                                               status), status
    finished = {p: p.stat().st_mtime for p in results.glob("*/fold_*/checkpoint_final.pth")}
    assert len(finished) == 2                                          # baseline 0, NNDM 0

    second = _start_grid(cmd, env)
    out = _finish_grid(second, 1800)
    assert second.returncode == 0 and "2 job(s) to run, 2 already done" in out, out
    log = (grid_dir / "logs" / "nnUNetTrainer_tiny__fold_1.log").read_text()
    attempts = re.findall(r"^=== (/\S*nnUNetv2_train .*)$", log, flags=re.M)
    assert len(attempts) == 2 and "--c" not in attempts[0] and attempts[1].endswith("--npz --c"), log
    assert {p: p.stat().st_mtime for p in finished} == finished        # the finished jobs were not re-run
    assert json.loads((grid_dir / "jobs" / "nnUNetTrainerNNDM_tiny__fold_0.json").read_text())["attempts"] == 1
    assert "stage 1 skipped" in (grid_dir / "logs" / "nnUNetTrainerNNDM_tiny__fold_1.log").read_text()
    status = G.status_table(G.Grid.load(grid_dir))
    assert "4/4 done" in status, status

    # nnU-Net's model selection ran at the end of the grid, with ensembling of the two heads' .npz
    instructions = (results / "inference_instructions.txt").read_text()
    assert "nnUNetv2_predict" in instructions
    info = json.loads((results / "inference_information.json").read_text())
    assert set(info["all_results"]) >= {"nnUNetTrainer_tiny__nnUNetPlans__3d_fullres",
                                        "nnUNetTrainerNNDM_tiny__nnUNetPlans__3d_fullres"}
    assert any(k.startswith("ensemble___") for k in info["all_results"])

    # nnUNetv2_ensemble on the two heads' probabilities (nnUNetv2_predict --save_probabilities, as instructed)
    outs, procs = [], []
    for trainer in ("nnUNetTrainer_tiny", "nnUNetTrainerNNDM_tiny"):   # both at once: one core each
        out_dir = tmp_path / f"pred_{trainer}"
        procs.append(subprocess.Popen(
            [str(a) for a in (BIN / "nnUNetv2_predict", "-i", planned.raw / "imagesTs", "-o", out_dir, "-d",
                              DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", DEVICE, "-npp",
                              "1", "-nps", "1", "--disable_tta", "--save_probabilities", "--disable_progress_bar")],
            env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out_dir)
    for p in procs:
        out = p.communicate(timeout=900)[0]
        assert p.returncode == 0, out[-3000:]
    run([BIN / "nnUNetv2_ensemble", "-i", *outs, "-o", tmp_path / "ensemble", "-np", "1"], env)
    cases = sorted(p.name for p in (planned.raw / "labelsTs").glob("*.nii.gz"))
    assert cases and sorted(p.name for p in (tmp_path / "ensemble").glob("*.nii.gz")) == cases


# ---------------------------------------------------------------------------------------------- real SLURM (opt-in)
@pytest.mark.e2e
@pytest.mark.skipif(not (shutil.which("sbatch") and os.environ.get("NNDIFF_TEST_SLURM") == "1"),
                    reason="opt-in: needs a SLURM controller (sbatch on PATH) and NNDIFF_TEST_SLURM=1")
def test_real_slurm_grid_requeue_resumes(planned, tmp_path):
    """A grid on a real SLURM controller (CPU jobs): the baseline's job is sent USR2 (what SLURM sends before its
    time limit) after its first checkpoint: submitit calls TrainJob.checkpoint and requeues it, the job comes back
    with --c; NNDM runs after it (aftercorr/afterok) and both finish."""
    env = dict(planned.env, nnUNet_results=str(tmp_path / "results"), NNDIFF_BASELINE="nnUNetTrainer_tiny")
    grid_dir = tmp_path / "grid"
    run([BIN / "nndiff", "grid", "-d", DATASET_ID, "-tr", "nnUNetTrainer_tiny", "nnUNetTrainerNNDM_tiny", "-f", "0",
         "--executor", "slurm", "--device", "cpu", "--gpus-per-job", "0", "--timeout-min", "30", "--no-select",
         "--grid-dir", grid_dir], env)
    state = json.loads((grid_dir / "grid.json").read_text())
    base_id = state["jobs"]["nnUNetTrainer_tiny__fold_0"]["job_id"]
    fold = tmp_path / "results" / DATASET / "nnUNetTrainer_tiny__nnUNetPlans__3d_fullres" / "fold_0"
    _wait_for(lambda: (fold / "checkpoint_latest.pth").exists(), 900, "the baseline's first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", base_id], check=True)
    nndm = tmp_path / "results" / DATASET / "nnUNetTrainerNNDM_tiny__nnUNetPlans__3d_fullres" / "fold_0"
    _wait_for(lambda: (nndm / "validation" / "summary.json").exists(), 1200, "the NNDM job")
    log = (grid_dir / "logs" / "nnUNetTrainer_tiny__fold_0.log").read_text()
    attempts = re.findall(r"^=== (/\S*nnUNetv2_train .*)$", log, flags=re.M)
    assert len(attempts) == 2 and attempts[1].endswith("--c"), log
    status = run([BIN / "nndiff", "grid", "status", "--grid-dir", grid_dir], env).stdout
    assert "2/2 done" in status, status
