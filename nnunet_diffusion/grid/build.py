"""Describing a grid from ``nndiff grid``'s arguments: every check (one clear line per problem, ending in "nothing
submitted"), the environment each job gets, and the grid's jobs (:class:`~.jobs.FoldJob`); merging what an earlier
run recorded in the same folder."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ..errors import NNDiffError
from ..variables import BASELINE as BASELINE_ENV
from .jobs import GRID_FILE, HEAD_SPECIFIC_ENV, FoldJob, Grid, head_specific_job, read_json

REQUIRED_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
PASSED_PREFIXES = ("nnUNet_", "NNDIFF_")
PASSED_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONWARNINGS")
SLURM_ONLY = {"slurm_partition": "--slurm-partition", "slurm_account": "--slurm-account",
              "slurm_setup": "--slurm-setup"}


def _environment(source: dict) -> dict:
    """The environment every job gets: the three nnU-Net folders (checked), nnUNet_extTrainer with our trainers,
    and the nnUNet_*/NNDIFF_* variables (and thread counts) set now; the variables of
    :data:`~.jobs.HEAD_SPECIFIC_ENV` (NNDIFF_BASELINE) go only to the jobs :func:`~.jobs.head_specific_job` picks."""
    from ..environment import ext_trainer_value
    missing = [v for v in REQUIRED_ENV if not source.get(v)]
    if missing:
        raise NNDiffError(f"{', '.join(missing)} not set: every job needs {', '.join(REQUIRED_ENV)} (nnU-Net's "
                          f"documentation/setting_up_paths.md); nothing submitted")
    env = {k: v for k, v in source.items()
           if (k.startswith(PASSED_PREFIXES) or k in PASSED_VARS) and k not in HEAD_SPECIFIC_ENV}
    for v in REQUIRED_ENV:
        env[v] = os.path.abspath(source[v])
    env["nnUNet_extTrainer"] = ext_trainer_value(source.get("nnUNet_extTrainer", ""))
    return env


def dataset_name(dataset: str, preprocessed: str) -> str:
    """``DatasetXXX_Name`` of a dataset id or name, checked against the nnUNet_preprocessed folder."""
    base = Path(preprocessed)
    if re.fullmatch(r"\d+", str(dataset)):
        found = sorted(base.glob(f"Dataset{int(dataset):03d}_*"))
        if not found:
            raise NNDiffError(f"dataset {dataset}: no Dataset{int(dataset):03d}_* in nnUNet_preprocessed={base}; "
                              f"run nnUNetv2_plan_and_preprocess -d {dataset} first; nothing submitted")
        return found[0].name
    if not (base / dataset).is_dir():
        raise NNDiffError(f"dataset {dataset}: not in nnUNet_preprocessed={base}; nothing submitted")
    return dataset


def check_trainer(name: str) -> None:
    """A trainer nnU-Net will find: one of ours (nndiff trainers), or one nnU-Net's own lookup finds."""
    from ..trainers import HEAD_PREFIXES, TRAINERS
    if name in TRAINERS or name == "nnUNetTrainer":
        return
    for prefix, head in HEAD_PREFIXES.items():
        if name.startswith(prefix):
            known = sorted(t for t in TRAINERS if t.startswith(prefix))
            raise NNDiffError(f"unknown trainer {name!r}: the {head} variants are {', '.join(known)} "
                              f"(nndiff trainers); nothing submitted")
    import nnunetv2
    from nnunetv2.utilities.find_objects import recursive_find_python_class
    if recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                   "nnunetv2.training.nnUNetTrainer") is None:
        raise NNDiffError(f"unknown trainer {name!r}: neither one of nndiff's (nndiff trainers) nor one of "
                          f"nnU-Net's; nothing submitted")


def _num_folds(preprocessed_dataset: Path) -> int:
    splits = read_json(preprocessed_dataset / "splits_final.json")
    return len(splits) if isinstance(splits, list) else 5


