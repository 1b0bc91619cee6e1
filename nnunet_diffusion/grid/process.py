"""Operating-system process handling for the grid (no other module of the ``grid`` package imported): finding
nnU-Net's console scripts, tying a training process to its job (Linux ``prctl``), telling whether a recorded pid
is still an nnU-Net training (``/proc``), stopping a child without ``Popen.wait``, and a log's last lines.

Used where a job runs (:mod:`.tasks`, on either executor), by the local driver (:mod:`.local`) and by
``nndiff grid status``/``cancel`` (:mod:`.status`).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LOG_TAIL = 3


def nnunet_script(name: str) -> str:
    """An nnU-Net console script: the one beside this Python first (the venv), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def log_tail(path: Path, n: int = LOG_TAIL) -> list[str]:
    """The last ``n`` non-empty lines of a log ([] when there is no log)."""
    try:
        lines = [ln.rstrip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return []
    return lines[-n:]


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the training process gets SIGTERM when the job process dies (e.g. submitit's local controller
    SIGKILLs it on cancel), so no orphaned nnUNetv2_train keeps a GPU busy."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def pid_alive(pid: int, what: str = "nnUNetv2_train") -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line holds ``what`` (read from ``/proc``; a
    live pid whose ``/proc`` cannot be read counts as alive)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, TypeError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        return what in cmdline and Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def stop_child(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, to the child ``proc``. Safe inside a signal handler that
    interrupted ``proc.wait()``, which holds the Popen's wait lock: only ``os.kill`` and ``os.waitpid`` here
    (``Popen.wait``/``poll`` would deadlock or report a dead process as running)."""
    if proc is None or proc.returncode is not None:
        return

    def gone() -> bool:
        try:
            return os.waitpid(proc.pid, os.WNOHANG)[0] == proc.pid
        except ChildProcessError:
            return True

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if gone():
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait_s:
            if gone():
                return
            time.sleep(0.2)
