"""The SLURM executor: the grid's jobs as job arrays through submitit's ``SlurmExecutor`` (submitit writes the
sbatch scripts: time, GPUs, partition, account, ``--requeue``, ``--signal=USR2@120``, the grid's environment as
``export`` lines), with SLURM dependencies for the order, and SLURM's own view of the jobs (squeue, sacct).

The submission: [prepare] -> one array of the independent jobs -> one array per dependent trainer (``aftercorr``
when each of its tasks waits for one task and they line up with the first array's fold by fold, else ``afterok`` on
the exact tasks all its jobs wait for, e.g. every baseline fold for NNDM's out-of-fold refiner) -> [select,
``afterok`` on every array]."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Optional

import submitit

from .jobs import FoldJob, Grid
from .tasks import PrepareJob, SelectJob, TrainJob, needs_preparing, run_select


def slurm_executor(grid: Grid, args, what: str, gpus: int, timeout_min: int, parallel: int = 1,
                   dependency: Optional[str] = None) -> submitit.SlurmExecutor:
    """A SlurmExecutor for the job(s) ``what`` (the job name is ``nndiff_<what>``) with the grid's environment and
    the command line's SLURM options."""
    env = grid.env
    ex = submitit.SlurmExecutor(folder=str(grid.folder / "slurm" / "%j"), max_num_timeout=args.max_requeue)
    setup = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())] + list(args.slurm_setup or [])
    params = dict(time=int(timeout_min), job_name=f"nndiff_{what}", array_parallelism=parallel, setup=setup,
                  signal_delay_s=120, additional_parameters={"requeue": True})
    if gpus:
        params["gpus_per_node"] = gpus
    for attr, key in (("slurm_partition", "partition"), ("slurm_account", "account"),
                      ("cpus_per_job", "cpus_per_task")):
        if getattr(args, attr, None):
            params[key] = getattr(args, attr)
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}GB"
    if dependency:
        params["dependency"] = dependency
    ex.update_parameters(**params)
    return ex


def _submit_array(ex: submitit.SlurmExecutor, grid: Grid, jobs: list[FoldJob]) -> list:
    with ex.batch():
        out = [ex.submit(TrainJob(str(grid.folder), grid.spec, j)) for j in jobs]
    return out


def run_slurm(grid: Grid, jobs: list[FoldJob], args, select: bool) -> int:
    """Submit: [prepare] -> one array of the independent jobs -> one array per dependent trainer (``aftercorr``
    when each of its jobs waits for one job and they line up with the first tasks of the first array fold by fold,
    else ``afterok`` on the union of the exact tasks its jobs wait for: SLURM applies an array's dependency to
    every task of it) -> [select, afterok on every array]."""
    spec = grid.spec
    if not jobs:
        print("nndiff grid: every job is done")
        if select:
            print(run_select(grid))
        return 0
    prepare = None
    if needs_preparing(spec):
        ex = slurm_executor(grid, args, "prepare", 0, 60)
        prepare = ex.submit(PrepareJob(spec))
        spec["prepare_job_id"] = prepare.job_id
        print(f"nndiff grid: prepare job {prepare.job_id}")
    base_dep = f"afterok:{prepare.job_id}" if prepare else None
    for j in jobs:  # before submission: once a job runs, its state file is its own
        grid.set_job_state(j.name, state="queued", job_id=None, pid=None)
    independent = [j for j in jobs if not j.after]
    dependent = [j for j in jobs if j.after]
    ids: dict[str, str] = {}
    arrays: list[str] = []
    if independent:
        ex = slurm_executor(grid, args, spec["dataset"], spec["gpus_per_job"], spec["timeout_min"],
                            args.max_parallel, base_dep)
        sjobs = _submit_array(ex, grid, independent)
        for j, s in zip(independent, sjobs):
            ids[j.name] = s.job_id
        arrays.append(sjobs[0].job_id.split("_")[0])
    first_names = [j.name for j in independent]
    for trainer in dict.fromkeys(j.trainer for j in dependent):
        group = [j for j in dependent if j.trainer == trainer]
        one_to_one = all(len(j.after) == 1 for j in group)
        if one_to_one:
            group.sort(key=lambda j: first_names.index(j.after[0].name))
        wanted = sorted({a.name for j in group for a in j.after}, key=first_names.index)
        is_array = len(independent) > 1 and len(group) > 1
        if one_to_one and is_array and [j.after[0].name for j in group] == first_names[:len(group)]:
            dep = f"aftercorr:{arrays[0]}"
        else:
            dep = "afterok:" + ":".join(ids[w] for w in wanted)
        ex = slurm_executor(grid, args, trainer, spec["gpus_per_job"], spec["timeout_min"], args.max_parallel,
                            ",".join(filter(None, [dep, base_dep])))
        sjobs = _submit_array(ex, grid, group)
        for j, s in zip(group, sjobs):
            ids[j.name] = s.job_id
        arrays.append(sjobs[0].job_id.split("_")[0])
    for name, job_id in ids.items():
        grid.set_job_id(name, job_id)
    if select:
        ex = slurm_executor(grid, args, "select", 0, 120, dependency="afterok:" + ":".join(arrays))
        sel = ex.submit(SelectJob(str(grid.folder), spec))
        spec["select_job_id"] = sel.job_id
        print(f"nndiff grid: select job {sel.job_id} (runs nnUNetv2_find_best_configuration when all succeed)")
    grid.save()
    print(f"nndiff grid: submitted {len(ids)} job(s) in {len(arrays)} array(s): {', '.join(arrays)}; "
          f"'nndiff grid status --grid-dir {grid.folder}' shows them")
    return 0


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job id (``123`` or ``123_4``): squeue for queued/running ones, sacct (when accounting
    is on) for finished ones; ids SLURM does not know are left out. Quiet when neither answers."""
    ids = sorted({str(i) for i in job_ids if i and not str(i).startswith("local:")})
    out: dict[str, str] = {}
    if not ids:
        return out
    queries = [["squeue", "-h", "-r", "-o", "%i|%T", "--jobs=" + ",".join(ids)],
               ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)]]
    for cmd in queries:
        if shutil.which(cmd[0]) is None:
            continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            job_id, _, state = line.partition("|")
            if job_id in ids and job_id not in out and state:
                out[job_id] = state.split()[0]
    return out
