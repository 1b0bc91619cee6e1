"""The process environment our commands hand to nnU-Net's console scripts, and running one of those scripts with
its output in a log file and a progress bar. Shared by ``nndiff`` (cli.py), the demo, the grid and the benchmarks;
it imports none of them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .errors import NNDiffError

BIN = Path(sys.executable).parent  # nnU-Net's console scripts of this interpreter's environment


def ext_trainer_dir() -> str:
    """The folder nnU-Net's ``nnUNet_extTrainer`` must name: it holds only the re-exporting module."""
    return str(Path(__file__).resolve().parent / "nnunet_ext")


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our folder appended (kept once; the user's own folders stay first)."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    parts = [p for p in current.split(os.pathsep) if p]
    ours = ext_trainer_dir()
    if ours not in parts:
        parts.append(ours)
    return os.pathsep.join(parts)


def environment_with_trainers(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    env["nnUNet_extTrainer"] = ext_trainer_value(env.get("nnUNet_extTrainer", ""))
    return env


def run_logged(cmd, env, log: Path, desc: str, total: int | None = None, pattern: str | None = None) -> float:
    """Run ``cmd``, its output into ``log``, a progress bar advanced on every line matching ``pattern``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    regex = re.compile(pattern) if pattern else None
    with open(log, "w") as f, tqdm(total=total, desc=desc, unit="epoch" if total else "it",
                                   bar_format=None if total else "{desc}: {elapsed}") as bar:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:
                f.write(line)
                if regex and regex.search(line):
                    bar.update(1)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise NNDiffError(f"{desc} failed (exit {proc.returncode}); full log: {log}\n{tail}")
    return time.time() - t0
