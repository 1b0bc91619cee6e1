"""Speed of every head against nnU-Net's stock nnUNetTrainer: same plans, same batch, same case, same process.

    python -m benchmarks.speed [--workdir DIR] [--shape Z Y X] [--heads nndm medsegdiff ...] [--setting default fast]
                               [--trainer NAME] [--sampling SAMPLER STEPS SAMPLES] [--per-mirror [K ...]]
                               [--repeats N] [--out FILE]

Makes (or reuses) the synthetic dataset in DIR and plans it with nnUNetv2_plan_and_preprocess. Then, for each head,
one child process (so its peak RSS is its own) measures:
- the stock train step and the head's train step in each of its stages, on one real augmented batch from
  nnU-Net's data loader (TRAIN_STEP_METHOD below: interleaved, median of 5);
- the parameters of the head's network and of each of its compiled parts (NNDM: backbone and refiner);
- nnU-Net's predictor (sliding window, Gaussian, 8-mirror TTA) on one preprocessed case: the stock network
  (3 repeats after a warm-up) and the head at each requested setting (once, after an untimed warm-up at one DDIM
  step with the same shapes: the defaults can take minutes). "default" is the
  trainer config as shipped (no NNDIFF_* variables); "fast" is the documented faster setting (FAST below).
  Always: 1 and 5 DDIM steps × 1 sample, whose difference gives the cost of one denoiser pass per window, and the
  default setting's time extrapolated from it (marked EXTRAPOLATED: it is not a measurement).
Options for single measurements:
- --trainer NAME: measure this trainer (e.g. a variant such as nnUNetTrainerMedSegDiff_L) instead of its head's
  shipped one; only that head is measured.
- --sampling SAMPLER STEPS SAMPLES: also predict at this setting (e.g. ddpm 100 5).
- --per-mirror [K ...]: NNDM: also predict with the refinement off, and refined with K DDIM steps (default 1 5 10)
  sampling once per window and once per mirror (NNDIFF_TTA_REFINE=window / mirror).
- --repeats N: these extra predictions (and the settings') are the mean of N timed runs (default 1).
- --out FILE: also write the results, with the machine and versions, as JSON.
Untrained weights: the cost does not depend on their values. Prints one JSON object per head, then the table of
ratios to the stock trainer; a failed measurement raises, nothing is filled in.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from nnunet_diffusion import registry

DATASET_ID = 990
DATASET = "Dataset990_NNDiffSynthetic"
ONE_PASS = "predict cost of one denoiser pass per window (from 1 and 5 DDIM steps)"


def _env(workdir: Path) -> dict:
    from nnunet_diffusion.environment import environment_with_trainers
    env = environment_with_trainers()
    env.update(nnUNet_raw=str(workdir / "raw"), nnUNet_preprocessed=str(workdir / "preprocessed"),
               nnUNet_results=str(workdir / "results"), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
               nnUNet_compile="0")
    return {k: v for k, v in env.items() if not k.startswith("NNDIFF_")}


def prepare(workdir: Path, shape) -> None:
    from nnunet_diffusion.dataset_conversion.synthetic import make_synthetic_dataset
    env = _env(workdir)
    if not (workdir / "raw" / DATASET).exists():
        make_synthetic_dataset(workdir / "raw", DATASET_ID, num_train=6, num_test=1, shape=tuple(shape))
    else:  # a reused workdir must hold cases of the asked shape, else the figures would be for another size
        import SimpleITK as sitk
        first = sorted((workdir / "raw" / DATASET / "imagesTr").glob("*.nii.gz"))[0]
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(first))
        reader.ReadImageInformation()
        found = tuple(reversed(reader.GetSize()))
        if found != tuple(shape):
            raise SystemExit(f"{workdir} holds synthetic cases of shape {found} ({first.name}), not the asked "
                             f"{tuple(shape)}: pass another --workdir for this shape")
    if not (workdir / "preprocessed" / DATASET / "nnUNetPlans.json").exists():
        subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                        "-c", "3d_fullres", "-npfp", "1", "-np", "1"], env=env, check=True,
                       stdout=subprocess.DEVNULL)


def device():
    """Where the benchmarks run: NNDIFF_BENCH_DEVICE (cpu / cuda), else CUDA when there is one."""
    import torch
    return torch.device(os.environ.get("NNDIFF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def _trainer(name: str, fold: int = 0, compile: bool = False):
    """The trainer ``name`` on the benchmark's plans, initialised; ``compile``: with nnUNet_compile=1 while it
    initialises (on CUDA the trainers then compile their ``compiled_parts`` in place), else as the environment says."""
    from nnunet_diffusion.trainers import TRAINERS
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    pre = Path(str(nnUNet_preprocessed)) / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    cls = nnUNetTrainer if name == "nnUNetTrainer" else TRAINERS[name]
    tr = cls(plans, "3d_fullres", fold, json.loads((pre / "dataset.json").read_text()), device())
    if not compile:
        tr.initialize()
        return tr
    before = os.environ.get("nnUNet_compile")
    os.environ["nnUNet_compile"] = "1"
    try:
        tr.initialize()
    finally:
        if before is None:
            del os.environ["nnUNet_compile"]
        else:
            os.environ["nnUNet_compile"] = before
    return tr


def _sync() -> None:
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeats


def stock_head_case(trainer: str, compile_head: bool = False):
    """What the speed measurements and benchmarks.compile_check use: the stock nnUNetTrainer (data loader
    started), one real augmented batch, the head's trainer (fold 1, untrained weights; ``compile_head``: built with
    nnUNet_compile=1), one preprocessed case, and ``predict(network)`` running nnU-Net's predictor (sliding window,
    Gaussian, 8 mirrors) on that case. Call ``stock.on_train_end()`` after."""
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    stock = _trainer("nnUNetTrainer")
    stock.on_train_start()
    batch = next(stock.dataloader_train)
    head = _trainer(trainer, fold=1, compile=compile_head)
    head.network.train()
    folder = head.preprocessed_dataset_folder
    ds = infer_dataset_class(folder)(folder)
    data = torch.from_numpy(np.asarray(ds.load_case(ds.identifiers[0])[0][:]))

    dev = device()

    def predict(network):
        p = nnUNetPredictor(device=dev, perform_everything_on_device=dev.type == "cuda", allow_tqdm=False)
        p.manual_initialization(network, head.plans_manager, head.configuration_manager, None, head.dataset_json,
                                "bench", (0, 1, 2))
        return p.predict_sliding_window_return_logits(data)

    return stock, batch, head, data, predict


def _once(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


TRAINERS = {h.name: h.trainer for h in registry.DIFFUSION_HEADS}
# the documented faster prediction setting (NNDIFF_* values) of each head whose default costs more than 5x the
# stock prediction, see documentation/how_to/measure_cost.md. NNDM has none: its default is the fast one (nnUNetTrainerNNDM_paper is not).
FAST = {"medsegdiff": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10", "NNDIFF_SAMPLES": "1"},
        "recoseg": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10"},
        "modiff": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10", "NNDIFF_SAMPLES": "4"},
        "ddmd": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10", "NNDIFF_SAMPLES": "1"}}


def _warm_up(net, predict) -> None:
    """One untimed prediction at the network's sampling setting cut to one DDIM step: the same tensor shapes (samples
    included) as the timed run, so that first-call costs (cuDNN's algorithm search under nnU-Net's
    cudnn.benchmark, allocator growth) stay out of the timing; the setting is restored after."""
    timed_setting = net.sampling
    net.set_sampling(replace(timed_setting, sampler="ddim", steps=1))
    predict(net)
    net.set_sampling(timed_setting)


class _Progress(dict):
    """The measurements dict, which says each one on stderr as it lands (a head takes minutes to hours)."""

    def __init__(self, head: str, **kw):
        super().__init__(**kw)
        self.head, self.t0 = head, time.perf_counter()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if isinstance(value, float) and key.startswith(("train_step", "predict")):
            print(f"[speed {self.head} +{time.perf_counter() - self.t0:.0f} s] {key}: {value:.3f} s", file=sys.stderr,
                  flush=True)


TRAIN_ROUNDS = 5
TRAIN_STEP_METHOD = (f"median of {TRAIN_ROUNDS} rounds after a warm-up round, each round one stock step then one step of "
                     "each stage, so that drifts of the machine's speed hit stock and head alike")


def _head_step(trainer, epoch: int, batch) -> None:
    trainer.current_epoch = epoch  # selects the stage
    trainer.lr_scheduler.step(epoch)
    trainer.train_step(batch)


def interleaved_medians(fns: dict, rounds: int) -> dict:
    """{name: median seconds of ``fn()``} over ``rounds`` rounds that each call every fn once, after one untimed
    warm-up round. Interleaving puts the stock step and the head's steps under the same machine conditions (on 2
    shared CPU cores, back-to-back blocks of one then the other drifted by 20% between runs)."""
    import statistics
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _predict_time(net, predict, opts, repeats: int) -> float:
    """Seconds of ``predict(net)`` at sampling ``opts``: the mean of ``repeats`` timed runs after an untimed warm-up
    at one DDIM step with the same shapes."""
    net.set_sampling(opts)
    _warm_up(net, predict)
    return sum(_once(lambda: predict(net)) for _ in range(repeats)) / repeats


def _param_counts(trainer, net) -> dict:
    out = {"params": sum(p.numel() for p in net.parameters())}
    for part in trainer.compiled_parts:
        out[f"params {part}"] = sum(p.numel() for p in getattr(net, part).parameters())
    return out


def measure(head: str, settings: list[str], trainer_name: str | None = None, sampling: tuple | None = None,
            per_mirror: list[int] | None = None, repeats: int = 1) -> dict:
    """The measurements of one head (see the module docstring) in this process. ``trainer_name``: a variant to
    measure instead of TRAINERS[head]; ``sampling``: (sampler, steps, samples) to predict at as well;
    ``per_mirror``: NNDM's refinement off and per window / per mirror at these DDIM steps."""
    import torch

    from nnunet_diffusion.inference.options import options_from_env
    torch.set_num_threads(os.cpu_count() or 1)
    name = trainer_name or TRAINERS[head]
    stock, batch, trainer, data, predict = stock_head_case(name)
    out = _Progress(head)
    out |= {"head": head, "trainer": name, "case_shape": list(data.shape[1:]),
            "patch_size": list(trainer.configuration_manager.patch_size), "batch_size": trainer.batch_size}
    trainer.network.train()
    steps = {"train_step nnUNetTrainer": lambda: stock.train_step(batch)}
    for label, epoch, b in trainer.stage_batches(batch):  # each trainer knows its stages
        steps[f"train_step {label}"] = lambda epoch=epoch, b=b: _head_step(trainer, epoch, b)
    for key, seconds in interleaved_medians(steps, TRAIN_ROUNDS).items():
        out[key] = seconds
    stock.on_train_end()
    net = trainer.unwrapped_network().eval()
    out |= _param_counts(trainer, net)
    if hasattr(net, "refiner_updates"):
        net.refiner_updates.fill_(1)  # NNDM: refine as a trained model does
    stock.set_deep_supervision_enabled(False)
    trainer.set_deep_supervision_enabled(False)
    out["predict nnUNetTrainer"] = _time(lambda: predict(stock.network.eval()), 3)
    T = net.schedule.num_train_timesteps
    defaults = trainer.sampling_defaults()
    timed = {}
    for steps in (1, 5):  # the cost of one denoiser pass per window, for the extrapolation below
        net.set_sampling(replace(defaults, sampler="ddim", steps=steps, samples=1))
        if steps == 1:
            _warm_up(net, predict)
        timed[steps] = _once(lambda: predict(net))
    per_pass = max(timed[5] - timed[1], 0.0) / 4
    out[ONE_PASS] = per_pass
    out[f"predict default ({defaults.sampler}, {defaults.steps} steps x {defaults.samples} samples), "
        f"EXTRAPOLATED"] = timed[1] + per_pass * (defaults.steps * defaults.samples - 1)
    for setting in settings:
        if setting == "fast" and head not in FAST:
            continue
        opts = options_from_env(defaults, T, FAST[head] if setting == "fast" else {})
        out[f"predict {setting} ({opts.sampler}, {opts.steps} steps x {opts.samples} samples)"] = \
            _predict_time(net, predict, opts, repeats)
    if sampling is not None:
        sampler, k, n = sampling
        opts = replace(defaults, sampler=sampler, steps=int(k), samples=int(n)).validate(T, source="--sampling")
        out[f"predict --sampling ({opts.sampler}, {opts.steps} steps x {opts.samples} samples)"] = \
            _predict_time(net, predict, opts, repeats)
    if per_mirror:
        out["predict refine off"] = _predict_time(net, predict, replace(defaults, refine=False), repeats)
        for k in per_mirror:
            for mode in ("window", "mirror"):
                opts = replace(defaults, refine=True, sampler="ddim", steps=k, tta_refine=mode).validate(T)
                out[f"predict refine per {mode} (ddim, {k} steps x {opts.samples} samples)"] = \
                    _predict_time(net, predict, opts, repeats)
    out["peak RSS (GB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    dev = device()
    out["device"] = str(dev)
    if dev.type == "cuda":
        out["peak GPU memory (GB)"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return dict(out)


def _child_options(trainer_name: str | None, sampling: tuple | None, per_mirror: list[int] | None,
                   repeats: int) -> list[str]:
    """The command-line options that hand ``measure``'s extra arguments to a child process."""
    opts = ["--repeats", str(repeats)]
    if trainer_name:
        opts += ["--trainer", trainer_name]
    if sampling is not None:
        opts += ["--sampling", *map(str, sampling)]
    if per_mirror:
        opts += ["--per-mirror", *map(str, per_mirror)]
    return opts


def run_heads(workdir: Path, heads: list[str], settings: list[str], partial: Path | None = None,
              trainer_name: str | None = None, sampling: tuple | None = None, per_mirror: list[int] | None = None,
              repeats: int = 1) -> list[dict]:
    """Each head in its own process; raises if one fails. ``partial``: each head's result is appended there (one JSON
    line) as soon as it is measured, so that a run stopped half-way keeps what it measured; the caller removes it.
    The other arguments are ``measure``'s; ``per_mirror`` applies to NNDM only."""
    results = []
    for head in heads:
        cmd = [sys.executable, "-m", "benchmarks.speed", "--workdir", str(workdir), "--child", head,
               "--setting", *settings,
               *_child_options(trainer_name, sampling,
                                                                          per_mirror if registry.head(head).refinement_toggle
                                                                          else None, repeats)]
        proc = subprocess.run(cmd, env=_env(workdir), stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"speed benchmark of {head} failed (exit {proc.returncode}); its output is above")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    return results


def _sec(v: float) -> str:
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"  # GPU steps take tens of milliseconds


def speed_table(results: list[dict]) -> str:
    """The Markdown table of ``measure``'s results: seconds of each step and prediction and their ratio to the stock
    trainer's measured in the same process."""
    lines = ["| head | measurement | seconds | × stock |", "|---|---|---|---|"]
    for r in results:
        st, sp = r["train_step nnUNetTrainer"], r["predict nnUNetTrainer"]
        lines.append(f"| {r['head']} | train step, stock nnUNetTrainer | {_sec(st)} | |")
        for k, v in r.items():
            if k.startswith("train_step ") and k != "train_step nnUNetTrainer":
                lines.append(f"| {r['head']} | {k.replace('train_step', 'train step')} | {_sec(v)} | {v / st:.2f} |")
        lines.append(f"| {r['head']} | predict one case, stock nnUNetTrainer | {_sec(sp)} | |")
        for k, v in r.items():
            if k.startswith("predict ") and k != "predict nnUNetTrainer":
                ratio = "" if k == ONE_PASS else f"{v / sp:.2f}"
                if "EXTRAPOLATED" in k and r.get(ONE_PASS, 1) <= 0:
                    k += " (a lower bound: 5 DDIM steps were not slower than 1 in this run, within its timing noise)"
                lines.append(f"| {r['head']} | {k} | {_sec(v)} | {ratio} |")
        lines.append(f"| {r['head']} | peak RSS of this process (GB) | {r['peak RSS (GB)']:.2f} | |")
        if "peak GPU memory (GB)" in r:
            lines.append(f"| {r['head']} | peak GPU memory (GB) | {r['peak GPU memory (GB)']:.2f} | |")
    return "\n".join(lines)


def _head_of_trainer(name: str) -> str:
    from nnunet_diffusion.trainers import TRAINERS as ALL
    head = getattr(ALL.get(name), "head", None)
    if head not in TRAINERS:
        raise SystemExit(f"--trainer {name}: not a trainer of one of the heads ({', '.join(TRAINERS.values())} or "
                         f"one of their variants in trainer_configs/)")
    return head


def _sampling_arg(raw: list[str]) -> tuple:
    from nnunet_diffusion.errors import NNDiffError
    from nnunet_diffusion.inference.options import SamplingOptions
    sampler, steps, samples = raw
    try:
        steps, samples = int(steps), int(samples)
    except ValueError:
        raise SystemExit(f"--sampling {' '.join(raw)}: STEPS and SAMPLES must be integers") from None
    opts = SamplingOptions(sampler=sampler.lower(), steps=steps, samples=samples)
    try:
        opts.validate(10 ** 9, source="--sampling")  # steps against the model's T: in the child
    except NNDiffError as e:
        raise SystemExit(str(e)) from None
    return opts.sampler, opts.steps, opts.samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 40, 36))
    ap.add_argument("--heads", nargs="+", choices=list(TRAINERS), help="default: every head (with --trainer: its)")
    ap.add_argument("--setting", nargs="*", default=["default", "fast"], choices=["default", "fast"],
                    help="prediction settings to time (none: only the 1 and 5 DDIM steps and the extras)")
    ap.add_argument("--trainer", help="measure this trainer (a variant) instead of its head's shipped one")
    ap.add_argument("--sampling", nargs=3, metavar=("SAMPLER", "STEPS", "SAMPLES"),
                    help="also predict at this sampling setting")
    ap.add_argument("--per-mirror", type=int, nargs="*", metavar="K",
                    help="NNDM: also predict with the refinement off and refined per window and per mirror at K DDIM "
                         "steps (default 1 5 10)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per prediction setting (mean; default 1)")
    ap.add_argument("--out", type=Path, help="also write the results with the machine and versions as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1; got {args.repeats}")
    sampling = _sampling_arg(args.sampling) if args.sampling else None
    per_mirror = None if args.per_mirror is None else (args.per_mirror or [1, 5, 10])
    if per_mirror and min(per_mirror) < 1:
        raise SystemExit(f"--per-mirror: DDIM steps must be >= 1; got {per_mirror}")
    if args.child:
        os.environ.update(_env(args.workdir))
        print(json.dumps(measure(args.child, args.setting, args.trainer, sampling, per_mirror, args.repeats)))
        return 0
    heads = args.heads or list(TRAINERS)
    if args.trainer:
        head = _head_of_trainer(args.trainer)
        if args.heads and args.heads != [head]:
            raise SystemExit(f"--trainer {args.trainer} is a {head} trainer; --heads {' '.join(args.heads)} "
                             f"does not fit it (leave --heads out)")
        heads = [head]
    if per_mirror and not any(registry.head(h).refinement_toggle for h in heads):
        raise SystemExit("--per-mirror times NNDM's refinement: add nndm to --heads")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    prepare(args.workdir, args.shape)
    results = run_heads(args.workdir, heads, args.setting, None, args.trainer, sampling, per_mirror, args.repeats)
    for r in results:
        print(json.dumps(r, indent=2))
    print(speed_table(results))
    if args.out:
        from nnunet_diffusion.atomic import write_text_atomic

        from .provenance import machine, versions
        meta = {"started": started, "command": " ".join(["python -m benchmarks.speed", *(argv or sys.argv[1:])]),
                "machine": machine(), "versions": versions(), "synthetic_shape": list(args.shape)}
        write_text_atomic(args.out, json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
