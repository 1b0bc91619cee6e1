"""The local executor: the grid's jobs on this machine through submitit's ``LocalExecutor``, driven from the
foreground ``nndiff grid`` process: at most ``max_parallel`` at a time, each with its own GPU(s)
(``visible_gpus``) and the grid's timeout, a dependent job started once all the jobs it waits for are done (and
cancelled when one of them failed); Ctrl-C cancels the running jobs, and a re-run waits for a job still training
from an earlier driver instead of restarting it."""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import submitit

from ..errors import NNDiffError
from .jobs import FoldJob, Grid, baselines_text
from .process import pid_alive
from .tasks import PrepareJob, TrainJob, run_select


def _visible_gpus() -> list[int]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return [int(x) for x in value.split(",") if x.strip().isdigit()]
    try:
        import torch
        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


@dataclass(frozen=True)
class Running:
    """A job the driver waits for: one it submitted (``submitted``, a submitit job, holding ``gpus``), or one still
    training in a process of an earlier driver (``submitted`` None, its training process ``pid``)."""
    job: FoldJob
    submitted: Optional[Any] = None
    gpus: tuple = ()
    pid: Optional[int] = None

    def finished(self) -> bool:
        return (not pid_alive(self.pid)) if self.submitted is None else self.submitted.done()


def run_local(grid: Grid, jobs: list[FoldJob], select: bool, poll_s: float = 1.0) -> int:
    """Run ``jobs`` through submitit's LocalExecutor, at most ``max_parallel`` at a time, each with its own GPUs
    (visible_gpus) and the grid's timeout; a dependent job starts when all its ``after`` are done, and is cancelled
    (state file and message naming it) when one of them failed."""
    spec = grid.spec
    per_job = spec["gpus_per_job"] if spec["device"] == "cuda" else 0
    gpus = _visible_gpus() if per_job else []
    if per_job and len(gpus) < per_job:
        raise NNDiffError(f"--gpus-per-job {per_job} but {len(gpus)} GPU(s) visible here; use --device cpu or "
                          f"fewer GPUs per job; nothing submitted")
    slots = min(spec["max_parallel"], len(gpus) // per_job) if per_job else spec["max_parallel"]
    executor = submitit.LocalExecutor(folder=str(grid.folder / "submitit"))
    spec["driver"] = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    grid.save()
    if jobs:
        result = PrepareJob(spec)()
        print(f"nndiff grid: prepare: {result}")
    waiting = list(jobs)
    running: dict[str, Running] = {}
    failed: set[str] = set()
    free = list(gpus)
    for job in list(waiting):        # a job still training from an earlier driver: wait for it, don't restart it
        st = grid.job_state(job.name)
        if st.get("state") == "running" and st.get("host") == socket.gethostname() and pid_alive(st.get("pid")):
            waiting.remove(job)
            running[job.name] = Running(job, pid=st["pid"])
            print(f"nndiff grid: {job.name} is still running (pid {st['pid']}); waiting for it")
    try:
        while waiting or running:
            for name, run in list(running.items()):
                if not run.finished():
                    continue
                del running[name]
                free.extend(run.gpus)
                ok = grid.is_done(run.job.trainer, run.job.fold)
                if run.submitted is not None and not ok:
                    try:
                        run.submitted.result()
                    except Exception as e:  # noqa: BLE001 - the job's own message
                        print(f"nndiff grid: {name} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
                if not ok:
                    failed.add(name)
                    if grid.job_state(name).get("state") in (None, "running", "queued"):
                        grid.set_job_state(name, state="failed", pid=None,
                                           error="the job ended without finishing (killed?)")
                print(f"nndiff grid: {name} {'done' if ok else 'failed'}")
            for job in list(waiting):
                name = job.name
                gone = [a.name for a in job.after if a.name in failed]
                if gone:
                    waiting.remove(job)
                    failed.add(name)
                    why = baselines_text(gone, "failed", "failed")
                    grid.set_job_state(name, state="cancelled", error=why)
                    print(f"nndiff grid: {name} not started: {why}")
                    continue
                if not all(grid.is_done(a.trainer, a.fold) for a in job.after):
                    continue
                if len(running) >= slots or len(free) < per_job:
                    break
                used, free = free[:per_job], free[per_job:]
                # the job file is the job's own once it runs: write "queued" before it can start
                grid.set_job_state(name, state="queued", job_id=None, pid=None)
                executor.update_parameters(timeout_min=spec["timeout_min"], gpus_per_node=per_job,
                                           visible_gpus=tuple(used), signal_delay_s=120)
                sjob = executor.submit(TrainJob(str(grid.folder), spec, job))
                grid.set_job_id(name, f"local:{sjob.job_id}")
                grid.save()
                running[name] = Running(job, submitted=sjob, gpus=tuple(used))
                waiting.remove(job)
                print(f"nndiff grid: {name} started (local job {sjob.job_id}"
                      f"{', GPU ' + ','.join(map(str, used)) if used else ''})")
            if waiting or running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for name, run in running.items():
            if run.submitted is not None:
                run.submitted.cancel()
            grid.set_job_state(name, state="cancelled", pid=None)
        print("nndiff grid: interrupted; running jobs cancelled (re-run the same command to resume)",
              file=sys.stderr)
        return 130
    finally:
        spec.pop("driver", None)
        grid.save()
    if failed:
        print(f"nndiff grid: {len(failed)} job(s) did not finish: {', '.join(sorted(failed))}. Re-run the same "
              f"command to resume them ('nndiff grid status' shows their logs' last lines).", file=sys.stderr)
        return 1
    print("nndiff grid: all jobs done")
    if select:
        print(run_select(grid))
    return 0
