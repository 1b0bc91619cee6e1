"""``nndiff grid status`` and ``nndiff grid cancel``: each job's state read from its fold folder (done), its state
file, its training log (epoch n of N), SLURM (squeue/sacct) and this machine's processes; the status table; and
cancelling the unfinished jobs."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Optional

from ..variables import BASELINE as BASELINE_ENV
from .jobs import FoldJob, Grid, job_name
from .process import log_tail, pid_alive
from .slurm import slurm_states


def planned_epochs(trainer: str, job_env: dict) -> Optional[int]:
    """The number of epochs a trainer runs (for 'epoch n of N'); None when it cannot be told without building it."""
    try:
        from ..trainers import TRAINERS
        cls = TRAINERS.get(trainer)
    except Exception:  # noqa: BLE001
        cls = None
    if cls is not None:
        from ..config import total_epochs
        return total_epochs(cls.hparams(), from_baseline=bool(job_env.get(BASELINE_ENV)))
    m = re.search(r"_(\d+)epochs?$", trainer)
    if m:
        return int(m.group(1))
    return 1000 if trainer == "nnUNetTrainer" else None


def current_epoch(fold_folder: Path) -> Optional[int]:
    """The last epoch nnU-Net's newest training log of the fold names (None before the first)."""
    logs = sorted(fold_folder.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    found = re.findall(r"^\S+ \S+: Epoch (\d+)\s*$", logs[-1].read_text(errors="replace"), flags=re.M)
    return int(found[-1]) if found else None


def job_status(grid: Grid, job: FoldJob, slurm: Optional[dict] = None) -> tuple[str, str]:
    """(state, detail) of one job: done / running (epoch n of N) / queued / failed / cancelled / not submitted."""
    t, f, name = job.trainer, job.fold, job.name
    if grid.is_done(t, f):
        return "done", ""
    st = grid.job_state(name)
    state = st.get("state")
    if state == "running" and st.get("host") == socket.gethostname() and not pid_alive(st.get("pid")):
        state = "failed"
        st["error"] = "its process is gone (killed?); re-run the grid to resume it"
    job_id = job.job_id or st.get("job_id")
    slurm = (slurm or {}).get(str(job_id))
    if slurm:
        if slurm in ("PENDING", "REQUEUED", "CONFIGURING"):
            state = "queued"
        elif slurm.startswith(("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) \
                and state != "done":
            state = "failed" if not slurm.startswith("CANCELLED") else "cancelled"
            st.setdefault("error", f"SLURM: {slurm}")
    if state in ("running", "requeued"):
        n, total = current_epoch(grid.fold_folder(t, f)), planned_epochs(t, job.environment())
        epoch = "starting" if n is None else f"epoch {n + 1}" + (f" of {total}" if total else "")
        return state, f"{epoch} (attempt {st.get('attempts', 1)}, job {job.job_id or st.get('job_id')})"
    if state in ("failed", "cancelled"):
        tail = log_tail(grid.log_file(name))
        return state, " | ".join([st.get("error", f"exit code {st.get('returncode')}")] + tail)
    if state == "queued" or job.job_id:
        unfinished = [a.name for a in job.after if not grid.is_done(a.trainer, a.fold)]
        wait = f"; waits for {', '.join(unfinished)}" if unfinished else ""
        return "queued", f"job {job.job_id or st.get('job_id')}{wait}"
    return "not submitted", ""


def status_table(grid: Grid) -> str:
    """The table ``nndiff grid status`` prints: trainer, fold, state, detail; then 'n/N done; grid folder ...'."""
    rows = []
    slurm = slurm_states([j.job_id for j in grid.jobs()])
    for t in grid.spec["trainers"]:
        for f in grid.spec["folds"]:
            job = grid.job(job_name(t, f))
            if job is not None:
                rows.append((t, str(f), *job_status(grid, job, slurm)))
    w = [max(len(r[i]) for r in rows + [("trainer", "fold", "state", "")]) for i in range(3)]
    lines = [f"{'trainer':{w[0]}}  {'fold':{w[1]}}  {'state':{w[2]}}  detail"]
    lines += [f"{r[0]:{w[0]}}  {r[1]:{w[1]}}  {r[2]:{w[2]}}  {r[3]}".rstrip() for r in rows]
    done = sum(r[2] == "done" for r in rows)
    lines.append(f"{done}/{len(rows)} done; grid folder {grid.folder}")
    return "\n".join(lines)


def cancel(grid: Grid) -> int:
    """Cancel the grid's unfinished jobs: SLURM jobs through submitit (scancel); local ones by signalling the
    driver and the training processes. Finished folds stay; re-running the grid resumes the rest."""
    n = 0
    driver = grid.spec.get("driver")
    if driver and driver.get("host") == socket.gethostname():
        try:
            os.kill(driver["pid"], signal.SIGINT)
            n += 1
        except ProcessLookupError:
            pass
    slurm_ids = set()
    for job in grid.jobs():
        name = job.name
        if grid.is_done(job.trainer, job.fold):
            continue
        st = grid.job_state(name)
        job_id = job.job_id or st.get("job_id")
        if st.get("state") not in ("queued", "running", "requeued"):
            continue
        if job_id and not str(job_id).startswith("local:"):
            slurm_ids.add(str(job_id))
        elif st.get("state") == "running" and st.get("host") == socket.gethostname() and pid_alive(st.get("pid")):
            os.kill(st["pid"], signal.SIGTERM)
        grid.set_job_state(name, state="cancelled", pid=None, error="cancelled by 'nndiff grid cancel'")
        n += 1
    for extra in ("prepare_job_id", "select_job_id"):
        if grid.spec.get(extra):
            slurm_ids.add(str(grid.spec[extra]))
    if slurm_ids:
        subprocess.run(["scancel", *sorted(slurm_ids)], check=False)
    print(f"nndiff grid: cancelled {n} job(s)" + (f" (SLURM: {' '.join(sorted(slurm_ids))})" if slurm_ids else ""))
    return 0