def _parse_folds(folds: list[str], n: int, where: Path) -> list:
    out = []
    for f in folds:
        if f == "all":
            out.append("all")
        elif re.fullmatch(r"\d+", f) and int(f) < n:
            out.append(int(f))
        else:
            raise NNDiffError(f"fold {f} out of range: {where.name} has {n} folds (0..{n - 1}, or all); "
                              f"nothing submitted")
    if len(set(map(str, out))) != len(out):
        raise NNDiffError(f"fold given twice in -f {' '.join(folds)}; nothing submitted")
    return out


def build_grid(args, source_env: Optional[dict] = None) -> Grid:
    """Check everything (one clear line per problem, nothing submitted) and describe the grid."""
    source_env = dict(os.environ if source_env is None else source_env)
    executor = args.executor or ("slurm" if shutil.which("srun") else "local")
    if executor == "local":
        for attr, flag in SLURM_ONLY.items():
            if getattr(args, attr, None):
                raise NNDiffError(f"{flag} is a SLURM option; it means nothing with --executor local (drop it, or "
                                  f"use --executor slurm); nothing submitted")
    if args.max_parallel < 1 or args.timeout_min <= 0 or args.gpus_per_job < 0:
        raise NNDiffError("--max-parallel and --timeout-min must be positive and --gpus-per-job >= 0; "
                          "nothing submitted")
    if args.d is None:
        raise NNDiffError("give the dataset (-d); nothing submitted")
    if not args.tr:
        raise NNDiffError("give the trainers (-tr); nothing submitted")
    env = _environment(source_env)
    dataset = dataset_name(str(args.d), env["nnUNet_preprocessed"])
    pre = Path(env["nnUNet_preprocessed"]) / dataset
    plans = read_json(pre / f"{args.p}.json")
    if plans is None:
        raise NNDiffError(f"{pre / (args.p + '.json')}: plans not found; nothing submitted")
    if args.c not in plans.get("configurations", {}):
        raise NNDiffError(f"configuration {args.c!r} not in {args.p}.json of {dataset} (it has "
                          f"{', '.join(plans.get('configurations', {}))}); nothing submitted")
    for t in args.tr:
        check_trainer(t)
    folds = _parse_folds([str(f) for f in args.f], _num_folds(pre), pre)
    folder = Path(args.grid_dir).resolve() if args.grid_dir else Path(env["nnUNet_results"]) / dataset / "nndiff_grid"
    spec = {"dataset": dataset, "configuration": args.c, "plans": args.p, "trainers": list(args.tr),
            "folds": folds, "npz": not args.no_npz, "device": args.device, "env": env, "executor": executor,
            "max_parallel": args.max_parallel, "gpus_per_job": args.gpus_per_job if args.device == "cuda" else 0,
            "timeout_min": args.timeout_min,
            "jobs": {}}
    grid = Grid(folder, spec)
    baseline = source_env.get(BASELINE_ENV, "")
    for t in args.tr:
        for f in folds:
            grid.add_job(head_specific_job(FoldJob(t, f), baseline, list(args.tr), grid))
    return grid


def merge_previous(grid: Grid) -> None:
    """Keep what an earlier run in the same folder recorded (job ids of other trainers/folds, driver)."""
    old = read_json(grid.folder / GRID_FILE)
    if not old:
        return
    same = ("dataset", "configuration", "plans")
    if any(old.get(k) != grid.spec[k] for k in same):
        raise NNDiffError(f"{grid.folder} holds a grid of {old.get('dataset')} {old.get('plans')} "
                          f"{old.get('configuration')}; give another --grid-dir; nothing submitted")
    for name, job in old.get("jobs", {}).items():
        grid.spec["jobs"].setdefault(name, job)
        if "job_id" in job and "job_id" not in grid.spec["jobs"][name]:
            grid.set_job_id(name, job["job_id"])
    grid.spec["trainers"] = list(dict.fromkeys(old.get("trainers", []) + grid.spec["trainers"]))
    grid.spec["folds"] = list(dict.fromkeys(old.get("folds", []) + grid.spec["folds"]))
