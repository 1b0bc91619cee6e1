"""``nndiff demo`` (``make demo``): the whole road a BraTS user takes, on semi-synthetic phantoms, through
nnU-Net's own console scripts, in about 10 minutes on 2 CPU cores.

1. phantoms in the BraTS 2021 organisers' layout (training folder with labels, validation folder without)
2. nndiff convert-brats → Dataset501_BraTS2021 in $nnUNet_raw
3. nnUNetv2_plan_and_preprocess
4. nnUNetv2_train fold 0: stock nnUNetTrainer_<v> and nnUNetTrainerNNDM_<v> (its whole schedule, nnU-Net stage
   included), at the same number of optimiser steps; ``--all-heads`` adds MedSegDiff, ReCoSeg, MoDiff (on the
   single-rater BraTS regions) and DDMD, at that budget too
5. nnUNetv2_predict of fold 0's validation cases with NNDM's refinement off (and, with ``--all-heads``, ReCoSeg
   with T1ce or FLAIR missing)
6. nndiff compare on fold 0's validation cases: legacy and BraTS 2023 lesion-wise metrics, one picture per case
   with a panel per trainer
7. nnUNetv2_predict of the BraTS validation cases with NNDM, back to BraTS labels and names (with ``--all-heads``
   also ReCoSeg's residual maps of those cases)

Every comparison it prints is at equal budget: the trainers' ``[variants.<v>]`` must give the same optimiser steps
(checked before training), and the trained checkpoints must show them (checked before the table; the table names
each row's steps and wall time). Every step's full output goes to <workdir>/logs/; the terminal shows a progress
bar per step. Re-running reuses finished steps and resumes an interrupted training (``--fresh`` starts over).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .atomic import write_text_atomic
from . import registry
from .budget import planned_budget
from .environment import BIN, run_logged as _run, train_fold, workdir_environment
from .errors import NNDiffError

DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_BraTS2021"
# the phantoms the demo trains on (10 training + 2 validation cases); benchmarks.heldout draws more like them
PHANTOMS = {"edition": "2021", "seed": 0, "spacing": 4, "crop": "brain"}


def demo_heads(all_heads: bool) -> tuple[tuple[str, str], ...]:
    """(head, trainer class) of every head the demo trains: the registry's ``demo_default`` ones, or all."""
    return tuple((h.name, h.trainer) for h in registry.HEADS if all_heads or h.demo_default)


def fold0(results: Path, trainer: str) -> Path:
    """Fold 0's output folder of ``trainer`` (3d_fullres, nnU-Net's default plans) in the dataset's results."""
    return results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


def trained_budgets(results: Path, trainers: dict) -> dict:
    """{trainer: Budget} read from each final checkpoint; unequal steps are an error (the comparison would be
    unfair)."""
    from .budget import training_budget
    budgets = {t: training_budget(fold0(results, t) / "checkpoint_final.pth") for t in trainers.values()}
    if len({b.steps for b in budgets.values()}) != 1:
        raise NNDiffError("the trained demo models took unequal optimiser steps ("
                          + ", ".join(f"{t}: {b.steps}" for t, b in budgets.items())
                          + "); delete their folders or run with --fresh")
    return budgets


