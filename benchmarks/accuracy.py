"""Steps–accuracy curves on the phantom benchmark: Dice and HD95 of each head against its number of sampling
steps (and samples), next to the prediction time, with the stock nnU-Net on the same cases.

    python -m benchmarks.accuracy [--workdir DIR] [--variant demo] [--steps 1 2 5 10 25 100] [--samples 1 4 16]
                                  [--samples-steps 10] [--trainer-defaults] [--heads ...] [--out accuracy.json]

The models are those of ``nndiff demo`` (BraTS 2021-layout phantoms, fold 0, the ``--variant`` trainers); the
demo's pipeline trains whatever is missing in DIR. Every setting predicts fold 0's validation cases from nnU-Net's
preprocessed data with nnU-Net's predictor (sliding window, Gaussian, 8 mirrors), exports them with nnU-Net's
export, and evaluates them with ``nndiff evaluate``'s code (BraTS regions, HD95 in mm). Sampling is DDIM: the
steps axis with one sample, the samples axis at --samples-steps steps, each head's documented faster setting
(``speed.FAST``) and, with --trainer-defaults, the head's shipped sampler; the time is the predictor's per case
(export excluded; the untimed warm-up samples with one DDIM step). Prints JSON; a failure raises.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from nnunet_diffusion import registry

from .speed import FAST
from .speed import TRAINERS as HEADS


def evaluate_cases(pred_dir: Path, raw: Path, cases: list[str]):
    """``nndiff evaluate``'s result (per case and summary) for ``cases`` in ``pred_dir`` against ``raw``'s labelsTr."""
    from nnunet_diffusion.evaluation.evaluate import evaluate_folder
    return evaluate_folder(pred_dir, raw / "labelsTr", dataset_json=raw / "dataset.json", cases=cases,
                           num_processes=1, progress=False)


def mean_metrics(res) -> dict:
    """{region: {"dice": mean, "hd95": mean}} of an evaluation result: the rows of the benchmark's tables."""
    return {region: {"dice": m["dice"]["mean"], "hd95": m["hd95"]["mean"]} for region, m in res.summary["metrics"].items()}


def fast_options(head: str):
    """``head``'s documented faster setting (``speed.FAST``) as SamplingOptions, parsed as ``nndiff predict`` parses
    its NNDIFF_* values, on top of the head's shipped sampling."""
    from nnunet_diffusion.inference.options import options_from_env
    from nnunet_diffusion.trainers import TRAINERS
    base = TRAINERS[HEADS[head]]
    return options_from_env(base.sampling_defaults(), base.hparams().num_train_timesteps, FAST[head])


def use_demo_workdir(workdir: Path) -> None:
    """Point nnU-Net (its paths and the trainer lookup) at the folders ``nndiff demo`` wrote in ``workdir``."""
    from nnunet_diffusion.environment import environment_with_trainers
    os.environ.update({k: v for k, v in environment_with_trainers().items() if k == "nnUNet_extTrainer"})
    os.environ.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
                      nnUNet_results=str(workdir / "nnUNet_results"))


