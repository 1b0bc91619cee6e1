"""``nndiff`` subcommands for BraTS: ``convert-brats``, ``convert-predictions-to-brats``, ``make-phantoms``."""
from __future__ import annotations

import os

from .brats import EDITIONS, PHANTOM_EDITIONS

EDITION_HELP = "BraTS edition: " + ", ".join(f"{k} ({e.title}, default -d {e.dataset_id} {e.dataset_name})"
                                             for k, e in EDITIONS.items())
PHANTOM_EDITION_HELP = "layout and naming: " + ", ".join(
    f"{k} ({EDITIONS[k].title}{', with a resection cavity' if 'cavity' in EDITIONS[k].phantom_labels else ''})"
    for k in PHANTOM_EDITIONS)


def _num_processes(value: str) -> int:
    n = int(value)
    if n < 1:
        import argparse
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def cmd_convert_brats(args) -> int:
    from .brats import convert_brats
    res = convert_brats(args.input_dirs, args.edition, raw_root=args.raw, dataset_id=args.d, name=args.name,
                        num_processes=args.np, skip_bad=args.skip_bad, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(f"{res.dataset_dir}: {res.num_training} training case(s) (imagesTr/labelsTr), "
          f"{res.num_test} unlabelled case(s) (imagesTs)")
    if res.skipped:
        print(f"skipped {len(res.skipped)} bad case(s), listed in {res.report}:")
        for s in res.skipped:
            print(f"  case {s['case']}" + (f": file {s['file']}" if s["file"] else "") + f": {s['reason']}")
    did = res.dataset_dir.name[len("Dataset"):len("Dataset") + 3]
    print(f"next: nnUNetv2_plan_and_preprocess -d {int(did)} -c 3d_fullres --verify_dataset_integrity")
    return 0


def cmd_convert_predictions(args) -> int:
    from .brats import convert_predictions_to_brats
    out = convert_predictions_to_brats(args.pred_dir, args.out_dir, args.edition, num_processes=args.np,
                                       overwrite=args.overwrite, progress=not args.no_progress)
    print(out)
    return 0


def cmd_make_phantoms(args) -> int:
    from .phantoms import make_phantoms
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        from nnunet_diffusion.errors import NNDiffError
        raise NNDiffError("--spacing takes one value or three (x y z)")
    spacing = None if args.spacing is None else (args.spacing[0] if len(args.spacing) == 1 else args.spacing)
    out = make_phantoms(args.out_dir, args.edition, n=args.n, n_val=args.n_val, seed=args.seed, spacing=spacing,
                        shape=args.shape, crop=args.crop, num_processes=args.np, overwrite=args.overwrite,
                        progress=not args.no_progress)
    for kind, path in out.items():
        print(f"{kind}: {path}")
    print("semi-synthetic: real MNI152 anatomy, simulated tumours (see dataset_conversion/phantoms.py)")
    return 0


def register(sub) -> None:
    """Add the BraTS subcommands to the ``nndiff`` parser's subparsers object."""
    p = sub.add_parser("convert-brats", help="BraTS folders (2020, 2021, the 2023 cohorts, the 2024/2025 cluster) "
                                             "-> nnU-Net raw dataset ($nnUNet_raw/DatasetNNN_BraTS20xx)",
                       epilog="example: nndiff convert-brats RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021 "
                              "RSNA_ASNR_MICCAI_BraTS2021_ValidationData --edition 2021 -np 8")
    p.add_argument("input_dirs", nargs="+", metavar="INPUT_DIR",
                   help="folder(s) holding the case folders as shipped; labelled cases -> imagesTr/labelsTr, "
                        "unlabelled (validation/test) -> imagesTs")
    p.add_argument("--edition", required=True, choices=list(EDITIONS), help=EDITION_HELP)
    p.add_argument("-d", type=int, default=None, help="dataset id (default: the edition's, see --edition)")
    p.add_argument("--name", default=None, help="dataset name (default: the edition's, see --edition)")
    p.add_argument("-np", type=_num_processes, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="worker processes (default: CPU cores - 1, at most 8)")
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave bad cases out (listed in the dataset's conversion_report.json) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert_brats)

    p = sub.add_parser("convert-predictions-to-brats",
                       help="nnU-Net predictions -> the edition's label values and file names (2020/2021: 1, 2, 4; "
                            "2023 cohorts: 1, 2, 3; 2024/2025 cluster: the organisers' values, checked)")
    p.add_argument("pred_dir", metavar="PRED_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--edition", required=True, choices=list(EDITIONS), help=EDITION_HELP)
    p.add_argument("-np", type=_num_processes, default=1, help="worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert_predictions)

    p = sub.add_parser("make-phantoms",
                       help="write semi-synthetic BraTS-layout folders (real MNI152 anatomy, simulated tumours)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--edition", default="2021", choices=list(PHANTOM_EDITIONS),
                   help=PHANTOM_EDITION_HELP + " (default 2021)")
    p.add_argument("-n", type=int, default=4, help="training cases, with seg (default 4)")
    p.add_argument("--n-val", type=int, default=0, help="validation cases, without seg (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="voxel spacing in mm, one value or x y z (default 1: the BraTS 240x240x155 grid)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="output size in voxels (with --spacing: centred crop/pad; alone: spacing fills the view)")
    p.add_argument("--crop", choices=("brats", "brain"), default="brats",
                   help="field of view: the BraTS 240x240x155 mm box (default) or the brain's bounding box")
    p.add_argument("-np", type=_num_processes, default=1, help="worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_make_phantoms)
