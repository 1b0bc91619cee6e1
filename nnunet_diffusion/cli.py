"""The ``nndiff`` command. Training and prediction are nnU-Net's own console scripts; ``nndiff`` adds what
they cannot do: print the one line of set-up (``env``), list trainers (``trainers``), pass predict-time
diffusion options as flags (``predict``), make synthetic data (``make-synthetic``) and run the demo."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .environment import environment_with_trainers, ext_trainer_value
from .errors import NNDiffError


def cmd_env(args) -> int:
    import shlex
    print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value())}")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            print(f"# {var} is not set: nnU-Net needs it (nnU-Net's documentation/setting_up_paths.md)")
    return 0


def cmd_trainers(args) -> int:
    from .spec import description
    from .trainers import TRAINERS
    for name, cls in sorted(TRAINERS.items()):
        desc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        if cls.variant:
            desc = description(cls.head, cls.variant)
        print(f"{name:32s} {desc}")
    return 0


def cmd_make_synthetic(args) -> int:
    from .dataset_conversion.synthetic import make_synthetic_dataset
    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise NNDiffError("give the nnU-Net raw folder (--raw) or set nnUNet_raw")
    out = make_synthetic_dataset(raw, args.d, args.name, args.n, args.n_test, tuple(args.shape),
                                 seed=args.seed, overwrite=args.overwrite)
    print(out)
    return 0


PREDICT_FLAGS = (("--steps", "NNDIFF_STEPS"), ("--samples", "NNDIFF_SAMPLES"), ("--seed", "NNDIFF_SEED"),
                 ("--sampler", "NNDIFF_SAMPLER"), ("--tta-refine", "NNDIFF_TTA_REFINE"),
                 ("--fusion", "NNDIFF_FUSION"), ("--missing", "NNDIFF_MISSING"))


def _nnunet_model_args(rest: list[str]) -> argparse.Namespace:
    """The model-selecting arguments of an nnUNetv2_predict command line (its own names and defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-i", required=True)
    p.add_argument("-o", required=True)
    p.add_argument("-d", required=True)
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-tr", default="nnUNetTrainer")
    p.add_argument("-c", required=True)
    p.add_argument("-f", nargs="+", default=None)
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-device", default="cuda")
    return p.parse_known_args(rest)[0]


def _second_pass(rest: list[str], write, what: str, folder: str, **kwargs) -> None:
    """Run ``write(model_folder, input, output, folds, checkpoint, device=..., **kwargs)`` for the model of an
    nnUNetv2_predict command line (a post-step for outputs nnU-Net's predictor has no hook for; they go to
    ``<output>/<folder>``)."""
    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    a = _nnunet_model_args(rest)
    folds = None if a.f is None else [f if f == "all" else int(f) for f in a.f]
    model = get_output_folder(maybe_convert_to_dataset_name(a.d), a.tr, a.p, a.c)
    device = torch.device("cuda" if a.device == "cuda" else "cpu" if a.device == "cpu" else "mps")
    written = write(model, a.i, a.o, folds, a.chk, device=device, **kwargs)
    print(f"{what}: {len(written)} files in {Path(a.o) / folder}")


def predict_overrides(args):
    """The prediction settings ``nndiff predict``'s flags set, as one value (checked now, before nnU-Net starts)."""
    from .inference.options import FIELDS_OF_VARS, Overrides, SamplingOptions, overrides_from_env
    env = {}
    for flag, var in PREDICT_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            env[var] = str(value)
    if args.no_refine:
        env["NNDIFF_REFINE"] = "0"
    flags = {var: flag for flag, var in PREDICT_FLAGS} | {"NNDIFF_REFINE": "--no-refine"}
    parsed = overrides_from_env(env)  # the flags' values through the variables' parser: one set of rules
    by_var = {FIELDS_OF_VARS[v]: v for v in env}
    ov = Overrides(tuple((f, v, f"nndiff predict {flags[by_var[f]]}") for f, v, _ in parsed.items))
    ov.apply(SamplingOptions(), None)  # the model's T is checked when nnU-Net loads it
    return ov


def cmd_predict(args, rest: list[str]) -> int:
    """Run nnU-Net's own nnUNetv2_predict entry point with the flags' prediction settings laid over each
    checkpoint's recorded ones (and over NNDIFF_* variables), passed to the network as one value."""
    from .inference.options import prediction_overrides
    overrides = predict_overrides(args)
    os.environ["nnUNet_extTrainer"] = environment_with_trainers()["nnUNet_extTrainer"]  # nnU-Net's trainer lookup
    with prediction_overrides(overrides):
        return _predict(args, rest)


def _predict(args, rest: list[str]) -> int:
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    keep_probabilities = "--save_probabilities" in rest
    if args.uncertainty and not keep_probabilities:
        rest = [*rest, "--save_probabilities"]
    sys.argv = ["nnUNetv2_predict", *rest]
    predict_entry_point()
    if args.uncertainty:
        from .inference.uncertainty import write_uncertainty_maps
        output = rest[rest.index("-o") + 1]
        written = write_uncertainty_maps(output, remove_probabilities=not keep_probabilities)
        print(f"uncertainty maps: {len(written)} files in {Path(output) / 'uncertainty'}")
    if args.residuals:
        from .inference.recoseg_residuals import write_residual_maps
        _second_pass(rest, write_residual_maps, "residual maps", "residuals")
    if args.discrepancy:
        from .inference.ddmd_maps import write_discrepancy_maps
        from .trainers import TRAINERS
        _second_pass(rest, write_discrepancy_maps, "discrepancy maps", "discrepancy", trainers=TRAINERS)
    if args.samples_out:
        from .inference.modiff_samples import SAMPLES_FOLDER, write_samples
        _second_pass(rest, write_samples, "samples", SAMPLES_FOLDER, threshold=args.threshold)
    return 0


def cmd_evaluate_samples(args) -> int:
    from .inference.modiff_samples import evaluate_samples
    result = evaluate_samples(args.samples_dir, args.raters_dir, args.o, num_samples=args.n)
    mean = result["mean"]
    print(", ".join(f"{k} {v:.4f}" for k, v in mean.items() if isinstance(v, float)) + f" (written to {args.o})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``nndiff`` parser (documentation/reference/nndiff.md is generated from it)."""
    parser = argparse.ArgumentParser(prog="nndiff", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("env", help="print the shell line that lets nnU-Net find our trainers: "
                                   "eval \"$(nndiff env)\"")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("trainers", help="list the trainers (-tr names) this package provides")
    p.set_defaults(func=cmd_trainers)

    p = sub.add_parser("make-synthetic", help="write a small synthetic 4-channel tumour dataset (nnU-Net raw)")
    p.add_argument("--raw", help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("-d", type=int, default=990, help="dataset id (default 990)")
    p.add_argument("--name", default="NNDiffSynthetic")
    p.add_argument("-n", type=int, default=8, help="training cases (default 8)")
    p.add_argument("--n-test", type=int, default=2, help="test cases, written to imagesTs/labelsTs")
    p.add_argument("--shape", type=int, nargs=3, default=(32, 40, 36), metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_make_synthetic)

    from .dataset_conversion.commands import register as register_brats
    register_brats(sub)
    from .evaluation.commands import register as register_evaluation
    register_evaluation(sub)
    from .dataset_conversion.multirater import register as register_multirater
    register_multirater(sub)
    from .grid import register as register_grid
    register_grid(sub)

    p = sub.add_parser("evaluate-samples", help="MoDiff: GED_n, HM-IoU_n, NCC_n, CI_n of the samples written by "
                                                "'nndiff predict --samples-out' against the raters' masks")
    p.add_argument("samples_dir", help="the <output>/samples folder")
    p.add_argument("raters_dir", help="the raters' masks, <case>_rater<r>.nii.gz (e.g. $nnUNet_raw/<dataset>/"
                                      "labelsTsRaters)")
    p.add_argument("-o", required=True, help="CSV to write (a .json with the same stem is written beside it)")
    p.add_argument("-n", type=int, help="use the first n samples of each case (default: all)")
    p.set_defaults(func=cmd_evaluate_samples)

    p = sub.add_parser("predict", help="nnUNetv2_predict with diffusion options as flags; every other argument "
                                       "goes to nnUNetv2_predict unchanged",
                       epilog="example: nndiff predict --steps 10 --sampler ddim -i imagesTs -o pred -d 501 "
                              "-c 3d_fullres -f 0 -tr nnUNetTrainerNNDM")
    p.add_argument("--steps", type=int, help="reverse diffusion steps (NNDIFF_STEPS)")
    p.add_argument("--samples", type=int, help="samples per window (NNDIFF_SAMPLES): averaged or fused into one "
                                                "mask; MoDiff: a set of diverse masks; ReCoSeg: 1 only")
    p.add_argument("--seed", type=int, help="sampling seed (NNDIFF_SEED)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="NNDIFF_SAMPLER")
    p.add_argument("--tta-refine", choices=("window", "mirror"), help="NNDIFF_TTA_REFINE")
    p.add_argument("--fusion", choices=("mean", "staple"), help="NNDIFF_FUSION")
    p.add_argument("--no-refine", action="store_true", help="backbone output only (NNDIFF_REFINE=0)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write voxel-wise uncertainty maps (entropy of the fused probabilities) to "
                        "<output>/uncertainty/")
    p.add_argument("--residuals", action="store_true",
                   help="ReCoSeg: also write the residual maps |synthetic T1ce - T1ce| to <output>/residuals/")
    p.add_argument("--missing", help="ReCoSeg: comma-separated input channel indices to treat as missing "
                                     "(NNDIFF_MISSING)")
    p.add_argument("--discrepancy", action="store_true",
                   help="DDMD: also write the inter-discrepancy map X of every case and the per-case inter/intra "
                        "discrepancy scores to <output>/discrepancy/")
    p.add_argument("--samples-out", action="store_true",
                   help="MoDiff: also write the binarised samples to <output>/samples/<case>_sample<i>.nii.gz")
    p.add_argument("--threshold", type=float, help="MoDiff: cut every sample of --samples-out at this probability "
                                                   "(the paper's §4.1 reading; default: the trainer config's "
                                                   "sample_reading and binarize_threshold, the paper's 0.9)")
    p.set_defaults(func=cmd_predict, passthrough=True)

    p = sub.add_parser("demo", help="the whole road on BraTS-layout phantoms: convert, plan, train stock nnU-Net and "
                                    "NNDM at the same budget, predict with and without refinement, evaluate, "
                                    "back-convert (about 10 min on 2 CPU cores)")
    p.add_argument("--workdir", default="nndiff_demo", help="folder for raw/preprocessed/results (default "
                                                            "./nndiff_demo); re-running reuses finished steps")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    p.add_argument("--variant", default="demo", help="trainer variant to train (default: demo; tiny is faster)")
    p.add_argument("--all-heads", action="store_true", help="train and compare every head (MedSegDiff, ReCoSeg, "
                   "MoDiff, DDMD too), all at the same budget, with ReCoSeg's residual maps: the full tour")
    p.set_defaults(func=None)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "predict":
            return cmd_predict(args, rest)
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(Path(args.workdir), fresh=args.fresh, variant=args.variant, all_heads=args.all_heads)
        return args.func(args)
    except NNDiffError as e:
        print(f"nndiff {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nndiff {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
