"""Steps–accuracy curves on the phantom benchmark: Dice and HD95 of each head against its number of sampling
steps (and samples), next to the prediction time, with the stock nnU-Net on the same cases.

    python -m benchmarks.accuracy [--workdir DIR] [--variant demo] [--steps 1 2 5 10 25 100] [--samples 1]

The models are those of ``nndiff demo`` (BraTS 2021-layout phantoms, fold 0, the ``--variant`` trainers); the
demo's pipeline trains whatever is missing in DIR. Every setting predicts fold 0's validation cases from nnU-Net's
preprocessed data with nnU-Net's predictor (sliding window, Gaussian, 8 mirrors), exports them with nnU-Net's
export, and evaluates them with ``nndiff evaluate``'s code (BraTS regions, HD95 in mm). Sampling is DDIM with
the given steps and samples, plus each head's documented faster setting (``speed.FAST``); the time is the
predictor's per case (export excluded). Prints JSON; a failure raises.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .speed import FAST
from .speed import TRAINERS as HEADS


def _evaluate(pred_dir: Path, raw: Path, cases: list[str]) -> dict:
    from nnunet_diffusion.evaluation.evaluate import evaluate_folder
    res = evaluate_folder(pred_dir, raw / "labelsTr", dataset_json=raw / "dataset.json", cases=cases,
                          num_processes=1, progress=False)
    return {region: {"dice": m["dice"]["mean"], "hd95": m["hd95"]["mean"]} for region, m in res.summary["metrics"].items()}


def predict_cases(model_folder: Path, cases: list[str], out_dir: Path, sampling=None) -> float:
    """Predict ``cases`` (preprocessed) into ``out_dir`` with the fold-0 model; return seconds per case."""
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    p = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model_folder), (0,), "checkpoint_final.pth")
    if sampling is not None:
        p.network.set_sampling(sampling(p.network))
    folder = Path(os.environ["nnUNet_preprocessed"]) / p.plans_manager.dataset_name / \
        p.configuration_manager.data_identifier
    ds = infer_dataset_class(str(folder))(str(folder), list(cases))
    out_dir.mkdir(parents=True, exist_ok=True)
    p.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(ds.load_case(cases[0])[0][:],
                                                                        dtype=np.float32)))  # warm-up, untimed
    seconds = 0.0
    for case in cases:
        data, _, _, props = ds.load_case(case)
        x = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
        t0 = time.perf_counter()
        logits = p.predict_logits_from_preprocessed_data(x)
        seconds += time.perf_counter() - t0
        export_prediction_from_logits(logits, props, p.configuration_manager, p.plans_manager, p.dataset_json,
                                      str(out_dir / case), False)
    return seconds / len(cases)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_phantoms"))
    ap.add_argument("--variant", default="demo")
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--steps", type=int, nargs="*", default=[1, 2, 5, 10, 25, 100])
    ap.add_argument("--samples", type=int, nargs="+", default=[1])
    ap.add_argument("--trainer-defaults", action="store_true",
                    help="also sample each --variant model with its head's default trainer setting (sampler, steps, "
                         "samples of nnUNetTrainer<Head>), e.g. the paper's DDPM: what the faster settings are "
                         "compared with; slow (minutes to hours)")
    ap.add_argument("--out", default="accuracy.json", help="file name under WORKDIR/accuracy")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    from nnunet_diffusion.demo import DATASET, run_demo
    run_demo(workdir, variant=args.variant)  # trains what is missing; reuses what is there
    from nnunet_diffusion.cli import environment_with_trainers
    os.environ.update({k: v for k, v in environment_with_trainers().items() if k == "nnUNet_extTrainer"})
    os.environ.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
                      nnUNet_results=str(workdir / "nnUNet_results"))
    import torch

    from nnunet_diffusion.inference.options import options_from_env
    from nnunet_diffusion.trainers import TRAINERS
    torch.set_num_threads(os.cpu_count() or 1)
    raw = workdir / "nnUNet_raw" / DATASET
    results_root = workdir / "nnUNet_results" / DATASET
    cases = json.loads((workdir / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())[0]["val"]
    out_root = workdir / "accuracy"
    rows = []

    def run(trainer: str, label: str, sampling=None, **extra):
        pred = out_root / f"{trainer}__{label.replace(' ', '_')}"
        seconds = predict_cases(results_root / f"{trainer}__nnUNetPlans__3d_fullres", cases, pred, sampling)
        rows.append({"trainer": trainer, "setting": label, "seconds_per_case": seconds,
                     "metrics": _evaluate(pred, raw, cases), **extra})
        print(json.dumps(rows[-1]), flush=True)

    run(f"nnUNetTrainer_{args.variant}", "stock")
    for head in args.heads:
        trainer = f"{HEADS[head]}_{args.variant}"
        if head == "nndm":
            run(trainer, "refine off", lambda net: replace(net.sampling, refine=False))
        base = TRAINERS[HEADS[head]]
        defaults = base.sampling_defaults()
        grid = [("ddim", k, samples) for samples in args.samples for k in args.steps]
        if head in FAST:  # the documented faster setting's accuracy, always; parsed as nndiff predict parses it
            f = options_from_env(defaults, int(base.hparams()["num_train_timesteps"]), FAST[head])
            grid += [] if (f.sampler, f.steps, f.samples) in grid else [(f.sampler, f.steps, f.samples)]
        if args.trainer_defaults:
            d = defaults
            run(trainer, f"trainer default: {d.sampler} {d.steps} steps x {d.samples} samples",
                lambda net, d=d: replace(net.sampling, sampler=d.sampler, steps=d.steps, samples=d.samples),
                steps=d.steps, samples=d.samples)
        for sampler, k, samples in grid:
            run(trainer, f"{sampler} {k} steps x {samples} samples",
                lambda net, a=sampler, k=k, s=samples: replace(net.sampling, sampler=a, steps=k, samples=s),
                steps=k, samples=samples)
    (out_root / args.out).write_text(json.dumps({"cases": cases, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
