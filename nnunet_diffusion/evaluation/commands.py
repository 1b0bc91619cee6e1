"""``nndiff evaluate`` and ``nndiff compare``: registered on the ``nndiff`` parser by :func:`register`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .lesionwise import BRATS2023_COHORTS, DEFAULT_LESIONWISE_CONVENTION, LESIONWISE_CONVENTIONS
from .metrics import BRATS_EMPTY_HD95, HD95_MODES
from .uncertainty_quality import DEFAULT_MARGIN


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="worker processes (default: nnU-Net's nnUNet_def_n_proc, at most the CPU count)")
    p.add_argument("--hd95-mode", choices=HD95_MODES, default="brats",
                   help="brats (default): 95th percentile of the pooled surface distances of both directions, as "
                        "the official brats-evaluation package; monai: the larger directed 95th percentile "
                        "(monai.metrics.compute_hausdorff_distance)")
    p.add_argument("--empty-hd95", type=float, default=BRATS_EMPTY_HD95,
                   help=f"HD95 in mm when exactly one of prediction and reference is empty (default "
                        f"{BRATS_EMPTY_HD95:g}, brats-evaluation's penalty)")
    p.add_argument("--lesionwise", action=argparse.BooleanOptionalAction, default=None,
                   help="add lesion-wise Dice and HD95, lesion counts and per_lesion.csv (default: on for BraTS "
                        "region datasets, off otherwise)")
    p.add_argument("--lesionwise-convention", choices=LESIONWISE_CONVENTIONS, default=None,
                   help=f"{DEFAULT_LESIONWISE_CONVENTION}: the BraTS 2023 challenge rule (lesions merged by dilation, "
                        "small lesions dropped, misses and false positives averaged in as Dice 0 / HD95 374 mm); "
                        "panoptica: the official brats-evaluation package (one-to-one matching, means over the "
                        "matched lesions). Default: the one dataset.json names (nndiff convert-brats: panoptica for "
                        f"the 2024/2025 cluster), else {DEFAULT_LESIONWISE_CONVENTION}")
    p.add_argument("--lesionwise-cohort", type=str.upper, choices=tuple(BRATS2023_COHORTS), default=None,
                   help="BraTS 2023 cohort whose dilation and minimum lesion volume apply (GLI, SSA, PED: 3 voxels, "
                        "50 mm³; MEN: 1, 50; MET: 1, 2; default: from dataset.json's brats_edition, else GLI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_folder
    res = evaluate_folder(args.pred_dir, args.ref_dir, args.output, dataset=args.d, dataset_json=args.dataset_json,
                          num_processes=args.num_processes, hd95_mode=args.hd95_mode, empty_hd95=args.empty_hd95,
                          only_predicted=args.only_predicted, progress=not args.no_progress,
                          lesionwise=args.lesionwise, lesionwise_convention=args.lesionwise_convention,
                          lesionwise_cohort=args.lesionwise_cohort)
    print(res.table, end="")
    lesions = ", per_lesion.csv" if res.per_lesion is not None else ""
    print(f"\nwritten: {Path(args.output) / 'per_case.csv'}{lesions}, summary.json, table.md")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_trainers
    res = compare_trainers(args.d, args.tr, args.output, folds=args.f, configuration=args.c, plans=args.p,
                           baseline=args.baseline, results_dir=args.results, reference_dir=args.ref,
                           images_dir=args.images, dataset_json=args.dataset_json, cases=args.cases,
                           n_cases=args.n_cases, num_processes=args.num_processes, hd95_mode=args.hd95_mode,
                           empty_hd95=args.empty_hd95, plots=not args.no_plots, progress=not args.no_progress,
                           lesionwise=args.lesionwise, lesionwise_convention=args.lesionwise_convention,
                           lesionwise_cohort=args.lesionwise_cohort,
                           uncertainty_margin=None if args.uncertainty_margin < 0 else args.uncertainty_margin)
    print(res.table, end="")
    lesions = "per_lesion.csv, " if "lesionwise" in res.summary else ""
    uncertainty = "uncertainty_quality.csv, " if "uncertainty_quality" in res.summary else ""
    print(f"\nwritten to {res.output_dir}: per_case.csv, {lesions}paired.csv, {uncertainty}summary.json, table.md, "
          f"{len(res.figures)} figure(s)")
    return 0


def register(sub) -> None:
    """Add the ``evaluate`` and ``compare`` subcommands to the nndiff parser's subparsers object."""
    p = sub.add_parser(
        "evaluate", help="Dice, IoU, mIoU, HD95 (mm), VS, PA, sensitivity, specificity and volumes per case and region",
        description="Evaluate the label maps in PRED_DIR against the same-named references in REF_DIR, per case and "
                    "per region (BraTS: the edition's label groups, e.g. whole tumour, tumour core, enhancing) or "
                    "label, as read from the "
                    "dataset's dataset.json. Writes per_case.csv, summary.json and table.md into OUT_DIR, and with "
                    "lesion-wise metrics (default for BraTS region datasets) per_lesion.csv.",
        epilog="example: nndiff evaluate pred $nnUNet_raw/Dataset501_BraTS/labelsTs -d 501 -o eval_pred")
    p.add_argument("pred_dir", help="folder of predicted label maps (<case><file_ending>)")
    p.add_argument("ref_dir", help="folder of reference label maps with the same names")
    p.add_argument("-d", metavar="ID", help="nnU-Net dataset id or name: regions/labels from its dataset.json")
    p.add_argument("--dataset-json", help="a dataset.json to take regions/labels from (instead of -d)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--only-predicted", action="store_true",
                   help="evaluate only the cases that have a prediction (references without one are not an error)")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "compare", help="evaluate trainers' validation predictions across folds: tables, paired tests, pictures",
        description="For every trainer (-tr) and fold (-f), evaluate $nnUNet_results/<Dataset>/<trainer>__<plans>__"
                    "<configuration>/fold_<f>/validation against $nnUNet_preprocessed/<Dataset>/gt_segmentations, "
                    "then write one table per region (Method | DSC | HD95 | VS | IoU | mIoU, mean ± std over cases and "
                    "over folds), paired per-case differences against the baseline with Wilcoxon p-values, box "
                    "plots and slice pictures of chosen cases; for trainers whose folders hold <case>.npz probabilities "
                    "for every case, how well the entropy of those probabilities finds the errors (AUROC, AURC, ECE, "
                    "Brier, Spearman of mean uncertainty against Dice).",
        epilog="example: nndiff compare -d 501 -tr nnUNetTrainer nnUNetTrainerNNDM -f 0 1 2 3 4 -o cmp")
    p.add_argument("-d", required=True, metavar="ID", help="nnU-Net dataset id or name")
    p.add_argument("-tr", nargs="+", required=True, metavar="TRAINER", help="trainers to compare")
    p.add_argument("-f", nargs="+", default=["0"], metavar="FOLD", help="folds: 0 1 2 3 4 and/or all (default 0)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--baseline", help="trainer to take paired differences against (default: the first -tr)")
    p.add_argument("--cases", nargs="+", help="cases to draw (default: the --n-cases with the largest Dice change)")
    p.add_argument("--n-cases", type=int, default=2, help="how many cases to draw when --cases is not given")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--results", help="results folder (default $nnUNet_results)")
    p.add_argument("--ref", help="reference folder (default $nnUNet_preprocessed/<Dataset>/gt_segmentations)")
    p.add_argument("--images", help="image folder for the pictures (default $nnUNet_raw/<Dataset>/imagesTr)")
    p.add_argument("--dataset-json", help="dataset.json to take regions/labels from (default: the dataset's)")
    p.add_argument("--uncertainty-margin", type=float, default=DEFAULT_MARGIN, metavar="VOXELS",
                   help="where a trainer's folders hold <case>.npz probabilities for every case (validation with "
                        "--npz): measure its uncertainty (entropy of the fused probabilities) against its errors within "
                        f"this many voxels of reference or prediction (default {DEFAULT_MARGIN}; negative: every voxel)")
    _add_common(p)
    p.set_defaults(func=cmd_compare)
