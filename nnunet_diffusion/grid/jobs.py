"""The grid's job model, at the bottom of the ``grid`` package (it imports no other module of it).

* :class:`FoldRef`: one (trainer, fold) of a grid; what a job trains and what a dependent job waits for.
* :class:`FoldJob`: one training job: its (trainer, fold), the jobs it waits for, the environment it adds to the
  grid's, and its job id once submitted. Written to ``grid.json`` as ``{"trainer", "fold", "after": [[trainer,
  fold], ...], "env": {...}, "job_id"}`` (``job_id`` only once submitted); :meth:`FoldJob.from_json` reads it back
  (and the ``"after": [trainer, fold]`` or ``null`` of a grid.json written before a job could wait for several) and
  refuses a bad value with the file, the job and the key.
* :class:`SelectionStep`: the model selection (and ensembling) step after the trainings: nnU-Net's
  ``nnUNetv2_find_best_configuration`` over the trainers whose requested folds are all done.
* :class:`Grid`: a grid folder: ``grid.json`` (dataset, configuration, plans, trainers, folds, environment, jobs,
  job ids) and the state file each job writes (``jobs/<trainer>__fold_<f>.json``), written atomically; logs in
  ``logs/``. ``grid.json`` stays the plain JSON document it is on disk (``Grid.spec``); its jobs are read and
  written through :class:`FoldJob`.
* :func:`pending_jobs`: the jobs still to run, in dependency order.
* :func:`head_specific_job`: the grid's only branch on a head (a head with a ``baseline_stage`` in the registry,
  NNDM, waits for its baseline: the same fold, or every fold when it learns from the baseline's out-of-fold
  predictions).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Union

from ..atomic import write_json_atomic
from ..errors import NNDiffError
from ..variables import BASELINE as BASELINE_ENV

GRID_FILE = "grid.json"
JOB_KEYS = ("trainer", "fold", "after", "env", "job_id")
DEFAULT_NUM_FOLDS = 5  # nnU-Net's 5-fold split (PrepareJob writes it when splits_final.json is missing)

Fold = Union[int, str]   # a cross-validation fold 0..n-1, or "all"


def read_json(path: Path, default=None):
    """The JSON content of ``path``, or ``default`` when the file is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def job_name(trainer: str, fold) -> str:
    """``<trainer>__fold_<fold>``: the name of a job, of its state file and of its log."""
    return f"{trainer}__fold_{fold}"


def baselines_text(names: list[str], singular: str, plural: str) -> str:
    """``its baseline <name> <singular>`` or ``its baselines <a>, <b> <plural>``: what a job waits for, in
    messages."""
    if len(names) == 1:
        return f"its baseline {names[0]} {singular}"
    return f"its baselines {', '.join(names)} {plural}"


def _check_trainer_fold(trainer, fold) -> None:
    if not isinstance(trainer, str) or not trainer:
        raise NNDiffError(f"trainer {trainer!r} is not a trainer name (a non-empty string)")
    if not (fold == "all" or (isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0)):
        raise NNDiffError(f"fold {fold!r} of {trainer} is not a fold (0, 1, ... or 'all')")


@dataclass(frozen=True)
class FoldRef:
    """One (trainer, fold) of a grid: what a job trains, and what a dependent job waits for. Written to
    ``grid.json`` as ``[trainer, fold]``."""
    trainer: str
    fold: Fold

    def __post_init__(self):
        _check_trainer_fold(self.trainer, self.fold)

    @property
    def name(self) -> str:
        return job_name(self.trainer, self.fold)

    def to_json(self) -> list:
        return [self.trainer, self.fold]

    @classmethod
    def from_json(cls, value, where: str = "") -> "FoldRef":
        """``[trainer, fold]`` as written by :meth:`to_json`; ``where`` (file and key) prefixes the error."""
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise NNDiffError(f"{where}{value!r} is not a [trainer, fold] pair")
        try:
            return cls(*value)
        except NNDiffError as e:
            raise NNDiffError(f"{where}{e}") from None


