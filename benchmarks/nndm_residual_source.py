"""Where should NNDM's refiner take its training residual from? (trainer_configs/nndm.toml ``residual_source``)

    python -m benchmarks.nndm_residual_source --part gap   [--workdir DIR] [--dropout 0.1 0.2 0.3] [--cases 16]
    python -m benchmarks.nndm_residual_source --part train [--workdir DIR] [--variants demo demo_dropout]
    python -m benchmarks.nndm_residual_source --part eval  [--workdir DIR] [--variants demo demo_dropout] [--cases 16]

The refiner learns e = y − ŷ on the backbone's own training cases; on cases the backbone has not seen e is larger,
so a refiner trained on the small training residuals may correct too little, or in the wrong direction, at test time.

``gap`` (needs only the stock ``nnUNetTrainer_demo`` model in DIR, which ``nndiff demo`` or ``--part train`` trains):
per BraTS region the mean |e| inside the region (y = 1) and outside it, of the stock backbone's probabilities
(sliding window, no mirroring, in nnU-Net's preprocessed space) on fold 0's 8 training cases (plain, and with the
channel dropout of ``residual_source = "dropout"`` at each ``--dropout`` probability, seed 0) and on ``--cases``
held-out phantoms (``benchmarks.heldout``'s, seed 12345). A source whose training residuals match the held-out
ones is the one to choose.

``train``: nnUNetv2_train fold 0 of each ``nnUNetTrainerNNDM_<variant>`` from the stock demo model
(``NNDIFF_BASELINE``), as ``nndiff demo`` does; a finished model is reused.

``eval``: each variant on the held-out phantoms, predicted from the raw files by nnU-Net's ``predict_from_files``
(8 mirrors), refinement on (the trainer's defaults) and off, evaluated with ``nndiff evaluate``'s code; plus the
stock model. Prints JSON lines and writes DIR/heldout/residual_source_<variants>.json; with two variants also
per case and region whether the second's refined Dice is above, equal to or below the first's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def prepare(workdir: Path) -> None:
    """``nndiff demo``'s steps 1-3 and its stock model (``nnUNetTrainer_demo``), each skipped when done."""
    from nnunet_diffusion.demo import prepare_dataset
    from nnunet_diffusion.environment import workdir_environment
    prepare_dataset(workdir, workdir_environment(workdir))
    train(workdir, "nnUNetTrainer_demo")


def model(workdir: Path, trainer: str) -> Path:
    from nnunet_diffusion.demo import DATASET
    return workdir / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"


def train(workdir: Path, trainer: str) -> None:
    from nnunet_diffusion.demo import DATASET_ID
    from nnunet_diffusion.environment import BIN, run_logged as _run, workdir_environment
    if (model(workdir, trainer) / "fold_0" / "checkpoint_final.pth").is_file():
        return
    extra = {"NNDIFF_BASELINE": "nnUNetTrainer_demo"} if trainer.startswith("nnUNetTrainerNNDM") else {}
    _run([BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
         dict(workdir_environment(workdir), **extra), workdir / "logs" / f"train_{trainer}.log",
         f"nnUNetv2_train -tr {trainer}")


def residual_magnitudes(y, p) -> dict:
    """Per region r: mean |y − p| inside y_r = 1 and outside; arrays (regions, ...), y binary, p probabilities."""
    out = {}
    for r in range(y.shape[0]):
        inside = y[r] > 0
        e = abs(y[r] - p[r])
        out[r] = {"inside": float(e[inside].mean()) if inside.any() else float("nan"), "outside": float(e[~inside].mean())}
    return out


def gap(workdir: Path, dropouts: list[float], n_cases: int, seed: int) -> dict:
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_diffusion.evaluation.metrics import region_mask
    from nnunet_diffusion.inference.nndm_network import add_feature_dropout

    from .accuracy import fold0_cases, preprocessed_cases
    from .heldout import make_heldout
    p = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, perform_everything_on_device=False,
                        allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model(workdir, "nnUNetTrainer_demo")), (0,), "checkpoint_final.pth")
    lm = p.label_manager
    switch = add_feature_dropout(p.network, 0.0)

    def probs(x, dropout):
        switch.p, switch.active = dropout, dropout > 0
        torch.manual_seed(0)
        try:
            return torch.sigmoid(p.predict_logits_from_preprocessed_data(x).float()).numpy()
        finally:
            switch.active = False

    def targets(seg):
        return np.stack([region_mask(np.asarray(seg)[0], r) for r in lm.foreground_regions]).astype(np.float32)

    rows = {}
    ds = preprocessed_cases(p, fold0_cases(workdir, "train"))
    train_cases = [ds.load_case(c)[:2] for c in fold0_cases(workdir, "train")]
    raw, _ = make_heldout(workdir, n_cases, seed)
    pre = p.configuration_manager.preprocessor_class(verbose=False)
    held = []
    for f in sorted((raw / "labelsTr").glob("*.nii.gz")):
        case = f.name[: -len(".nii.gz")]
        data, seg, _ = pre.run_case([str(raw / "imagesTr" / f"{case}_{i:04d}.nii.gz") for i in range(4)], str(f),
                                    p.plans_manager, p.configuration_manager, p.dataset_json)
        held.append((data, seg))
    settings = [("training cases, backbone", train_cases, 0.0)] + \
        [(f"training cases, dropout {d}", train_cases, d) for d in dropouts] + [("held-out cases, backbone", held, 0.0)]
    for label, cases, d in settings:
        per = [residual_magnitudes(targets(seg), probs(torch.from_numpy(np.asarray(data[:], dtype=np.float32)), d))
               for data, seg in cases]
        rows[label] = {str(region): {side: float(np.nanmean([c[i][side] for c in per])) for side in ("inside", "outside")}
                       for i, region in enumerate(lm.foreground_regions)}
        print(json.dumps({"setting": label, "cases": len(cases), "mean |e|": rows[label]}), flush=True)
    return rows


