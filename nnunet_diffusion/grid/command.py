"""``nndiff grid``'s command line: the arguments, and each action (run, status, cancel, select) handed to the
module that does it."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import NNDiffError
from .build import build_grid, dataset_name, merge_previous
from .jobs import Grid, pending_jobs
from .local import run_local
from .slurm import run_slurm
from .status import cancel, status_table
from .tasks import run_select

ACTIONS = ("run", "status", "cancel", "select")


def register(sub) -> None:
    p = sub.add_parser(
        "grid", help="train every (trainer, fold) as its own job (SLURM array via submitit, or locally), resumable, "
                     "then nnUNetv2_find_best_configuration",
        description="ACTION is run (default), status, cancel or select. 'run' trains the missing (trainer, fold) "
                    "pairs (finished ones are skipped, unfinished ones continue with --c); NNDM trainers with "
                    "NNDIFF_BASELINE=<trainer> wait for that fold of the baseline (for all its folds when their "
                    "refiner learns from its out-of-fold predictions).",
        epilog="examples: nndiff grid -d 501 -c 3d_fullres -tr nnUNetTrainer nnUNetTrainerNNDM -f 0 1 2 3 4 "
               "--executor slurm --slurm-partition gpu --gpus-per-job 1 --timeout-min 2880;  "
               "nndiff grid status -d 501")
    p.add_argument("action", nargs="?", default="run", choices=ACTIONS)
    p.add_argument("-d", help="dataset id or name")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", nargs="+", help="trainers")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("--grid-dir", help="the grid's state folder (default $nnUNet_results/<dataset>/nndiff_grid)")
    p.add_argument("--executor", choices=("slurm", "local"),
                   help="slurm (default when srun is on PATH) or local (this machine)")
    p.add_argument("--max-parallel", type=int, default=4,
                   help="jobs at a time (local), the array's %%N parallelism (SLURM); default 4")
    p.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job (default 1; ignored with --device cpu)")
    p.add_argument("--timeout-min", type=int, default=2880,
                   help="time limit of a job in minutes (default 2880); a job that hits it resumes with --c")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"), help="nnUNetv2_train -device")
    p.add_argument("--no-npz", action="store_true",
                   help="do not pass --npz (then nnU-Net's model selection cannot ensemble trainers)")
    p.add_argument("--no-select", action="store_true", help="do not run nnUNetv2_find_best_configuration at the end")
    p.add_argument("--slurm-partition", help="SLURM partition")
    p.add_argument("--slurm-account", help="SLURM account")
    p.add_argument("--slurm-setup", action="append", metavar="LINE",
                   help="a shell line run in each SLURM job before training (e.g. 'module load cuda'); repeatable")
    p.add_argument("--cpus-per-job", type=int, help="SLURM cpus-per-task")
    p.add_argument("--mem-gb", type=int, help="SLURM memory per job (GB)")
    p.add_argument("--max-requeue", type=int, default=3, help="SLURM: how often a timed-out job is requeued")
    p.set_defaults(func=cmd_grid)


def _grid_folder(args) -> Path:
    if args.grid_dir:
        return Path(args.grid_dir).resolve()
    if not args.d:
        raise NNDiffError("give the dataset (-d) or the grid folder (--grid-dir)")
    for v in ("nnUNet_results", "nnUNet_preprocessed"):
        if not os.environ.get(v):
            raise NNDiffError(f"{v} is not set: give --grid-dir or set it")
    dataset = dataset_name(str(args.d), os.environ["nnUNet_preprocessed"])
    return Path(os.environ["nnUNet_results"]) / dataset / "nndiff_grid"


def cmd_grid(args) -> int:
    if args.action == "status":
        print(status_table(Grid.load(_grid_folder(args))))
        return 0
    if args.action == "cancel":
        return cancel(Grid.load(_grid_folder(args)))
    if args.action == "select":
        print(run_select(Grid.load(_grid_folder(args))))
        return 0
    grid = build_grid(args)
    trainers, folds = list(grid.spec["trainers"]), list(grid.spec["folds"])
    merge_previous(grid)
    jobs = pending_jobs(grid, trainers, folds)
    skipped = len(trainers) * len(folds) - len(jobs)
    print(f"nndiff grid: {len(jobs)} job(s) to run, {skipped} already done; grid folder {grid.folder}")
    if grid.spec["executor"] == "local":
        return run_local(grid, jobs, select=not args.no_select)
    return run_slurm(grid, jobs, args, select=not args.no_select)
