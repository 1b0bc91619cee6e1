"""``nndiff grid``: every (trainer, fold) of a dataset trained as its own job, on a SLURM cluster (one job array,
through submitit) or on this machine (submitit's local executor), resumable, then nnU-Net's own model selection.

Each job runs nnU-Net's own ``nnUNetv2_train <dataset> <configuration> <fold> -tr <trainer> --npz`` with an
environment given explicitly (nnUNet_raw, nnUNet_preprocessed, nnUNet_results, nnUNet_extTrainer and the
``nnUNet_*``/``NNDIFF_*`` variables set at submission). What the grid adds, and nothing more:

* order: a job of an NNDM trainer with ``NNDIFF_BASELINE=<trainer>`` waits for that fold of the baseline, or for
  all its folds when its refiner learns from the baseline's out-of-fold predictions
  (:func:`~.jobs.head_specific_job`) (SLURM: ``aftercorr`` between two arrays whose tasks line up fold by fold,
  else ``afterok`` on the exact tasks; locally the same order). A short preparation step runs first: it unpacks
  npz-preprocessed data (nnU-Net's advice for folds trained in parallel; a no-op for nnU-Net 2.8's blosc2 data) and
  writes nnU-Net's own seeded 5-fold ``splits_final.json`` once, so parallel folds do not race to write it.
* resuming: a job is done when its fold has ``checkpoint_final.pth`` and ``validation/summary.json`` (and the
  validation ``.npz`` files when they are asked for); done jobs are never re-run. A job with a checkpoint continues
  with nnU-Net's ``--c``; one whose training finished but whose validation did not runs ``--val``. On SLURM a job
  that times out or is preempted is requeued by submitit (:class:`TrainJob` is a ``submitit.helpers.
  Checkpointable`` whose ``checkpoint()`` resubmits it with ``--c``).
* state: ``<grid folder>/grid.json`` (the grid and its job ids) and ``<grid folder>/jobs/<trainer>__fold_<f>.json``
  (written by each job), all written atomically; logs in ``<grid folder>/logs/``.
* selection: ``nnUNetv2_find_best_configuration`` over the trainers whose requested folds are all done
  (``inference_instructions.txt`` in ``$nnUNet_results/<dataset>/``).

The modules, each importing only those listed before it (no circle):

* :mod:`.jobs`: the job model (:class:`FoldRef`, :class:`FoldJob`, :class:`SelectionStep`), the grid folder
  (:class:`Grid`), the dependency order (:func:`pending_jobs`), and the one head-specific branch
  (:func:`~.jobs.head_specific_job`);
* :mod:`.process`: operating-system process handling (nnU-Net's console scripts, ``prctl``, ``/proc``, stopping a
  child, log tails);
* :mod:`.tasks`: what a job runs on either executor (:class:`TrainJob`, :class:`PrepareJob`, :class:`SelectJob`);
* :mod:`.build`: the checks and the grid described from the command line;
* :mod:`.local`: the local executor (submitit's LocalExecutor, driven from the foreground);
* :mod:`.slurm`: the SLURM executor (submitit's SlurmExecutor, job arrays and dependencies; squeue/sacct);
* :mod:`.status`: ``nndiff grid status`` and ``cancel``;
* :mod:`.command`: the ``nndiff grid`` command line.

This module re-exports their public names (``from nnunet_diffusion.grid import ...`` as before the split).
"""
from __future__ import annotations

from ..variables import BASELINE as BASELINE_ENV
from .build import PASSED_PREFIXES, PASSED_VARS, REQUIRED_ENV, SLURM_ONLY, build_grid, check_trainer, dataset_name, \
    merge_previous
from .command import ACTIONS, cmd_grid, register
from .jobs import GRID_FILE, FoldJob, FoldRef, Grid, SelectionStep, head_specific_job, job_name, ordered, \
    pending_jobs, read_json
from .local import run_local
from .process import LOG_TAIL, log_tail, nnunet_script, pid_alive
from .slurm import run_slurm, slurm_executor, slurm_states
from .status import cancel, current_epoch, job_status, planned_epochs, status_table
from .tasks import PrepareJob, SelectJob, TrainJob, configuration, dataset_data_folder, needs_unpacking, \
    run_select, select_command

__all__ = [
    "ACTIONS", "BASELINE_ENV", "GRID_FILE", "LOG_TAIL", "PASSED_PREFIXES", "PASSED_VARS", "REQUIRED_ENV", "SLURM_ONLY",
    "FoldJob", "FoldRef", "Grid", "PrepareJob", "SelectJob", "SelectionStep", "TrainJob",
    "build_grid", "cancel", "check_trainer", "cmd_grid", "configuration", "current_epoch", "dataset_data_folder",
    "dataset_name", "head_specific_job", "job_name", "job_status", "log_tail", "merge_previous", "needs_unpacking",
    "nnunet_script", "ordered", "pending_jobs", "pid_alive", "planned_epochs", "read_json", "register", "run_local",
    "run_select", "run_slurm", "select_command", "slurm_executor", "slurm_states", "status_table",
]
