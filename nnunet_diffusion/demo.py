"""``nndiff demo`` (``make demo``): the whole road on synthetic data, through nnU-Net's own console scripts.

1. a small synthetic 4-channel tumour dataset in nnU-Net raw format (BraTS regions)
2. nnUNetv2_plan_and_preprocess
3. nnUNetv2_train ... -tr nnUNetTrainer_<variant>        (the stock trainer, shortened)
4. nnUNetv2_train ... -tr nnUNetTrainerNNDM_<variant>    (starts from step 3's network: NNDIFF_BASELINE)
5. nnUNetv2_predict with the baseline, NNDM refined, and NNDM with NNDIFF_REFINE=0
6. Dice per region (nnU-Net's own evaluator) of all three

Every step's full output goes to <workdir>/logs/; the terminal shows a progress bar per step. Re-running
reuses finished steps (delete the workdir or pass --fresh to start over).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .cli import environment_with_trainers
from .errors import NNDiffError

DATASET_ID = 990
DATASET = f"Dataset{DATASET_ID}_NNDiffSynthetic"
BIN = Path(sys.executable).parent


def _run(cmd, env, log: Path, desc: str, total: int | None = None, pattern: str | None = None) -> float:
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


def _dice(pred: Path, ref: Path, dataset_json: dict) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    metrics = compute_metrics_on_folder(str(ref), str(pred), str(pred / "summary.json"), SimpleITKIO(),
                                        dataset_json["file_ending"], lm.foreground_regions, None, num_processes=1)
    names = {tuple(v) if isinstance(v, list) else (v,): k for k, v in dataset_json["labels"].items()}
    return {names.get(tuple(r), str(r)): metrics["mean"][r]["Dice"] for r in metrics["mean"]}


def run_demo(workdir: Path, fresh: bool = False, variant: str = "demo") -> int:
    from . import config
    from .dataset_conversion.synthetic import make_synthetic_dataset
    config.resolve("nnunet", variant), config.resolve("nndm", variant)  # unknown variant: clear error now
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    env = environment_with_trainers()
    env.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_results=str(workdir / "nnUNet_results"), nnUNet_compile="0",
               nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"), nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "1"))
    env = {k: v for k, v in env.items() if not k.startswith("NNDIFF_")}
    logs = workdir / "logs"
    baseline, nndm = f"nnUNetTrainer_{variant}", f"nnUNetTrainerNNDM_{variant}"
    results = Path(env["nnUNet_results"]) / DATASET
    raw = Path(env["nnUNet_raw"]) / DATASET
    timings = {}
    print(f"nndiff demo in {workdir} (logs in {logs})")

    if not (raw / "dataset.json").is_file():
        print("[1/6] synthetic dataset: 8 training + 3 test cases, 4 channels, BraTS regions")
        make_synthetic_dataset(env["nnUNet_raw"], DATASET_ID, num_train=8, num_test=3, overwrite=True)
    if not (Path(env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json").is_file():
        timings["plan_and_preprocess"] = _run(
            [BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", "1", "-np", "1",
             "--verify_dataset_integrity"], env, logs / "plan_and_preprocess.log",
            "[2/6] nnUNetv2_plan_and_preprocess")
    for step, trainer, extra in (("3/6", baseline, {}), ("4/6", nndm, {"NNDIFF_BASELINE": baseline})):
        if (results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth").is_file():
            continue
        cls_hp = config.resolve("nnunet" if trainer == baseline else "nndm", variant)
        epochs = cls_hp.get("num_epochs") or (cls_hp["stage2_epochs"] + cls_hp["stage3_epochs"])
        timings[f"train {trainer}"] = _run(
            [BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
            dict(env, **extra), logs / f"train_{trainer}.log", f"[{step}] nnUNetv2_train -tr {trainer}", epochs,
            r"Epoch \d+$")

    predictions = {"nnUNetTrainer (baseline)": (baseline, {}), "NNDM refined": (nndm, {}),
                   "NNDM, NNDIFF_REFINE=0": (nndm, {"NNDIFF_REFINE": "0"})}
    dice = {}
    for name, (trainer, extra) in predictions.items():
        out = workdir / "predictions" / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        if not (out / "summary.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            timings[f"predict {name}"] = _run(
                [BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "3d_fullres",
                 "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], dict(env, **extra),
                logs / f"predict_{out.name}.log", f"[5/6] nnUNetv2_predict ({name})")
        dice[name] = _dice(out, raw / "labelsTs", json.loads((raw / "dataset.json").read_text()))

    print("\n[6/6] Dice on the 3 test cases (nnU-Net's evaluator, mean over cases)")
    regions = list(next(iter(dice.values())))
    print(f"{'':26s}" + "".join(f"{r:>17s}" for r in regions))
    for name, d in dice.items():
        print(f"{name:26s}" + "".join(f"{d[r]:17.3f}" for r in regions))
    for k, v in timings.items():
        print(f"  time {k}: {v:.0f} s")
    (workdir / "demo_results.json").write_text(json.dumps({"dice": dice, "seconds": timings}, indent=2))
    print(f"\nwritten: {workdir / 'demo_results.json'}; training curves: "
          f"{results}/<trainer>__nnUNetPlans__3d_fullres/fold_0/progress.png")
    print("Tiny, synthetic and briefly trained: these numbers show the road works, not what NNDM achieves on BraTS.")
    return 0