def refs_from_json(value, where: str = "") -> tuple:
    """The ``after`` of a job in ``grid.json``: a list of ``[trainer, fold]`` pairs (``[]``: none); also what a
    grid.json written before a job could wait for several holds: one ``[trainer, fold]`` pair, or ``null``."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (list, tuple)):
        return (FoldRef.from_json(value, where),)      # one pair: a grid.json of an earlier version
    if not isinstance(value, (list, tuple)):
        raise NNDiffError(f"{where}{value!r} is not a [trainer, fold] pair or a list of them")
    return tuple(FoldRef.from_json(v, where) for v in value)


def _as_refs(after, name: str) -> tuple:
    """``after`` as a tuple of FoldRefs, duplicates dropped (None and a lone FoldRef are accepted)."""
    if after is None:
        return ()
    if isinstance(after, FoldRef):
        return (after,)
    if isinstance(after, (list, tuple)) and all(isinstance(a, FoldRef) for a in after):
        return tuple(dict.fromkeys(after))
    raise NNDiffError(f"{name}: 'after' must be FoldRefs (a tuple of them, one, or None), not {after!r}")


@dataclass(frozen=True)
class FoldJob:
    """One training job of the grid: nnU-Net's ``nnUNetv2_train`` on (``trainer``, ``fold``).

    ``after``: the (trainer, fold)s that must all be done before this job starts, a tuple of :class:`FoldRef`
    (empty: none; one FoldRef or None is accepted and made a tuple). ``env``: the variables this job adds to the
    grid's environment, as sorted (name, value) pairs (a mapping is accepted and sorted). ``job_id``: the SLURM job
    id (``123`` or ``123_4``) or ``local:<id>`` once submitted, else None."""
    trainer: str
    fold: Fold
    after: tuple = ()
    env: tuple = field(default_factory=tuple)
    job_id: Optional[str] = None

    def __post_init__(self):
        _check_trainer_fold(self.trainer, self.fold)
        object.__setattr__(self, "after", _as_refs(self.after, self.name))
        if self.ref in self.after:
            raise NNDiffError(f"{self.name}: a job cannot wait for itself")
        env = self.env.items() if isinstance(self.env, Mapping) else self.env
        try:
            pairs = tuple(sorted((k, v) for k, v in env))
        except (TypeError, ValueError):
            raise NNDiffError(f"{self.name}: 'env' must map variable names to values, not {self.env!r}") from None
        for k, v in pairs:
            if not (isinstance(k, str) and k and isinstance(v, str)):
                raise NNDiffError(f"{self.name}: env {k!r}={v!r}: names and values must be strings")
        object.__setattr__(self, "env", pairs)
        if self.job_id is not None and not (isinstance(self.job_id, str) and self.job_id):
            raise NNDiffError(f"{self.name}: job_id {self.job_id!r} is not a job id (a non-empty string)")

    def __setstate__(self, state: dict) -> None:
        """Unpickling (submitit's pickled jobs): a job pickled when ``after`` was one FoldRef or None (a SLURM job
        requeued across the upgrade) gets its tuple."""
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "after", _as_refs(getattr(self, "after", None), self.name))

    @property
    def ref(self) -> FoldRef:
        return FoldRef(self.trainer, self.fold)

    @property
    def name(self) -> str:
        return job_name(self.trainer, self.fold)

    def environment(self) -> dict:
        """The variables this job adds to the grid's environment."""
        return dict(self.env)

    def to_json(self) -> dict:
        """The job as ``grid.json`` holds it (``job_id`` only once submitted)."""
        out = {"trainer": self.trainer, "fold": self.fold, "after": [a.to_json() for a in self.after],
               "env": self.environment()}
        if self.job_id is not None:
            out["job_id"] = self.job_id
        return out

    @classmethod
    def from_json(cls, value, where: str = "") -> "FoldJob":
        """A job as :meth:`to_json` writes it (``after``, ``env`` and ``job_id`` may be missing; ``after`` may be
        an earlier version's one ``[trainer, fold]`` pair or ``null``); ``where`` (the file and the job's key)
        prefixes the error, which names the key at fault."""
        if not isinstance(value, Mapping):
            raise NNDiffError(f"{where}a job must be a JSON object, not {value!r}")
        unknown = sorted(set(value) - set(JOB_KEYS))
        if unknown:
            raise NNDiffError(f"{where}unknown key(s) {', '.join(map(repr, unknown))} (a job has "
                              f"{', '.join(JOB_KEYS)})")
        missing = [k for k in ("trainer", "fold") if k not in value]
        if missing:
            raise NNDiffError(f"{where}key(s) {', '.join(map(repr, missing))} missing")
        try:
            return cls(value["trainer"], value["fold"], refs_from_json(value.get("after"), "after: "),
                       value.get("env") or {}, value.get("job_id"))
        except NNDiffError as e:
            raise NNDiffError(f"{where}{e}") from None


