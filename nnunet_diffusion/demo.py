"""``nndiff demo`` (``make demo``): the whole road a BraTS user takes, on semi-synthetic phantoms, through
nnU-Net's own console scripts.

1. phantoms in the BraTS 2021 organisers' layout (training folder with labels, validation folder without)
2. nndiff convert-brats → Dataset501_BraTS2021 in $nnUNet_raw
3. nnUNetv2_plan_and_preprocess
4. nnUNetv2_train fold 0: nnUNetTrainer_<v> (stock, shortened), nnUNetTrainerNNDM_<v> (starting from it, via
   NNDIFF_BASELINE), nnUNetTrainerMedSegDiff_<v>, nnUNetTrainerReCoSeg_<v>, nnUNetTrainerMoDiff_<v> (on the
   single-rater BraTS regions) and nnUNetTrainerDDMD_<v>
5. nndiff compare on fold 0's validation cases (+ NNDM with its refinement off, ReCoSeg with T1ce or FLAIR
   missing at prediction), table and figures
6. nnUNetv2_predict of the BraTS validation cases with NNDM, back to BraTS labels and names; ReCoSeg's residual
   maps of those cases (NIfTI + PNG)

Every step's full output goes to <workdir>/logs/; the terminal shows a progress bar per step. Re-running
reuses finished steps (delete the workdir or pass --fresh to start over).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


from .environment import BIN, environment_with_trainers, run_logged as _run

DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_BraTS2021"
# the phantoms the demo trains on (10 training + 2 validation cases); benchmarks.heldout draws more like them
PHANTOMS = {"edition": "2021", "seed": 0, "spacing": 4, "crop": "brain"}
HEADS = (("nnunet", "nnUNetTrainer"), ("nndm", "nnUNetTrainerNNDM"), ("medsegdiff", "nnUNetTrainerMedSegDiff"),
         ("recoseg", "nnUNetTrainerReCoSeg"), ("modiff", "nnUNetTrainerMoDiff"), ("ddmd", "nnUNetTrainerDDMD"))


def _epochs(head: str, variant: str) -> int:
    from . import config
    # NNDM starts from the trained baseline (stage 1 skipped)
    return config.total_epochs(config.resolve(head, variant), head, from_baseline=True)


def run_demo(workdir: Path, fresh: bool = False, variant: str = "demo") -> int:
    from . import config
    from .dataset_conversion.brats import convert_brats, convert_predictions_to_brats
    from .dataset_conversion.phantoms import make_phantoms
    for head, _ in HEADS:
        config.resolve(head, variant)  # an unknown variant: a clear error now, not after minutes of work
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    env = environment_with_trainers()
    env.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_results=str(workdir / "nnUNet_results"), nnUNet_compile="0",
               nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"), nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "1"))
    env = {k: v for k, v in env.items() if not k.startswith("NNDIFF_")}
    logs, results = workdir / "logs", Path(env["nnUNet_results"]) / DATASET
    raw = Path(env["nnUNet_raw"]) / DATASET
    trainers = {head: f"{cls}_{variant}" for head, cls in HEADS}
    timings = {}
    print(f"nndiff demo in {workdir} (logs in {logs})")

    brats = workdir / "BraTS2021_download"
    if not (brats / "done").is_file():
        t0 = time.time()
        print("[1/6] semi-synthetic BraTS 2021 phantoms (MNI152 anatomy, 4 mm): 10 training + 2 validation cases")
        folders = make_phantoms(brats, n=10, n_val=2, overwrite=True, **PHANTOMS)
        (brats / "done").write_text(json.dumps({k: str(v) for k, v in folders.items()}))
        timings["phantoms"] = time.time() - t0
    folders = json.loads((brats / "done").read_text())
    if not (raw / "dataset.json").is_file():
        print(f"[2/6] nndiff convert-brats → {raw}")
        os_env_raw = env["nnUNet_raw"]
        res = convert_brats([folders["training"], folders["validation"]], "2021", raw_root=os_env_raw,
                            dataset_id=DATASET_ID, overwrite=True)
        print(f"      {res.num_training} training cases (imagesTr/labelsTr), {res.num_test} validation (imagesTs)")
    if not (Path(env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json").is_file():
        timings["plan_and_preprocess"] = _run(
            [BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", "1", "-np", "1",
             "--verify_dataset_integrity"], env, logs / "plan_and_preprocess.log",
            "[3/6] nnUNetv2_plan_and_preprocess")
    for head, trainer in trainers.items():
        if (results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth").is_file():
            continue
        extra = {"NNDIFF_BASELINE": trainers["nnunet"]} if head == "nndm" else {}
        timings[f"train {trainer}"] = _run(
            [BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
            dict(env, **extra), logs / f"train_{trainer}.log", f"[4/6] nnUNetv2_train -tr {trainer}",
            _epochs(head, variant), r"Epoch \d+$")

    # more "methods" for the table, predicted on the same validation cases: NNDM with its refinement off, ReCoSeg
    # with a modality missing (channel 1 = T1ce, 3 = FLAIR in nnU-Net's BraTS order)
    split = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())[0]
    extra_methods = {f"{trainers['nndm']}_refine_off": (trainers["nndm"], {"NNDIFF_REFINE": "0"}),
                     f"{trainers['recoseg']}_missing_T1ce": (trainers["recoseg"], {"NNDIFF_MISSING": "1"}),
                     f"{trainers['recoseg']}_missing_FLAIR": (trainers["recoseg"], {"NNDIFF_MISSING": "3"})}
    def up_to_date(path: Path, trainer: str) -> bool:
        """``path`` exists and was written after ``trainer``'s final checkpoint (a retrained model redoes it)."""
        ckpt = results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
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
            logs / f"predict_{name}.log", f"[5/6] nnUNetv2_predict {trainer}, {setting} (validation cases)")
        tmp.rename(folder)
    compare_dir = workdir / "compare"
    timings["compare"] = _run(
        [BIN / "nndiff", "compare", "-d", DATASET_ID, "-tr", trainers["nnunet"], trainers["nndm"],
         trainers["medsegdiff"], trainers["recoseg"], trainers["modiff"],
         trainers["ddmd"], *extra_methods, "-f", "0", "--baseline", trainers["nnunet"], "-o", compare_dir, "-np", "1",
         "--no-progress"], env, logs / "compare.log", "[5/6] nndiff compare (fold 0 validation cases)")

    submission = workdir / "BraTS2021_submission"
    if not up_to_date(submission, trainers["nndm"]):
        shutil.rmtree(submission, ignore_errors=True)
        pred = workdir / "predictions_validation"
        shutil.rmtree(pred, ignore_errors=True)
        timings["predict BraTS validation"] = _run(
            [BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", pred, "-d", DATASET_ID, "-c", "3d_fullres",
             "-f", "0", "-tr", trainers["nndm"], "-device", "cpu", "-npp", "1", "-nps", "1"], env,
            logs / "predict_validation.log", "[6/6] nnUNetv2_predict NNDM (BraTS validation cases)")
        convert_predictions_to_brats(pred, submission, "2021", progress=False)
    recoseg_pred = workdir / "predictions_validation_recoseg"
    if not up_to_date(recoseg_pred / "residuals", trainers["recoseg"]):
        shutil.rmtree(recoseg_pred, ignore_errors=True)
        timings["predict BraTS validation, ReCoSeg with residual maps"] = _run(
            [BIN / "nndiff", "predict", "--residuals", "-i", raw / "imagesTs", "-o", recoseg_pred, "-d", DATASET_ID,
             "-c", "3d_fullres", "-f", "0", "-tr", trainers["recoseg"], "-device", "cpu", "-npp", "1", "-nps", "1"],
            env, logs / "predict_validation_recoseg.log",
            "[6/6] nndiff predict --residuals ReCoSeg (BraTS validation cases)")

    summary = json.loads((compare_dir / "summary.json").read_text())
    print("\nDice (%) on fold 0's validation cases, mean over cases (nndiff compare; full table: "
          f"{compare_dir / 'table.md'}):")
    _print_dice(summary)
    for k, v in timings.items():
        print(f"  time {k}: {v:.0f} s")
    print(f"figures: {compare_dir / 'figures'}")
    print(f"BraTS-format predictions of the validation cases (labels 1, 2, 4): {submission}")
    print(f"ReCoSeg residual maps |synthetic T1ce - T1ce| (NIfTI and PNG): {recoseg_pred / 'residuals'}")
    print("Semi-synthetic and trained for minutes: this shows the road works, not what the heads achieve on BraTS.")
    (workdir / "demo_results.json").write_text(json.dumps({"seconds": timings}, indent=2))
    return 0


def _print_dice(summary: dict) -> None:
    """The Dice of ``nndiff compare``'s summary.json: metrics → trainer → region → dice → cases → mean."""
    rows = {trainer: {region: m["dice"]["cases"]["mean"] for region, m in per_region.items()}
            for trainer, per_region in summary["metrics"].items()}
    regions = [r for r in next(iter(rows.values())) if r != "mean over regions"]
    print(f"{'':44s}" + "".join(f"{r:>18s}" for r in regions))
    for trainer, d in rows.items():
        print(f"{trainer:44s}" + "".join(f"{100 * d[r]:18.1f}" for r in regions))
