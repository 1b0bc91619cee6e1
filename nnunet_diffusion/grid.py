"""``nndiff grid``: every (trainer, fold) of a dataset trained as its own job, on a SLURM cluster (one job array,
through submitit) or on this machine (submitit's local executor), resumable, then nnU-Net's own model selection.

Each job runs nnU-Net's own ``nnUNetv2_train <dataset> <configuration> <fold> -tr <trainer> --npz`` with an
environment given explicitly (nnUNet_raw, nnUNet_preprocessed, nnUNet_results, nnUNet_extTrainer and the
``nnUNet_*``/``NNDIFF_*`` variables set at submission). What the grid adds, and nothing more:

* order: a job of an NNDM trainer with ``NNDIFF_BASELINE=<trainer>`` waits for that fold of the baseline (SLURM:
  ``aftercorr`` between two arrays whose tasks line up fold by fold, else ``afterok`` on the exact tasks; locally
  the same order). A short preparation step runs first: it unpacks npz-preprocessed data (nnU-Net's advice for
  folds trained in parallel; a no-op for nnU-Net 2.8's blosc2 data) and writes nnU-Net's own seeded 5-fold
  ``splits_final.json`` once, so parallel folds do not race to write it.
* resuming: a job is done when its fold has ``checkpoint_final.pth`` and ``validation/summary.json`` (and the
  validation ``.npz`` files when they are asked for); done jobs are never re-run. A job with a checkpoint continues
  with nnU-Net's ``--c``; one whose training finished but whose validation did not runs ``--val``. On SLURM a job
  that times out or is preempted is requeued by submitit (:class:`TrainJob` is a ``submitit.helpers.
  Checkpointable`` whose ``checkpoint()`` resubmits it with ``--c``).
* state: ``<grid folder>/grid.json`` (the grid and its job ids) and ``<grid folder>/jobs/<trainer>__fold_<f>.json``
  (written by each job), all written atomically; logs in ``<grid folder>/logs/``.
* selection: ``nnUNetv2_find_best_configuration`` over the trainers whose requested folds are all done
  (``inference_instructions.txt`` in ``$nnUNet_results/<dataset>/``).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import submitit

from .atomic import write_json_atomic
from .errors import NNDiffError
from .variables import BASELINE as BASELINE_ENV

REQUIRED_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
PASSED_PREFIXES = ("nnUNet_", "NNDIFF_")
PASSED_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONWARNINGS")
GRID_FILE = "grid.json"
SLURM_ONLY = {"slurm_partition": "--slurm-partition", "slurm_account": "--slurm-account",
              "slurm_setup": "--slurm-setup"}
LOG_TAIL = 3


# ---------------------------------------------------------------------------------------------- small helpers
def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def job_name(trainer: str, fold) -> str:
    return f"{trainer}__fold_{fold}"


def nnunet_script(name: str) -> str:
    """An nnU-Net console script: the one beside this Python first (the venv), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def log_tail(path: Path, n: int = LOG_TAIL) -> list[str]:
    try:
        lines = [ln.rstrip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return []
    return lines[-n:]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the training process gets SIGTERM when the job process dies (e.g. submitit's local controller
    SIGKILLs it on cancel), so no orphaned nnUNetv2_train keeps a GPU busy."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _pid_alive(pid: int, what: str = "nnUNetv2_train") -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, TypeError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        return what in cmdline and Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------------------------------- grid description
class Grid:
    """A grid folder: ``grid.json`` (dataset, configuration, plans, trainers, folds, environment, job ids) and the
    per-job state files. All paths derive from the environment stored in it, not from this process's."""

    def __init__(self, folder: Path, spec: dict):
        self.folder = Path(folder)
        self.spec = spec

    # -- paths
    @property
    def env(self) -> dict:
        return self.spec["env"]

    def model_folder(self, trainer: str) -> Path:
        s = self.spec
        return Path(self.env["nnUNet_results"]) / s["dataset"] / f"{trainer}__{s['plans']}__{s['configuration']}"

    def fold_folder(self, trainer: str, fold) -> Path:
        return self.model_folder(trainer) / f"fold_{fold}"

    def job_file(self, name: str) -> Path:
        return self.folder / "jobs" / f"{name}.json"

    def log_file(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    # -- persistence
    def save(self) -> None:
        write_json_atomic(self.folder / GRID_FILE, self.spec)

    @classmethod
    def load(cls, folder: Path) -> "Grid":
        spec = read_json(Path(folder) / GRID_FILE)
        if spec is None:
            raise NNDiffError(f"{folder}: no grid here ({GRID_FILE} missing); start one with 'nndiff grid -d ...' "
                              f"or name its folder with --grid-dir")
        return cls(folder, spec)

    def job_state(self, name: str) -> dict:
        return read_json(self.job_file(name), {}) or {}

    def set_job_state(self, name: str, **fields) -> dict:
        state = self.job_state(name)
        state.update(fields, updated=time.time())
        write_json_atomic(self.job_file(name), state)
        return state

    # -- what is finished
    def is_done(self, trainer: str, fold) -> bool:
        d = self.fold_folder(trainer, fold)
        if not ((d / "checkpoint_final.pth").is_file() and (d / "validation" / "summary.json").is_file()):
            return False
        return not self.spec.get("npz") or any((d / "validation").glob("*.npz"))

    def jobs(self) -> list[dict]:
        return list(self.spec["jobs"].values())


# ---------------------------------------------------------------------------------------------- the jobs
class TrainJob(submitit.helpers.Checkpointable):
    """One (trainer, fold): nnU-Net's ``nnUNetv2_train`` in a subprocess with the grid's explicit environment.

    ``--c`` when the fold has a checkpoint to continue from (or when resubmitted by :meth:`checkpoint`),
    ``--val`` when training finished but the validation did not; ``--npz`` when the grid asks for it."""

    def __init__(self, grid_folder: str, spec: dict, job: dict, resume: bool = False):
        self.grid_folder = str(grid_folder)
        self.spec = spec
        self.job = job
        self.resume = resume
        self._proc = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    @property
    def name(self) -> str:
        return job_name(self.job["trainer"], self.job["fold"])

    def command(self, grid: Grid) -> list[str]:
        s, j = self.spec, self.job
        cmd = [nnunet_script("nnUNetv2_train"), str(s["dataset"]), s["configuration"], str(j["fold"]),
               "-tr", j["trainer"], "-p", s["plans"], "-device", s["device"]]
        if s.get("npz"):
            cmd.append("--npz")
        d = grid.fold_folder(j["trainer"], j["fold"])
        if (d / "checkpoint_final.pth").is_file():
            cmd.append("--val")  # training finished; (re)do nnU-Net's final validation only
        elif self.resume or any((d / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_best.pth")):
            cmd.append("--c")
        return cmd

    def environment(self) -> dict:
        env = dict(os.environ)
        env.update(self.spec["env"])
        env.update(self.job.get("env", {}))
        return env

    def __call__(self) -> str:
        grid = Grid(Path(self.grid_folder), self.spec)
        j = self.job
        if grid.is_done(j["trainer"], j["fold"]):
            grid.set_job_state(self.name, state="done")
            return "done (already)"
        after = j.get("after")
        if after and not grid.is_done(*after):
            msg = f"{self.name}: its baseline {job_name(*after)} is not finished"
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
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            grid.set_job_state(self.name, state="running", pid=self._proc.pid, host=socket.gethostname(),
                               job_id=job_id, attempts=attempt, command=cmd, started=time.time())
            try:
                rc = self._proc.wait()
            except KeyboardInterrupt:
                self._stop_training()
                grid.set_job_state(self.name, state="cancelled", pid=None)
                raise
        if rc == 0 and grid.is_done(j["trainer"], j["fold"]):
            grid.set_job_state(self.name, state="done", pid=None, returncode=0, ended=time.time())
            return "done"
        why = (f"nnUNetv2_train exited with {rc}" if rc else
               "nnUNetv2_train ended without checkpoint_final.pth and validation/summary.json")
        grid.set_job_state(self.name, state="failed", pid=None, returncode=rc, error=why, ended=time.time())
        raise NNDiffError(f"{self.name}: {why}; last lines of {log_path}: " + " | ".join(log_tail(log_path)))

    def _stop_training(self, grace_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``, to the training process. Called from submitit's signal handler
        while ``__call__`` is inside ``Popen.wait()``, which holds the Popen's wait lock: so only ``os.kill`` and
        ``os.waitpid`` here (``Popen.wait``/``poll`` would deadlock or report a dead process as running)."""
        proc, self._proc = self._proc, None
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

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue hook (timeout or preemption): stop the training and resubmit with ``--c``. nnU-Net
        resumes from the last checkpoint it wrote (``checkpoint_latest.pth``, every ``save_every`` epochs)."""
        self._stop_training(grace_s=30.0)
        try:
            Grid(Path(self.grid_folder), self.spec).set_job_state(self.name, state="requeued", pid=None)
        except OSError:
            pass
        return submitit.helpers.DelayedSubmission(TrainJob(self.grid_folder, self.spec, self.job, resume=True))


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


class SelectJob:
    """``nnUNetv2_find_best_configuration`` over the grid's finished trainers (see :func:`select_command`)."""

    def __init__(self, grid_folder: str, spec: dict):
        self.grid_folder, self.spec = str(grid_folder), spec

    def __call__(self) -> str:
        return run_select(Grid(Path(self.grid_folder), self.spec))


# ---------------------------------------------------------------------------------------------- building the grid
def _environment(source: dict) -> dict:
    """The environment every job gets: the three nnU-Net folders (checked), nnUNet_extTrainer with our trainers,
    and the nnUNet_*/NNDIFF_* variables (and thread counts) set now; NNDIFF_BASELINE goes only to NNDM jobs."""
    from .environment import ext_trainer_value
    missing = [v for v in REQUIRED_ENV if not source.get(v)]
    if missing:
        raise NNDiffError(f"{', '.join(missing)} not set: every job needs {', '.join(REQUIRED_ENV)} (nnU-Net's "
                          f"documentation/setting_up_paths.md); nothing submitted")
    env = {k: v for k, v in source.items()
           if (k.startswith(PASSED_PREFIXES) or k in PASSED_VARS) and k != BASELINE_ENV}
    for v in REQUIRED_ENV:
        env[v] = os.path.abspath(source[v])
    env["nnUNet_extTrainer"] = ext_trainer_value(source.get("nnUNet_extTrainer", ""))
    return env


def _dataset_name(dataset: str, preprocessed: str) -> str:
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
    from .trainers import HEAD_PREFIXES, TRAINERS
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


def is_nndm(trainer: str) -> bool:
    from .trainers import TRAINERS
    from .trainers.nndm import nnUNetTrainerNNDM
    cls = TRAINERS.get(trainer)
    return cls is not None and issubclass(cls, nnUNetTrainerNNDM)


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
    dataset = _dataset_name(str(args.d), env["nnUNet_preprocessed"])
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
    baseline_trainer = baseline if baseline and os.sep not in baseline and not os.path.exists(baseline) else None
    for t in args.tr:
        for f in folds:
            job = {"trainer": t, "fold": f, "after": None, "env": {}}
            if baseline and is_nndm(t):
                job["env"][BASELINE_ENV] = baseline
                if baseline_trainer:
                    if baseline_trainer in args.tr:
                        job["after"] = [baseline_trainer, f]
                    elif not grid.is_done(baseline_trainer, f) and \
                            not (grid.fold_folder(baseline_trainer, f) / "checkpoint_final.pth").is_file():
                        raise NNDiffError(f"{BASELINE_ENV}={baseline}: fold {f} of {baseline} is neither in this "
                                          f"grid (-tr) nor trained ({grid.fold_folder(baseline_trainer, f)}); "
                                          f"nothing submitted")
            spec["jobs"][job_name(t, f)] = job
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
            grid.spec["jobs"][name]["job_id"] = job["job_id"]
    grid.spec["trainers"] = list(dict.fromkeys(old.get("trainers", []) + grid.spec["trainers"]))
    grid.spec["folds"] = list(dict.fromkeys(old.get("folds", []) + grid.spec["folds"]))


def _ordered(jobs: list[dict]) -> list[dict]:
    """Jobs without a dependency first (their baselines first, fold by fold), then the dependent ones."""
    needed = {tuple(j["after"]) for j in jobs if j.get("after")}
    first = [j for j in jobs if not j.get("after") and (j["trainer"], j["fold"]) in needed]
    rest = [j for j in jobs if not j.get("after") and (j["trainer"], j["fold"]) not in needed]
    return first + rest + [j for j in jobs if j.get("after")]


def pending_jobs(grid: Grid, trainers: list[str], folds: list) -> list[dict]:
    """The requested jobs that are not done, dependency order; a dependency that is done is dropped."""
    out = []
    for t in trainers:
        for f in folds:
            job = grid.spec["jobs"].get(job_name(t, f))
            if job is None or grid.is_done(t, f):
                continue
            job = dict(job)
            if job.get("after") and grid.is_done(*job["after"]):
                job["after"] = None
            out.append(job)
    return _ordered(out)


# ---------------------------------------------------------------------------------------------- local executor
def _visible_gpus() -> list[int]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return [int(x) for x in value.split(",") if x.strip().isdigit()]
    try:
        import torch
        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


def run_local(grid: Grid, jobs: list[dict], select: bool, poll_s: float = 1.0) -> int:
    """Run ``jobs`` through submitit's LocalExecutor, at most ``max_parallel`` at a time, each with its own GPUs
    (visible_gpus) and the grid's timeout; a dependent job starts when its baseline is done."""
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
    running: dict[str, tuple] = {}   # name -> (submitit job or None for a process of an earlier run, gpus)
    failed: set[str] = set()
    free = list(gpus)
    for job in list(waiting):        # a job still training from an earlier driver: wait for it, don't restart it
        name = job_name(job["trainer"], job["fold"])
        st = grid.job_state(name)
        if st.get("state") == "running" and st.get("host") == socket.gethostname() and _pid_alive(st.get("pid")):
            waiting.remove(job)
            running[name] = (None, [], st["pid"], job)
            print(f"nndiff grid: {name} is still running (pid {st['pid']}); waiting for it")
    try:
        while waiting or running:
            for name, (sjob, used, pid, job) in list(running.items()):
                finished = (not _pid_alive(pid)) if sjob is None else sjob.done()
                if not finished:
                    continue
                del running[name]
                free.extend(used)
                ok = grid.is_done(job["trainer"], job["fold"])
                if sjob is not None and not ok:
                    try:
                        sjob.result()
                    except Exception as e:  # noqa: BLE001 - the job's own message
                        print(f"nndiff grid: {name} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
                if not ok:
                    failed.add(name)
                    if grid.job_state(name).get("state") in (None, "running", "queued"):
                        grid.set_job_state(name, state="failed", pid=None,
                                           error="the job ended without finishing (killed?)")
                print(f"nndiff grid: {name} {'done' if ok else 'failed'}")
            for job in list(waiting):
                name = job_name(job["trainer"], job["fold"])
                after = job.get("after")
                if after and job_name(*after) in failed:
                    waiting.remove(job)
                    failed.add(name)
                    grid.set_job_state(name, state="cancelled", error=f"its baseline {job_name(*after)} failed")
                    print(f"nndiff grid: {name} not started: its baseline {job_name(*after)} failed")
                    continue
                if after and not grid.is_done(*after):
                    continue
                if len(running) >= slots or len(free) < per_job:
                    break
                used, free = free[:per_job], free[per_job:]
                # the job file is the job's own once it runs: write "queued" before it can start
                grid.set_job_state(name, state="queued", job_id=None, pid=None)
                executor.update_parameters(timeout_min=spec["timeout_min"], gpus_per_node=per_job,
                                           visible_gpus=tuple(used), signal_delay_s=120)
                sjob = executor.submit(TrainJob(str(grid.folder), spec, job))
                spec["jobs"][name]["job_id"] = f"local:{sjob.job_id}"
                grid.save()
                running[name] = (sjob, used, None, job)
                waiting.remove(job)
                print(f"nndiff grid: {name} started (local job {sjob.job_id}"
                      f"{', GPU ' + ','.join(map(str, used)) if used else ''})")
            if waiting or running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for name, (sjob, *_rest) in running.items():
            if sjob is not None:
                sjob.cancel()
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


# ---------------------------------------------------------------------------------------------- SLURM executor
def slurm_executor(grid: Grid, args, what: str, gpus: int, timeout_min: int, parallel: int = 1,
                   dependency: Optional[str] = None) -> submitit.SlurmExecutor:
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


def _submit_array(ex: submitit.SlurmExecutor, grid: Grid, jobs: list[dict]) -> list:
    with ex.batch():
        out = [ex.submit(TrainJob(str(grid.folder), grid.spec, j)) for j in jobs]
    return out


def run_slurm(grid: Grid, jobs: list[dict], args, select: bool) -> int:
    """Submit: [prepare] -> one array of the independent jobs -> one array per dependent trainer (``aftercorr``
    when its tasks line up with the first tasks of the first array fold by fold, else ``afterok`` on the exact
    tasks) -> [select, afterok on every array]."""
    spec = grid.spec
    if not jobs:
        print("nndiff grid: every job is done")
        if select:
            print(run_select(grid))
        return 0
    deps_all: list[str] = []
    prepare = None
    folder = dataset_data_folder(spec)
    if needs_unpacking(folder) or not (folder.parent / "splits_final.json").exists():
        ex = slurm_executor(grid, args, "prepare", 0, 60)
        prepare = ex.submit(PrepareJob(spec))
        spec["prepare_job_id"] = prepare.job_id
        print(f"nndiff grid: prepare job {prepare.job_id}")
    base_dep = f"afterok:{prepare.job_id}" if prepare else None
    for j in jobs:  # before submission: once a job runs, its state file is its own
        grid.set_job_state(job_name(j["trainer"], j["fold"]), state="queued", job_id=None, pid=None)
    independent = [j for j in jobs if not j.get("after")]
    dependent = [j for j in jobs if j.get("after")]
    ids: dict[str, str] = {}
    arrays: list[str] = []
    if independent:
        ex = slurm_executor(grid, args, spec["dataset"], spec["gpus_per_job"], spec["timeout_min"],
                            args.max_parallel, base_dep)
        sjobs = _submit_array(ex, grid, independent)
        for j, s in zip(independent, sjobs):
            ids[job_name(j["trainer"], j["fold"])] = s.job_id
        arrays.append(sjobs[0].job_id.split("_")[0])
    first_names = [job_name(j["trainer"], j["fold"]) for j in independent]
    for trainer in dict.fromkeys(j["trainer"] for j in dependent):
        group = [j for j in dependent if j["trainer"] == trainer]
        group.sort(key=lambda j: first_names.index(job_name(*j["after"])))
        wanted = [job_name(*j["after"]) for j in group]
        is_array = len(independent) > 1 and len(group) > 1
        if is_array and wanted == first_names[:len(group)]:
            dep = f"aftercorr:{arrays[0]}"
        else:
            dep = "afterok:" + ":".join(ids[w] for w in wanted)
        ex = slurm_executor(grid, args, trainer, spec["gpus_per_job"], spec["timeout_min"], args.max_parallel,
                            ",".join(filter(None, [dep, base_dep])))
        sjobs = _submit_array(ex, grid, group)
        for j, s in zip(group, sjobs):
            ids[job_name(j["trainer"], j["fold"])] = s.job_id
        arrays.append(sjobs[0].job_id.split("_")[0])
    for name, job_id in ids.items():
        spec["jobs"][name]["job_id"] = job_id
    deps_all = arrays
    if select:
        ex = slurm_executor(grid, args, "select", 0, 120, dependency="afterok:" + ":".join(deps_all))
        sel = ex.submit(SelectJob(str(grid.folder), spec))
        spec["select_job_id"] = sel.job_id
        print(f"nndiff grid: select job {sel.job_id} (runs nnUNetv2_find_best_configuration when all succeed)")
    grid.save()
    print(f"nndiff grid: submitted {len(ids)} job(s) in {len(arrays)} array(s): {', '.join(arrays)}; "
          f"'nndiff grid status --grid-dir {grid.folder}' shows them")
    return 0


# ---------------------------------------------------------------------------------------------- status / cancel
def planned_epochs(trainer: str, job_env: dict) -> Optional[int]:
    """The number of epochs a trainer runs (for 'epoch n of N'); None when it cannot be told without building it."""
    try:
        from .trainers import TRAINERS
        cls = TRAINERS.get(trainer)
    except Exception:  # noqa: BLE001
        cls = None
    if cls is not None:
        from .config import total_epochs
        return total_epochs(cls.hparams(), cls.head, from_baseline=bool(job_env.get(BASELINE_ENV)))
    m = re.search(r"_(\d+)epochs?$", trainer)
    if m:
        return int(m.group(1))
    return 1000 if trainer == "nnUNetTrainer" else None


def current_epoch(fold_folder: Path) -> Optional[int]:
    logs = sorted(fold_folder.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    found = re.findall(r"^\S+ \S+: Epoch (\d+)\s*$", logs[-1].read_text(errors="replace"), flags=re.M)
    return int(found[-1]) if found else None


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


def job_status(grid: Grid, job: dict, slurm: Optional[dict] = None) -> tuple[str, str]:
    """(state, detail) of one job: done / running (epoch n of N) / queued / failed / cancelled / not submitted."""
    t, f = job["trainer"], job["fold"]
    name = job_name(t, f)
    if grid.is_done(t, f):
        return "done", ""
    st = grid.job_state(name)
    state = st.get("state")
    if state == "running" and st.get("host") == socket.gethostname() and not _pid_alive(st.get("pid")):
        state = "failed"
        st["error"] = "its process is gone (killed?); re-run the grid to resume it"
    job_id = job.get("job_id") or st.get("job_id")
    slurm = (slurm or {}).get(str(job_id))
    if slurm:
        if slurm in ("PENDING", "REQUEUED", "CONFIGURING"):
            state = "queued"
        elif slurm.startswith(("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) \
                and state != "done":
            state = "failed" if not slurm.startswith("CANCELLED") else "cancelled"
            st.setdefault("error", f"SLURM: {slurm}")
    if state in ("running", "requeued"):
        n, total = current_epoch(grid.fold_folder(t, f)), planned_epochs(t, job.get("env", {}))
        epoch = "starting" if n is None else f"epoch {n + 1}" + (f" of {total}" if total else "")
        return state, f"{epoch} (attempt {st.get('attempts', 1)}, job {job.get('job_id') or st.get('job_id')})"
    if state in ("failed", "cancelled"):
        tail = log_tail(grid.log_file(name))
        return state, " | ".join([st.get("error", f"exit code {st.get('returncode')}")] + tail)
    if state == "queued" or job.get("job_id"):
        after = job.get("after")
        wait = f"; waits for {job_name(*after)}" if after and not grid.is_done(*after) else ""
        return "queued", f"job {job.get('job_id') or st.get('job_id')}{wait}"
    return "not submitted", ""


def status_table(grid: Grid) -> str:
    rows = []
    slurm = slurm_states([j.get("job_id") for j in grid.jobs()])
    for t in grid.spec["trainers"]:
        for f in grid.spec["folds"]:
            job = grid.spec["jobs"].get(job_name(t, f))
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
        name = job_name(job["trainer"], job["fold"])
        if grid.is_done(job["trainer"], job["fold"]):
            continue
        st = grid.job_state(name)
        job_id = job.get("job_id") or st.get("job_id")
        if st.get("state") not in ("queued", "running", "requeued"):
            continue
        if job_id and not str(job_id).startswith("local:"):
            slurm_ids.add(str(job_id))
        elif st.get("state") == "running" and st.get("host") == socket.gethostname() and _pid_alive(st.get("pid")):
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


# ---------------------------------------------------------------------------------------------- model selection
def select_command(grid: Grid) -> list[str]:
    spec = grid.spec
    folds = [f for f in spec["folds"] if f != "all"]
    if not folds:
        raise NNDiffError("model selection needs cross-validation folds (0..4), not only 'all'")
    finished = [t for t in spec["trainers"] if all(grid.is_done(t, f) for f in folds)]
    missing = [job_name(t, f) for t in spec["trainers"] for f in folds if not grid.is_done(t, f)]
    if not finished:
        raise NNDiffError(f"no trainer has all folds {folds} done (missing: {', '.join(missing)}); nothing selected")
    cmd = [nnunet_script("nnUNetv2_find_best_configuration"), spec["dataset"], "-c", spec["configuration"],
           "-p", spec["plans"], "-tr", *finished, "-f", *map(str, folds),
           "-np", str(spec["env"].get("nnUNet_def_n_proc", 4))]
    if not spec.get("npz") or len(finished) < 2:
        cmd.append("--disable_ensembling")
    return cmd


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


# ---------------------------------------------------------------------------------------------- CLI
ACTIONS = ("run", "status", "cancel", "select")


def register(sub) -> None:
    p = sub.add_parser(
        "grid", help="train every (trainer, fold) as its own job (SLURM array via submitit, or locally), resumable, "
                     "then nnUNetv2_find_best_configuration",
        description="ACTION is run (default), status, cancel or select. 'run' trains the missing (trainer, fold) "
                    "pairs (finished ones are skipped, unfinished ones continue with --c); NNDM trainers with "
                    "NNDIFF_BASELINE=<trainer> wait for that fold of the baseline.",
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
    dataset = _dataset_name(str(args.d), os.environ["nnUNet_preprocessed"])
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