@dataclass(frozen=True)
class SelectionStep:
    """The model selection after the trainings: nnU-Net's ``nnUNetv2_find_best_configuration`` over ``trainers``
    (those whose cross-validation folds ``folds`` are all done), ensembling pairs of them when ``ensemble`` (the
    validation ``.npz`` files were asked for and there are two trainers or more)."""
    dataset: str
    configuration: str
    plans: str
    trainers: tuple
    folds: tuple
    n_proc: str
    ensemble: bool

    @classmethod
    def of(cls, grid: "Grid") -> "SelectionStep":
        """The step over the grid's finished trainers; an error when there is nothing to select from."""
        spec = grid.spec
        folds = [f for f in spec["folds"] if f != "all"]
        if not folds:
            raise NNDiffError("model selection needs cross-validation folds (0..4), not only 'all'")
        finished = [t for t in spec["trainers"] if all(grid.is_done(t, f) for f in folds)]
        missing = [job_name(t, f) for t in spec["trainers"] for f in folds if not grid.is_done(t, f)]
        if not finished:
            raise NNDiffError(f"no trainer has all folds {folds} done (missing: {', '.join(missing)}); "
                              f"nothing selected")
        return cls(spec["dataset"], spec["configuration"], spec["plans"], tuple(finished), tuple(folds),
                   str(spec["env"].get("nnUNet_def_n_proc", 4)), bool(spec.get("npz")) and len(finished) >= 2)

    def command(self, script: str) -> list[str]:
        """The command line, ``script`` being the path of ``nnUNetv2_find_best_configuration``."""
        cmd = [script, self.dataset, "-c", self.configuration, "-p", self.plans, "-tr", *self.trainers,
               "-f", *map(str, self.folds), "-np", self.n_proc]
        if not self.ensemble:
            cmd.append("--disable_ensembling")
        return cmd


# ---------------------------------------------------------------------------------------------- the grid folder
class Grid:
    """A grid folder: ``grid.json`` (dataset, configuration, plans, trainers, folds, environment, jobs, job ids) and
    the per-job state files. All paths derive from the environment stored in it, not from this process's.

    ``spec`` is ``grid.json``'s document as it is on disk; its jobs are read with :meth:`job`/:meth:`jobs` and
    written with :meth:`add_job`/:meth:`set_job_id`."""

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

    def num_folds(self) -> int:
        """The number of cross-validation folds: those of the dataset's ``splits_final.json``, else nnU-Net's 5 (the
        split :class:`~.tasks.PrepareJob` writes)."""
        pre = self.env.get("nnUNet_preprocessed")
        splits = read_json(Path(pre) / self.spec["dataset"] / "splits_final.json") if pre else None
        return len(splits) if isinstance(splits, list) and splits else DEFAULT_NUM_FOLDS

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
        """The state file a job writes (state, pid, host, job_id, attempts, command, error, ...); {} if none."""
        return read_json(self.job_file(name), {}) or {}

    def set_job_state(self, name: str, **fields) -> dict:
        state = self.job_state(name)
        state.update(fields, updated=time.time())
        write_json_atomic(self.job_file(name), state)
        return state

    # -- the jobs of grid.json
    def job(self, name: str) -> Optional[FoldJob]:
        """The job ``name`` of ``grid.json`` (None when the grid has no such job)."""
        value = self.spec["jobs"].get(name)
        if value is None:
            return None
        job = FoldJob.from_json(value, f"{self.folder / GRID_FILE}: job {name}: ")
        if job.name != name:
            raise NNDiffError(f"{self.folder / GRID_FILE}: job {name} holds the job of {job.name}")
        return job

    def jobs(self) -> list[FoldJob]:
        return [self.job(name) for name in self.spec["jobs"]]

    def add_job(self, job: FoldJob) -> None:
        self.spec["jobs"][job.name] = job.to_json()

    def set_job_id(self, name: str, job_id: str) -> None:
        self.spec["jobs"][name]["job_id"] = job_id

    # -- what is finished
    def is_done(self, trainer: str, fold) -> bool:
        d = self.fold_folder(trainer, fold)
        if not ((d / "checkpoint_final.pth").is_file() and (d / "validation" / "summary.json").is_file()):
            return False
        return not self.spec.get("npz") or any((d / "validation").glob("*.npz"))


# ---------------------------------------------------------------------------------------------- dependencies
def ordered(jobs: list[FoldJob]) -> list[FoldJob]:
    """Jobs without a dependency first (those another job waits for first, in their given order), then the
    dependent ones."""
    needed = {a for j in jobs for a in j.after}
    first = [j for j in jobs if not j.after and j.ref in needed]
    rest = [j for j in jobs if not j.after and j.ref not in needed]
    return first + rest + [j for j in jobs if j.after]


