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


def run_logged(cmd, env, log: Path, desc: str, total: int | None = None, pattern: str | None = None,
               initial: int = 0, on_match=None) -> float:
    """Run ``cmd``, its output into ``log`` line by line (``tail -f`` shows what the bar does not, e.g. ReCoSeg's
    residual maps between two epochs), a progress bar (starting at ``initial``) advanced on every line matching
    ``pattern``, where ``on_match()`` (if given) is called too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    regex = re.compile(pattern) if pattern else None
    with open(log, "w", buffering=1) as f, tqdm(total=total, desc=desc, unit="epoch" if total else "it",
                                                initial=initial,
                                                bar_format=None if total else "{desc}: {elapsed}") as bar:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:
                f.write(line)
                if regex and regex.search(line):
                    bar.update(1)
                    if on_match is not None:
                        on_match()
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise NNDiffError(f"{desc} failed (exit {proc.returncode}); full log: {log}\n{tail}")
    return time.time() - t0


def workdir_environment(workdir: Path) -> dict:
    """The environment for nnU-Net's console scripts on a self-contained working folder (the demo, the comparison
    table, benchmarks): our trainers findable, nnUNet_raw / _preprocessed / _results inside ``workdir``, no
    torch.compile, one worker process each unless the caller's environment says otherwise, and no NNDIFF_*
    variable (a predict-time override would change what is run or measured)."""
    env = environment_with_trainers()
    env.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_results=str(workdir / "nnUNet_results"), nnUNet_compile="0",
               nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"), nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "1"))
    return {k: v for k, v in env.items() if not k.startswith("NNDIFF_")}


def train_fold(dataset_id, configuration: str, fold, trainer: str, fold_dir: Path, env: dict, log: Path, label: str,
               epochs: int, device: str = "cpu", npz: bool = False, on_epoch=None) -> float | None:
    """``nnUNetv2_train`` of one fold with a progress bar per epoch, resumed (``--c``) from its
    checkpoint_latest.pth if an earlier run was interrupted; nothing (None) when ``fold_dir`` already holds
    checkpoint_final.pth. ``npz``: nnU-Net's ``--npz`` (the final validation also keeps each case's probabilities,
    what a second stage trained on out-of-fold predictions reads). ``on_epoch()`` is called as each epoch starts.
    Returns the run's seconds."""
    if (fold_dir / "checkpoint_final.pth").is_file():
        return None
    latest = fold_dir / "checkpoint_latest.pth"
    done = 0  # epochs the interrupted run finished: the resumed bar starts there
    if latest.is_file():
        import torch
        done = int(torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"])
    return run_logged([BIN / "nnUNetv2_train", dataset_id, configuration, fold, "-tr", trainer, "-device", device,
                       *(["--npz"] if npz else []), *(["--c"] if latest.is_file() else [])], env, log,
                      f"{label} nnUNetv2_train -tr {trainer}{' --c (resumed)' if latest.is_file() else ''}", epochs,
                      r"Epoch \d+$", initial=done, on_match=on_epoch)
