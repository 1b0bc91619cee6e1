"""Held-out phantoms: every demo model on fresh phantom cases that no model has seen, neither in training nor as
fold 0's validation cases, with NNDM's refinement on and off.

    python -m benchmarks.heldout [--workdir bench_phantoms] [--variant demo] [--cases 16] [--seed 12345]
                                 [--heads ...] [--out heldout.json]

Why: the steps–accuracy curves (``benchmarks.accuracy``) are taken on fold 0's 2 validation cases, too few to say
whether a refinement helps or hurts (one case moves a region's mean Dice by tens of points). Here ``--cases`` new
phantoms are drawn with their own ``--seed`` (the demo's are seed 0, so no case repeats), in the same layout and
resolution as the demo's, converted with ``nndiff convert-brats`` and predicted from the raw NIfTI files with
nnU-Net's ``predict_from_files`` (preprocessing, sliding window, 8 mirrors, export) by the fold-0 models of ``nndiff
demo`` (the demo trains whatever is missing in DIR). Settings: the stock nnU-Net; NNDM with its refinement off and at
its defaults; every other head at its documented faster setting (``speed.FAST``; their papers' samplers take hours
for 16 cases on a CPU). Evaluated with ``nndiff evaluate``'s code (BraTS regions, HD95 in mm); for NNDM also per
case and region whether the refinement raised or lowered Dice. Prints JSON lines; a failure raises.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nnunet_diffusion import registry

from .accuracy import (_predictor, demo_parser, evaluate_cases, fast_options, mean_metrics, needs_all_heads,
                       use_demo_workdir)
from .speed import FAST
from .speed import TRAINERS as HEADS


def make_heldout(workdir: Path, n: int, seed: int) -> tuple[Path, dict]:
    """``n`` phantom cases of ``seed`` (the demo's layout and resolution) as an nnU-Net raw dataset with labels, made
    once under ``workdir/heldout``; returns the dataset folder and the phantom settings it was made with."""
    from nnunet_diffusion.dataset_conversion.brats import convert_brats
    from nnunet_diffusion.dataset_conversion.phantoms import make_phantoms
    from nnunet_diffusion.demo import DATASET, DATASET_ID, PHANTOMS
    if seed == PHANTOMS["seed"]:
        raise SystemExit(f"--seed {seed} is the demo's own phantom seed: those cases are the models' training data")
    root = workdir / "heldout" / f"seed{seed}_n{n}"
    raw = root / "nnUNet_raw" / DATASET
    if not (root / "done").is_file():
        settings = dict(PHANTOMS, n=n, n_val=0, seed=seed)
        folders = make_phantoms(root / "brats", overwrite=True, **settings)
        convert_brats([folders["training"]], settings["edition"], raw_root=root / "nnUNet_raw",
                      dataset_id=DATASET_ID, overwrite=True)
        (root / "done").write_text(json.dumps({k: str(v) for k, v in settings.items()}))
    return raw, json.loads((root / "done").read_text())


def result_file(workdir: Path, name: str) -> Path:
    """Where ``main`` writes its JSON (``--out name``) for the demo folder ``workdir``."""
    return workdir / "heldout" / name


def settings_to_run(heads: list[str], variant: str) -> list[tuple[str, str, object]]:
    """(trainer, setting label, sampling change) in the order they are measured: the stock nnU-Net first; NNDM
    refinement off and its defaults; the other heads at their documented faster setting (``speed.FAST``, parsed as
    ``nndiff predict`` parses it). The change maps the network's SamplingOptions to the ones to use (None: as is)."""
    from dataclasses import replace
    out = [(f"nnUNetTrainer_{variant}", "stock", None)]
    for head in heads:
        trainer = f"{HEADS[head]}_{variant}"
        if registry.head(head).refinement_toggle:
            out += [(trainer, "refine off", lambda o: replace(o, refine=False)), (trainer, "defaults", None)]
        else:
            fast = fast_options(head)
            label = "fast (" + " ".join(f"{k}={v}" for k, v in FAST[head].items()) + ")"
            out.append((trainer, label, lambda o, f=fast: replace(o, sampler=f.sampler, steps=f.steps,
                                                                    samples=f.samples)))
    return out


def paired(per_case_a: dict, per_case_b: dict) -> dict:
    """Per region: in how many cases Dice of b is above, equal to (within 0.1 point) or below that of a."""
    out = {}
    for region in next(iter(per_case_a.values())):
        diffs = [per_case_b[c][region] - per_case_a[c][region] for c in per_case_a]
        out[region] = {"higher": sum(d > 1e-3 for d in diffs), "same": sum(abs(d) <= 1e-3 for d in diffs),
                       "lower": sum(d < -1e-3 for d in diffs)}
    return out


def main(argv=None) -> int:
    ap = demo_parser(__doc__)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", default="heldout.json", help="file name under WORKDIR/heldout")
    args = ap.parse_args(argv)
    if args.cases < 2:
        ap.error(f"--cases must be at least 2; got {args.cases}")
    workdir = args.workdir.resolve()
    from nnunet_diffusion.demo import DATASET, run_demo
    run_demo(workdir, variant=args.variant, all_heads=needs_all_heads(args.heads))  # trains what is missing
    use_demo_workdir(workdir)
    from nnunet_diffusion.evaluation.evaluate import write_text_atomic
    raw, phantoms = make_heldout(workdir, args.cases, args.seed)
    cases = sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").glob("*.nii.gz"))
    inputs = [[str(raw / "imagesTr" / f"{c}_{i:04d}.nii.gz") for i in range(4)] for c in cases]
    pred_root = raw.parent.parent / "predictions"
    rows = []
    for trainer, label, change in settings_to_run(args.heads, args.variant):
        p = _predictor(workdir / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres")
        if change is not None:
            p.network.set_sampling(change(p.network.sampling))
        out = pred_root / f"{trainer}__{label.split(' (')[0].replace(' ', '_')}"
        t0 = time.perf_counter()
        p.predict_from_files(inputs, [str(out / c) for c in cases], save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
        seconds = (time.perf_counter() - t0) / len(cases)
        res = evaluate_cases(out, raw, cases)
        per_case = {c: {} for c in cases}
        for rec in res.per_case[["case", "region", "dice"]].itertuples(index=False):
            per_case[rec.case][rec.region] = float(rec.dice)
        from nnunet_diffusion.budget import training_budget
        budget = training_budget(workdir / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" /
                                 "fold_0" / "checkpoint_final.pth")
        rows.append({"trainer": trainer, "setting": label, "seconds_per_case": seconds,
                     "optimiser_steps": budget.steps, "metrics": mean_metrics(res),
                     "per_case_dice": per_case})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_case_dice"}), flush=True)
    comparisons = {}
    refining = next(h.trainer for h in registry.HEADS if h.refinement_toggle)
    nndm = [r for r in rows if r["trainer"].startswith(refining + "_")]
    if len(nndm) == 2:
        comparisons["NNDM defaults against its refinement off"] = paired(nndm[0]["per_case_dice"],
                                                                         nndm[1]["per_case_dice"])
    write_text_atomic(result_file(workdir, args.out), json.dumps(
        {"cases": cases, "seed": args.seed, "phantoms": phantoms, "rows": rows, "comparisons": comparisons}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