def fold0_cases(workdir: Path, split: str = "val") -> list[str]:
    """Fold 0's ``split`` ("val" or "train") of the demo dataset in ``workdir`` (nnU-Net's splits_final.json)."""
    from nnunet_diffusion.demo import DATASET
    return json.loads((workdir / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())[0][split]


def preprocessed_cases(p, cases: list[str]):
    """nnU-Net's preprocessed dataset of ``cases`` for the predictor ``p``'s plans and configuration."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = Path(os.environ["nnUNet_preprocessed"]) / p.plans_manager.dataset_name / \
        p.configuration_manager.data_identifier
    return infer_dataset_class(str(folder))(str(folder), list(cases))


def _predictor(model_folder: Path, checkpoint: str = "checkpoint_final.pth"):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    p = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model_folder), (0,), checkpoint)
    return p


def finished_cases(out_dir: Path, cases: list[str]) -> dict[str, float]:
    """The cases of ``cases`` that a resumable prediction into ``out_dir`` finished, with their seconds: a case counts
    once its ``<case>.seconds`` exists, which is written after the case's segmentation was exported."""
    return {c: float((out_dir / f"{c}.seconds").read_text()) for c in cases if (out_dir / f"{c}.seconds").is_file()}


def _record_case(out_dir: Path, case: str, seconds: float) -> None:
    from nnunet_diffusion.atomic import write_text_atomic
    write_text_atomic(out_dir / f"{case}.seconds", repr(seconds))


def predict_cases(model_folder: Path, cases: list[str], out_dir: Path, sampling=None,
                  checkpoint: str = "checkpoint_final.pth", resume: bool = False, progress: str = "") -> float:
    """Predict ``cases`` (preprocessed) into ``out_dir`` with the fold-0 model's ``checkpoint``; return seconds per
    case. With ``resume``, the cases :func:`finished_cases` finds are kept (with their seconds) and the others
    predicted, each recorded as it finishes: an interrupted measurement loses one case, not all. ``progress``: a
    line per case starting with it."""
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    done = finished_cases(out_dir, cases) if resume else {}
    todo = [c for c in cases if c not in done]
    if not todo:
        return sum(done.values()) / len(cases)
    p = _predictor(model_folder, checkpoint)
    target = None if sampling is None else sampling(p.network)
    if target is not None:  # the warm-up samples with one DDIM step: it loads and allocates, its result is unused
        p.network.set_sampling(replace(target, sampler="ddim", steps=1, samples=1))
    ds = preprocessed_cases(p, todo)
    out_dir.mkdir(parents=True, exist_ok=True)
    p.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(ds.load_case(todo[0])[0][:],
                                                                        dtype=np.float32)))  # warm-up, untimed
    if target is not None:
        p.network.set_sampling(target)
    seconds = dict(done)
    for case in todo:
        data, _, _, props = ds.load_case(case)
        x = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
        t0 = time.perf_counter()
        logits = p.predict_logits_from_preprocessed_data(x)
        seconds[case] = time.perf_counter() - t0
        export_prediction_from_logits(logits, props, p.configuration_manager, p.plans_manager, p.dataset_json,
                                      str(out_dir / case), False)
        if resume:
            _record_case(out_dir, case, seconds[case])
        if progress:
            print(f"{progress}: case {len(seconds)}/{len(cases)} {seconds[case]:.1f} s", flush=True)
    return sum(seconds.values()) / len(cases)


def predict_raw_cases(p, inputs: dict[str, list[str]], out_dir: Path, progress: str = "") -> float:
    """Predict raw cases ({case: its image files}) into ``out_dir`` with the nnU-Net predictor ``p`` (its sampling
    as set), one case at a time in this process: read with the plans' reader, then nnU-Net's
    ``predict_single_npy_array`` (preprocessing, sliding window, export). Returns seconds per case, each the time of
    that call (reading excluded). Resumable like :func:`predict_cases` with ``resume``."""
    return raw_case_loop(p, inputs, out_dir, lambda image, props, case: p.predict_single_npy_array(
        image, props, None, str(out_dir / case), False), progress=progress)


def raw_case_loop(p, inputs: dict[str, list[str]], out_dir: Path, timed, save=None, progress: str = "") -> float:
    """The resumable per-case loop of :func:`predict_raw_cases` and its variants: each case not yet finished in
    ``out_dir`` is read with the plans' reader, ``timed(image, props, case)`` is timed, ``save(case, its result)``
    (if given) runs after the clock stops, and the seconds are recorded (``<case>.seconds``). Returns seconds per
    case."""
    seconds = finished_cases(out_dir, list(inputs))
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = p.plans_manager.image_reader_writer_class()
    for case, files in inputs.items():
        if case in seconds:
            continue
        image, props = reader.read_images(files)
        t0 = time.perf_counter()
        result = timed(image, props, case)
        seconds[case] = time.perf_counter() - t0
        if save is not None:
            save(case, result)
        _record_case(out_dir, case, seconds[case])
        if progress:
            print(f"{progress}: case {len(seconds)}/{len(inputs)} {seconds[case]:.1f} s", flush=True)
    return sum(seconds.values()) / len(inputs)


def sampling_grid(steps: list[int], samples: list[int], samples_steps: int) -> list[tuple[str, int, int]]:
    """(sampler, steps, samples) to measure: the steps axis with one sample, then the samples axis at
    ``samples_steps`` DDIM steps; each setting once."""
    grid = []
    for setting in [("ddim", k, 1) for k in steps] + [("ddim", samples_steps, n) for n in samples]:
        grid += [] if setting in grid else [setting]
    return grid