def prepare_dataset(workdir: Path, env: dict, timings: dict | None = None) -> None:
    """The demo's steps 1-3 in ``workdir`` (``env``: its :func:`workdir_environment`), each skipped when done:
    phantoms in the BraTS 2021 layout, ``nndiff convert-brats``, ``nnUNetv2_plan_and_preprocess``. The seconds of
    the steps that ran go into ``timings``."""
    from .dataset_conversion.brats import convert_brats
    from .dataset_conversion.phantoms import make_phantoms
    timings = {} if timings is None else timings
    raw = Path(env["nnUNet_raw"]) / DATASET
    brats = workdir / "BraTS2021_download"
    if not (brats / "done").is_file():
        t0 = time.time()
        print("[1/7] semi-synthetic BraTS 2021 phantoms (MNI152 anatomy, 4 mm): 10 training + 2 validation cases")
        folders = make_phantoms(brats, n=10, n_val=2, overwrite=True, **PHANTOMS)
        write_text_atomic(brats / "done", json.dumps({k: str(v) for k, v in folders.items()}))
        timings["phantoms"] = time.time() - t0
    folders = json.loads((brats / "done").read_text())
    if not (raw / "dataset.json").is_file():
        print(f"[2/7] nndiff convert-brats → {raw}")
        res = convert_brats([folders["training"], folders["validation"]], "2021", raw_root=env["nnUNet_raw"],
                            dataset_id=DATASET_ID, overwrite=True)
        print(f"      {res.num_training} training cases (imagesTr/labelsTr), {res.num_test} validation (imagesTs)")
    if not (Path(env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json").is_file():
        timings["plan_and_preprocess"] = _run(
            [BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", "1", "-np", "1",
             "--verify_dataset_integrity"], env, workdir / "logs" / "plan_and_preprocess.log",
            "[3/7] nnUNetv2_plan_and_preprocess")


def run_demo(workdir: Path, fresh: bool = False, variant: str = "demo", all_heads: bool = False) -> int:
    from . import config
    from .dataset_conversion.brats import convert_predictions_to_brats
    t_start = time.time()
    heads = demo_heads(all_heads)
    steps = planned_budget(variant, heads)  # also: an unknown variant is a clear error now, not after minutes
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    env = workdir_environment(workdir)
    logs, results = workdir / "logs", Path(env["nnUNet_results"]) / DATASET
    raw = Path(env["nnUNet_raw"]) / DATASET
    trainers = {head: f"{cls}_{variant}" for head, cls in heads}
    timings = {}
    print(f"nndiff demo in {workdir} (logs in {logs}); {len(trainers)} trainers, {steps} optimiser steps each")

    prepare_dataset(workdir, env, timings)
    for head, trainer in trainers.items():
        seconds = train_fold(DATASET_ID, "3d_fullres", 0, trainer, fold0(results, trainer), env,
                             logs / f"train_{trainer}.log", "[4/7]",
                             config.spec(head, variant).total_epochs)
        if seconds is not None:
            timings[f"train {trainer}"] = seconds
    budgets = trained_budgets(results, trainers)

    # more "methods" for the table, predicted on the same validation cases: NNDM with its refinement off, ReCoSeg
    # with a modality missing (channel 1 = T1ce, 3 = FLAIR in nnU-Net's BraTS order)
    split = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())[0]
    entries = [registry.head(h) for h in trainers]
    extra_methods = {}
    for h in entries:
        t = trainers[h.name]
        if h.refinement_toggle:
            extra_methods[f"{t}_refine_off"] = (t, {"NNDIFF_REFINE": "0"})
        if h.missing_channels:
            extra_methods.update({f"{t}_missing_T1ce": (t, {"NNDIFF_MISSING": "1"}),
                                  f"{t}_missing_FLAIR": (t, {"NNDIFF_MISSING": "3"})})
    submitting = next(h for h in entries if h.demo_submission)
    submitter = trainers[submitting.name]
    residual_maps = [trainers[h.name] for h in entries if h.residual_maps]

    def up_to_date(path: Path, trainer: str) -> bool:
        """``path`` exists and was written after ``trainer``'s final checkpoint (a retrained model redoes it)."""
        ckpt = fold0(results, trainer) / "checkpoint_final.pth"
        return path.exists() and path.stat().st_mtime >= ckpt.stat().st_mtime

    for name, (trainer, extra_env) in extra_methods.items():
        folder = results / f"{name}__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
        if up_to_date(folder, trainer):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        inputs = workdir / "validation_inputs"
        shutil.rmtree(inputs, ignore_errors=True)
        inputs.mkdir()
        for case in split["val"]:
            for f in (raw / "imagesTr").glob(f"{case}_*.nii.gz"):
                shutil.copy(f, inputs / f.name)
        tmp = folder.with_name("validation.partial")
        setting = " ".join(f"{k}={v}" for k, v in extra_env.items())
        timings[f"predict {name}"] = _run(
            [BIN / "nnUNetv2_predict", "-i", inputs, "-o", tmp, "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0",
             "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], dict(env, **extra_env),
            logs / f"predict_{name}.log", f"[5/7] nnUNetv2_predict {trainer}, {setting} (validation cases)")
        tmp.rename(folder)
    compare_dir = workdir / "compare"
    timings["compare"] = _run(
        [BIN / "nndiff", "compare", "-d", DATASET_ID, "-tr", *trainers.values(), *extra_methods, "-f", "0",
         "--baseline", trainers["nnunet"], "-o", compare_dir, "-np", "1", "--no-progress"], env,
        logs / "compare.log", "[6/7] nndiff compare (fold 0 validation cases, legacy and lesion-wise)")

    submission = workdir / "BraTS2021_submission"
    pred = workdir / "predictions_validation"
    if not up_to_date(submission, submitter):
        shutil.rmtree(submission, ignore_errors=True)
        shutil.rmtree(pred, ignore_errors=True)
        timings["predict BraTS validation"] = _run(
            [BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", pred, "-d", DATASET_ID, "-c", "3d_fullres",
             "-f", "0", "-tr", submitter, "-device", "cpu", "-npp", "1", "-nps", "1"], env,
            logs / "predict_validation.log", f"[7/7] nnUNetv2_predict {submitting.title} (BraTS validation cases)")
        convert_predictions_to_brats(pred, submission, "2021", progress=False)
    recoseg_pred = workdir / "predictions_validation_recoseg"
    for t in residual_maps:
        if up_to_date(recoseg_pred / "residuals", t):
            continue
        shutil.rmtree(recoseg_pred, ignore_errors=True)
        timings["predict BraTS validation, ReCoSeg with residual maps"] = _run(
            [BIN / "nndiff", "predict", "--residuals", "-i", raw / "imagesTs", "-o", recoseg_pred, "-d", DATASET_ID,
             "-c", "3d_fullres", "-f", "0", "-tr", t, "-device", "cpu", "-npp", "1", "-nps", "1"],
            env, logs / "predict_validation_recoseg.log",
            "[7/7] nndiff predict --residuals ReCoSeg (BraTS validation cases)")

    summary = json.loads((compare_dir / "summary.json").read_text())
    method_trainer = {**{t: t for t in trainers.values()}, **{m: t for m, (t, _) in extra_methods.items()}}
    print()
    for line in comparison_table(summary, method_trainer, budgets):
        print(line)
    total = time.time() - t_start
    for k, v in timings.items():
        print(f"  time {k}: {v:.0f} s")
    print(f"  time, whole demo (this run): {total / 60:.1f} min")
    figures = sorted((compare_dir / "figures").glob("case_*.png")) if (compare_dir / "figures").is_dir() else []
    print("\nWhere the outputs are:")
    print(f"  table (legacy and lesion-wise, paired tests): {compare_dir / 'table.md'}   <- open this first")
    if figures:
        print(f"  one picture per drawn case, a panel per trainer: {figures[0]}"
              + (f" (+{len(figures) - 1} more in {figures[0].parent})" if len(figures) > 1 else ""))
    print(f"  box plots and per-case/per-lesion CSVs: {compare_dir}")
    print(f"  NIfTI predictions of fold 0's validation cases: {results}/<trainer>__nnUNetPlans__3d_fullres/fold_0/"
          "validation")
    print(f"  {submitting.title}'s predictions of the BraTS validation cases (nnU-Net labels): {pred}")
    print(f"  the same in BraTS format (labels 1, 2, 4, BraTS names), ready to submit: {submission}")
    if residual_maps:
        print(f"  ReCoSeg residual maps |synthetic T1ce - T1ce| (NIfTI and PNG): {recoseg_pred / 'residuals'}")
    for h in entries:
        if h.refinement_toggle:
            print(refiner_source_line(fold0(results, trainers[h.name]) / "checkpoint_final.pth", trainers[h.name]))
    print("Semi-synthetic and trained for minutes: this shows the road works, not what the heads achieve on BraTS; "
          "the equal-budget comparison on held-out cases is `make table`.")
    write_text_atomic(workdir / "demo_results.json", json.dumps(
        {"seconds": timings, "total_seconds": total, "variant": variant, "all_heads": all_heads,
         "budgets": {t: {"steps": b.steps, "seconds": b.seconds} for t, b in budgets.items()}}, indent=2))
    return 0


SOURCE_WHY = {
    "backbone": "its backbone's own output on its training patches (in-sample): the out-of-fold source needs a stock "
                "nnU-Net trained on all five folds (NNDIFF_BASELINE), five more trainings than the demo's 10 minutes "
                "allow; `make table`'s refiner section compares the sources on top of a plateaued nnU-Net",
    "dropout": "its frozen backbone's output under feature dropout",
    "oof": "a trained nnU-Net's out-of-fold predictions of its training cases (NNDIFF_BASELINE's five folds)",
}


def refiner_source_line(checkpoint: Path, trainer: str) -> str:
    """Which residual source the refiner of ``trainer`` trained on, from its final checkpoint (issue 32: the demo
    says which)."""
    import torch
    recorded = torch.load(checkpoint, map_location="cpu", weights_only=False).get("trainer_config") or {}
    source = recorded.get("residual_source_used", "?")
    return f"  {trainer}'s refiner trained on residuals e = y - y_hat from {SOURCE_WHY.get(source, source)}."


def comparison_table(summary: dict, method_trainer: dict, budgets: dict) -> list[str]:
    """The demo's table: one row per compared method with the optimiser steps and training wall time of the
    trainer behind it, Dice (%) per region, legacy beside BraTS 2023 lesion-wise, then one plain sentence per
    diffusion method saying where it is above or below stock nnU-Net (the first method). ``summary``: ``nndiff
    compare``'s summary.json (metrics → method → region → metric → cases → mean)."""
    from .evaluation.evaluate import ALL_REGIONS, short_region
    steps = {b.steps for b in budgets.values()}
    head = (f"Dice (%) on fold 0's validation cases, mean over cases. Equal budget: every trainer took "
            f"{'/'.join(map(str, sorted(steps)))} optimiser steps (the stock model as many as NNDM's whole schedule, "
            f"its nnU-Net stage included).")
    metrics = summary["metrics"]
    regions = [r for r in next(iter(metrics.values())) if r != ALL_REGIONS]
    lesionwise = any("lesionwise_dice" in m for per_region in metrics.values() for m in per_region.values())
    keys = ("dice",) + (("lesionwise_dice",) if lesionwise else ())
    cols = [short_region(r) for r in regions] + ([f"LW {short_region(r)}" for r in regions] if lesionwise else [])
    width = max(44, *(len(m) + 2 for m in metrics))
    out = [head, f"{'method':{width}s}{'steps':>7s}{'train':>8s}" + "".join(f"{c:>8s}" for c in cols)]

    def mean(method, region, key):
        return metrics[method][region][key]["cases"]["mean"]

    for method in metrics:
        b = budgets[method_trainer[method]]
        cells = "".join(f"{100 * mean(method, r, k):8.1f}" for k in keys for r in regions)
        out.append(f"{method:{width}s}{b.steps:7d}{b.seconds:7.0f}s" + cells)
    if lesionwise:
        conv = summary.get("lesionwise", {}).get("convention", "")
        out.append(f"LW = BraTS 2023 lesion-wise Dice{f' ({conv} convention)' if conv else ''}; the others whole-volume "
                   f"(legacy) Dice. 'train' = wall time of the trainer's epochs.")
    stock = next(iter(metrics))
    for method in list(metrics)[1:]:
        above = [short_region(r) for r in regions if mean(method, r, "dice") > mean(stock, r, "dice")]
        below = [short_region(r) for r in regions if mean(method, r, "dice") < mean(stock, r, "dice")]
        parts = ([f"above stock nnU-Net in {', '.join(above)}"] if above else []) + \
                ([f"below {'it' if above else 'stock nnU-Net'} in {', '.join(below)}"] if below else [])
        out.append(f"{method}: " + ("; ".join(parts) or "equal to stock nnU-Net") + " (legacy Dice).")
    out.append("Two validation cases and no test: a smoke test of the road, not a verdict.")
    return out