def pending_jobs(grid: Grid, trainers: list[str], folds: list) -> list[FoldJob]:
    """The requested jobs that are not done, dependency order; the dependencies that are done are dropped."""
    out = []
    for t in trainers:
        for f in folds:
            job = grid.job(job_name(t, f))
            if job is None or grid.is_done(t, f):
                continue
            after = tuple(a for a in job.after if not grid.is_done(a.trainer, a.fold))
            if after != job.after:
                job = replace(job, after=after)
            out.append(job)
    return ordered(out)


# ---------------------------------------------------------------------------------------------- head-specific
HEAD_SPECIFIC_ENV = (BASELINE_ENV,)   # given to the jobs head_specific_job chooses, never to every job


OUT_OF_FOLD_SOURCES = ("oof", "auto")  # NNDM's residual sources that read the baseline's out-of-fold predictions


def head_specific_job(job: FoldJob, baseline: str, trainers: list[str], grid: Grid) -> FoldJob:
    """HEAD-SPECIFIC: the grid's only branch on a head, through the registry: a trainer of a head whose first stage
    is a whole nnU-Net (``registry.Head.baseline_stage``: NNDM) started with ``NNDIFF_BASELINE=<baseline>``
    (``baseline``, '' when unset) gets that variable in its job's environment. When the baseline is a trainer name
    (not a path to a checkpoint or model folder), the job waits for the baseline's folds it needs that this grid
    trains (``trainers``, the grid's folds); the others must be trained already (``checkpoint_final.pth``), else a
    one-line error naming their folders, nothing submitted. Any other job is returned as it is.

    Which folds it needs follows the trainer's spec (``residual_source``, read from the class, no trainer built):

    * ``"oof"``: the refiner of fold f learns e = y - ŷ with ŷ the baseline's out-of-fold prediction of each of its
      training cases, made by the fold model that held that case out (``trainers/out_of_fold.py``): every fold of
      the baseline (0..n-1, n from ``splits_final.json``, else nnU-Net's 5), and fold ``all`` too for a job of fold
      ``all`` (its backbone starts from the baseline's same fold).
    * ``"auto"``: the trainer uses ``"oof"`` when every fold of the baseline is trained as it starts, else
      ``"backbone"`` (``trainers/nndm.py``, ``_choose_residual_source``). When every fold is in this grid or trained,
      the job waits for all of them, so that the choice is ``"oof"`` and does not depend on which folds happen to be
      finished when it starts; otherwise it resolves to ``"backbone"`` and the job waits as below.
    * ``"backbone"``/``"dropout"`` (and "auto" without every fold): the baseline's same fold, whose checkpoint the
      backbone starts from."""
    if not baseline:
        return job
    from ..registry import head
    from ..trainers import TRAINERS
    cls = TRAINERS.get(job.trainer)
    if cls is None or not head(cls.head).baseline_stage:
        return job
    job = replace(job, env={**job.environment(), BASELINE_ENV: baseline})
    if os.sep in baseline or os.path.exists(baseline):
        return job
    in_grid = list(grid.spec.get("folds", [job.fold])) if baseline in trainers else []

    def trained(fold) -> bool:
        return grid.is_done(baseline, fold) or (grid.fold_folder(baseline, fold) / "checkpoint_final.pth").is_file()

    source = getattr(cls.hparams(), "residual_source", None)
    if source in OUT_OF_FOLD_SOURCES:
        needed = list(range(grid.num_folds())) + ([job.fold] if job.fold == "all" else [])
        missing = [g for g in needed if g not in in_grid and not trained(g)]
        if not missing:
            return replace(job, after=tuple(FoldRef(baseline, g) for g in needed if g in in_grid))
        if source == "oof":
            s = grid.spec
            folders = ", ".join(str(grid.fold_folder(baseline, g)) for g in missing)
            raise NNDiffError(
                f"{BASELINE_ENV}={baseline}: {job.name} learns from the out-of-fold predictions of every fold of "
                f"{baseline} (residual_source \"oof\"), but fold(s) {' '.join(map(str, missing))} are neither in this "
                f"grid nor trained ({folders}): add them to this grid (-tr {baseline} -f "
                f"{' '.join(map(str, needed))}) or train each first with `nnUNetv2_train {s['dataset']} "
                f"{s['configuration']} FOLD -tr {baseline} -p {s['plans']} --npz`; nothing submitted")
    if baseline in trainers:
        return replace(job, after=FoldRef(baseline, job.fold))
    if not trained(job.fold):
        raise NNDiffError(f"{BASELINE_ENV}={baseline}: fold {job.fold} of {baseline} is neither in this grid (-tr) "
                          f"nor trained ({grid.fold_folder(baseline, job.fold)}); nothing submitted")
    return job