def needs_all_heads(heads) -> bool:
    """Whether ``nndiff demo`` must train all heads (``--all-heads``) for ``heads``: not when the demo's own heads
    (stock nnU-Net and NNDM) are all that is asked for."""
    return any(not registry.head(h).demo_default for h in heads)


def demo_parser(doc: str) -> argparse.ArgumentParser:
    """The options of every script that measures ``nndiff demo``'s models: their folder, variant and heads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_phantoms"))
    ap.add_argument("--variant", default="demo")
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    return ap


def main(argv=None) -> int:
    ap = demo_parser(__doc__)
    ap.add_argument("--steps", type=int, nargs="*", default=[1, 2, 5, 10, 25, 100])
    ap.add_argument("--samples", type=int, nargs="+", default=[1],
                    help="the samples axis: each number of samples at --samples-steps DDIM steps (the steps axis "
                         "uses 1 sample)")
    ap.add_argument("--samples-steps", type=int, default=10)
    ap.add_argument("--trainer-defaults", action="store_true",
                    help="also sample each --variant model with its head's shipped sampler, steps and samples (those "
                         "of nnUNetTrainer<Head>, e.g. the paper's DDPM): what the faster settings are compared "
                         "with; slow (about an hour on 2 CPU cores). Rows at that setting say '(trainer default)'")
    ap.add_argument("--out", default="accuracy.json", help="file name under WORKDIR/accuracy")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    from nnunet_diffusion.demo import DATASET, run_demo
    run_demo(workdir, variant=args.variant, all_heads=needs_all_heads(args.heads))  # trains what is missing
    use_demo_workdir(workdir)
    import torch

    from nnunet_diffusion.evaluation.evaluate import write_text_atomic
    from nnunet_diffusion.trainers import TRAINERS
    torch.set_num_threads(os.cpu_count() or 1)
    raw = workdir / "nnUNet_raw" / DATASET
    results_root = workdir / "nnUNet_results" / DATASET
    cases = fold0_cases(workdir)
    out_root = workdir / "accuracy"
    rows, notes = [], []

    def folder(trainer: str) -> Path:
        return results_root / f"{trainer}__nnUNetPlans__3d_fullres"

    def run(trainer: str, label: str, sampling=None, **extra):
        pred = out_root / f"{trainer}__{label.replace(' ', '_')}"
        seconds = predict_cases(folder(trainer), cases, pred, sampling)
        rows.append({"trainer": trainer, "setting": label, "seconds_per_case": seconds,
                     "metrics": mean_metrics(evaluate_cases(pred, raw, cases)), **extra})
        print(json.dumps(rows[-1]), flush=True)

    run(f"nnUNetTrainer_{args.variant}", "stock")
    for head in args.heads:
        trainer = f"{HEADS[head]}_{args.variant}"
        if registry.head(head).refinement_toggle:
            run(trainer, "refine off", lambda net: replace(net.sampling, refine=False))
        base = TRAINERS[HEADS[head]]
        defaults = base.sampling_defaults()
        grid = sampling_grid(args.steps, args.samples, args.samples_steps)
        if head in FAST:  # the documented faster setting's accuracy, always; parsed as nndiff predict parses it
            f = fast_options(head)
            grid += [] if (f.sampler, f.steps, f.samples) in grid else [(f.sampler, f.steps, f.samples)]
        if not _predictor(folder(trainer)).network.supports_samples:
            grid = [g for g in grid if g[2] == 1]
            notes.append(f"{trainer}: no samples axis (its network draws one sample per window)")
        shipped = (defaults.sampler, defaults.steps, defaults.samples)
        if args.trainer_defaults and shipped not in grid:  # the shipped sampler first: what the others are compared with
            grid.insert(0, shipped)
        for sampler, k, samples in grid:
            label = f"{sampler} {k} steps x {samples} samples"
            run(trainer, label + (" (trainer default)" if (sampler, k, samples) == shipped else ""),
                lambda net, a=sampler, k=k, s=samples: replace(net.sampling, sampler=a, steps=k, samples=s),
                steps=k, samples=samples)
    write_text_atomic(out_root / args.out, json.dumps({"cases": cases, "rows": rows, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
