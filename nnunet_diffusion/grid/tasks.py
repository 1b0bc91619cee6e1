"""What a grid job runs, on either executor: the callables submitit pickles and calls on the node.

* :class:`TrainJob`: one :class:`~.jobs.FoldJob`: nnU-Net's ``nnUNetv2_train`` in a subprocess with the grid's
  explicit environment; a ``submitit.helpers.Checkpointable`` whose ``checkpoint()`` resubmits it with ``--c``.
* :class:`PrepareJob`: before any training, unpack npz data and write nnU-Net's seeded 5-fold split once.
* :class:`SelectJob`: nnU-Net's model selection over the finished trainers (:func:`run_select`).
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from ..atomic import write_json_atomic
from ..errors import NNDiffError
from .jobs import FoldJob, Grid, SelectionStep, baselines_text
from .process import die_with_parent, log_tail, nnunet_script, stop_child


class TrainJob(submitit.helpers.Checkpointable):
    """One (trainer, fold): nnU-Net's ``nnUNetv2_train`` in a subprocess with the grid's explicit environment.

    ``--c`` when the fold has a checkpoint to continue from (or when resubmitted by :meth:`checkpoint`),
    ``--val`` when training finished but the validation did not; ``--npz`` when the grid asks for it."""

    def __init__(self, grid_folder: str, spec: dict, job: FoldJob, resume: bool = False):
        self.grid_folder = str(grid_folder)
        self.spec = spec
        self.job = job
        self.resume = resume
        self._proc = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    def __setstate__(self, state):
        if isinstance(state.get("job"), dict):   # pickled before jobs were typed: a requeue across the upgrade
            state = dict(state, job=FoldJob.from_json(state["job"], "a pickled grid job: "))
        self.__dict__.update(state)

    @property
    def name(self) -> str:
        return self.job.name

    def command(self, grid: Grid) -> list[str]:
        s, j = self.spec, self.job
        cmd = [nnunet_script("nnUNetv2_train"), str(s["dataset"]), s["configuration"], str(j.fold),
               "-tr", j.trainer, "-p", s["plans"], "-device", s["device"]]
        if s.get("npz"):
            cmd.append("--npz")
        d = grid.fold_folder(j.trainer, j.fold)
        if (d / "checkpoint_final.pth").is_file():
            cmd.append("--val")  # training finished; (re)do nnU-Net's final validation only
        elif self.resume or any((d / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_best.pth")):
            cmd.append("--c")
        return cmd

    def environment(self) -> dict:
        env = dict(os.environ)
        env.update(self.spec["env"])
        env.update(self.job.environment())
        return env

    def __call__(self) -> str:
        grid = Grid(Path(self.grid_folder), self.spec)
        j = self.job
        if grid.is_done(j.trainer, j.fold):
            grid.set_job_state(self.name, state="done")
            return "done (already)"
        unfinished = [a.name for a in j.after if not grid.is_done(a.trainer, a.fold)]
        if unfinished:
            msg = f"{self.name}: {baselines_text(unfinished, 'is not finished', 'are not finished')}"
            grid.set_job_state(self.name, state="failed", error=msg)
            raise NNDiffError(msg)
        cmd = self.command(grid)
        try:
            job_id = submitit.JobEnvironment().job_id
        except RuntimeError:
            job_id = None
        attempt = int(grid.job_state(self.name).get("attempts", 0)) + 1
        log_path = grid.log_file(self.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"\n=== nndiff grid: attempt {attempt} of {self.name} on {socket.gethostname()} (job "
                      f"{job_id}) at {time.strftime('%Y-%m-%d %H:%M:%S')}\n=== {shlex.join(cmd)}\n")
            log.flush()
            self._proc = subprocess.Popen(cmd, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                          preexec_fn=die_with_parent if sys.platform == "linux" else None)
            grid.set_job_state(self.name, state="running", pid=self._proc.pid, host=socket.gethostname(),
                               job_id=job_id, attempts=attempt, command=cmd, started=time.time())
            try:
                rc = self._proc.wait()
            except KeyboardInterrupt:
                self._stop_training()
                grid.set_job_state(self.name, state="cancelled", pid=None)
                raise
        if rc == 0 and grid.is_done(j.trainer, j.fold):
            grid.set_job_state(self.name, state="done", pid=None, returncode=0, ended=time.time())
            return "done"
        why = (f"nnUNetv2_train exited with {rc}" if rc else
               "nnUNetv2_train ended without checkpoint_final.pth and validation/summary.json")
        grid.set_job_state(self.name, state="failed", pid=None, returncode=rc, error=why, ended=time.time())
        raise NNDiffError(f"{self.name}: {why}; last lines of {log_path}: " + " | ".join(log_tail(log_path)))

    def _stop_training(self, grace_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``, to the training process. Called from submitit's signal handler
        while ``__call__`` is inside ``Popen.wait()`` (see :func:`~.process.stop_child`)."""
        proc, self._proc = self._proc, None
        stop_child(proc, grace_s)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue hook (timeout or preemption): stop the training and resubmit with ``--c``. nnU-Net
        resumes from the last checkpoint it wrote (``checkpoint_latest.pth``, every ``save_every`` epochs)."""
        self._stop_training(grace_s=30.0)
        try:
            Grid(Path(self.grid_folder), self.spec).set_job_state(self.name, state="requeued", pid=None)
        except OSError:
            pass
        return submitit.helpers.DelayedSubmission(TrainJob(self.grid_folder, self.spec, self.job, resume=True))


# ---------------------------------------------------------------------------------------------- preparation
def configuration(plans: dict, name: str) -> dict:
    """A configuration of nnU-Net's plans with its ``inherits_from`` resolved (as nnU-Net's PlansManager does)."""
    conf = dict(plans["configurations"][name])
    parent = conf.pop("inherits_from", None)
    return {**configuration(plans, parent), **conf} if parent else conf


def dataset_data_folder(spec: dict) -> Path:
    """The preprocessed data folder of the grid's configuration (``<dataset>/<data_identifier>``)."""
    base = Path(spec["env"]["nnUNet_preprocessed"]) / spec["dataset"]
    plans = json.loads((base / f"{spec['plans']}.json").read_text())
    return base / configuration(plans, spec["configuration"])["data_identifier"]