def evaluate(workdir: Path, variants: list[str], n_cases: int, seed: int, stock: bool = True) -> list[dict]:
    from dataclasses import replace

    from nnunet_diffusion.evaluation.evaluate import write_text_atomic

    from .accuracy import _predictor, evaluate_cases, mean_metrics, use_demo_workdir
    from .heldout import make_heldout, paired
    use_demo_workdir(workdir)
    raw, phantoms = make_heldout(workdir, n_cases, seed)
    cases = sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").glob("*.nii.gz"))
    inputs = [[str(raw / "imagesTr" / f"{c}_{i:04d}.nii.gz") for i in range(4)] for c in cases]
    settings = [("nnUNetTrainer_demo", "stock", None)] if stock else []
    for v in variants:
        settings += [(f"nnUNetTrainerNNDM_{v}", "refine off", lambda o: replace(o, refine=False)),
                     (f"nnUNetTrainerNNDM_{v}", "defaults", None)]
    rows = []
    for trainer, label, change in settings:
        p = _predictor(model(workdir, trainer))
        if change is not None:
            p.network.set_sampling(change(p.network.sampling))
        out = raw.parent.parent / "predictions" / f"{trainer}__{label.replace(' ', '_')}"
        t0 = time.perf_counter()
        p.predict_from_files(inputs, [str(out / c) for c in cases], save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
        res = evaluate_cases(out, raw, cases)
        per_case = {c: {} for c in cases}
        for rec in res.per_case[["case", "region", "dice"]].itertuples(index=False):
            per_case[rec.case][rec.region] = float(rec.dice)
        rows.append({"trainer": trainer, "setting": label, "seconds": time.perf_counter() - t0,
                     "metrics": mean_metrics(res), "per_case_dice": per_case})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_case_dice"}), flush=True)
    defaults = {r["trainer"]: r for r in rows if r["setting"] == "defaults"}
    comparisons = {}
    if len(defaults) == 2:
        a, b = (defaults[f"nnUNetTrainerNNDM_{v}"] for v in variants)
        comparisons[f"{b['trainer']} against {a['trainer']} (defaults)"] = paired(a["per_case_dice"], b["per_case_dice"])
        print(json.dumps(comparisons), flush=True)
    write_text_atomic(workdir / "heldout" / f"residual_source_{'_'.join(variants)}.json", json.dumps(
        {"cases": cases, "seed": seed, "phantoms": phantoms, "rows": rows, "comparisons": comparisons}, indent=2))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("gap", "train", "eval"), required=True)
    ap.add_argument("--workdir", type=Path, default=Path("bench_residual_source"))
    ap.add_argument("--variants", nargs="+", default=["demo", "demo_dropout"], help="NNDM variants (nndm.toml)")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--no-stock", action="store_true", help="eval: leave out the stock model")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    from .accuracy import use_demo_workdir
    use_demo_workdir(workdir)
    prepare(workdir)
    if args.part == "gap":
        gap(workdir, args.dropout, args.cases, args.seed)
    elif args.part == "train":
        for v in args.variants:
            train(workdir, f"nnUNetTrainerNNDM_{v}")
    else:
        evaluate(workdir, args.variants, args.cases, args.seed, stock=not args.no_stock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