def needs_unpacking(folder: Path) -> bool:
    """npz-preprocessed data (nnU-Net < 2.6, or its numpy dataset class) not yet unpacked to .npy."""
    return any(not p.with_suffix(".npy").exists() for p in Path(folder).glob("*.npz"))


def needs_preparing(spec: dict) -> bool:
    """Whether :class:`PrepareJob` has work to do (data to unpack, or no splits_final.json yet)."""
    folder = dataset_data_folder(spec)
    return needs_unpacking(folder) or not (folder.parent / "splits_final.json").exists()


class PrepareJob:
    """Runs before any training: unpack npz data (nnU-Net's own ``unpack_dataset``) and write nnU-Net's own seeded
    5-fold split (``generate_crossval_split(sorted ids, seed=12345, n_splits=5)``, as nnUNetTrainer.do_split does)
    when splits_final.json is missing, so parallel folds neither unpack nor write the split at the same time."""

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self) -> str:
        os.environ.update(self.spec["env"])
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        folder = dataset_data_folder(self.spec)
        dataset_class = infer_dataset_class(str(folder))
        done = []
        if needs_unpacking(folder):
            n = max(1, int(self.spec["env"].get("nnUNet_def_n_proc", os.cpu_count() or 1)))
            dataset_class.unpack_dataset(str(folder), overwrite_existing=False, num_processes=n, verify=True)
            done.append(f"unpacked {folder}")
        splits = folder.parent / "splits_final.json"
        if not splits.exists():
            ids = sorted(dataset_class.get_identifiers(str(folder)))
            write_json_atomic(splits, generate_crossval_split(ids, seed=12345, n_splits=5))
            done.append(f"wrote {splits}")
        return "; ".join(done) or "nothing to prepare"


# ---------------------------------------------------------------------------------------------- model selection
def select_command(grid: Grid) -> list[str]:
    """``nnUNetv2_find_best_configuration`` over the grid's finished trainers (see :class:`~.jobs.SelectionStep`)."""
    return SelectionStep.of(grid).command(nnunet_script("nnUNetv2_find_best_configuration"))


def run_select(grid: Grid) -> str:
    """nnU-Net's own model selection (and ensembling of pairs) over the finished trainers; its output goes to
    <grid>/logs/select.log; returns where inference_instructions.txt is."""
    cmd = select_command(grid)
    env = dict(os.environ)
    env.update(grid.env)
    log = grid.log_file("select")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n=== {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise NNDiffError(f"nnUNetv2_find_best_configuration exited with {rc}; last lines of {log}: "
                          + " | ".join(log_tail(log)))
    instructions = Path(grid.env["nnUNet_results"]) / grid.spec["dataset"] / "inference_instructions.txt"
    return f"model selection: {instructions} (log {log})"


class SelectJob:
    """``nnUNetv2_find_best_configuration`` over the grid's finished trainers (see :func:`select_command`)."""

    def __init__(self, grid_folder: str, spec: dict):
        self.grid_folder, self.spec = str(grid_folder), spec

    def __call__(self) -> str:
        return run_select(Grid(Path(self.grid_folder), self.spec))

