"""Speed of every head against nnU-Net's stock nnUNetTrainer: same plans, same batch, same case, same process.

    python -m benchmarks.speed [--workdir DIR] [--heads nndm medsegdiff recoseg] [--setting default fast]

For each head, one child process (so its peak RSS is its own) measures:
- the stock train step and the head's train step in each of its stages, on one real augmented batch from
  nnU-Net's data loader (TRAIN_STEP_METHOD below: interleaved, median of 5);
- nnU-Net's predictor (sliding window, Gaussian, 8-mirror TTA) on one preprocessed case: the stock network
  (3 repeats after a warm-up) and the head at each requested setting (once, after an untimed warm-up at one DDIM
  step with the same shapes: the defaults can take minutes). "default" is the
  trainer config as shipped (no NNDIFF_* variables); "fast" is the documented faster setting (FAST below).
  Always: 1 and 5 DDIM steps × 1 sample, whose difference gives the cost of one denoiser pass per window, and the
  default setting's time extrapolated from it (marked EXTRAPOLATED: it is not a measurement).
Untrained weights: the cost does not depend on their values. Prints one JSON object per head; a failed
measurement raises, nothing is filled in.
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

from .nndm_cost import _env, _sync, _time, device, prepare, stock_head_case


def _once(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


TRAINERS = {"nndm": "nnUNetTrainerNNDM", "medsegdiff": "nnUNetTrainerMedSegDiff", "recoseg": "nnUNetTrainerReCoSeg",
            "modiff": "nnUNetTrainerMoDiff", "ddmd": "nnUNetTrainerDDMD"}
# the documented faster prediction setting (NNDIFF_* values) of each head whose default costs more than 5x the
# stock prediction, see README "Cost". NNDM has none: its default is the fast one (nnUNetTrainerNNDM_paper is not).
FAST = {"medsegdiff": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10", "NNDIFF_SAMPLES": "1"},
        "recoseg": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10"},
        "modiff": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10", "NNDIFF_SAMPLES": "4"},
        "ddmd": {"NNDIFF_SAMPLER": "ddim", "NNDIFF_STEPS": "10", "NNDIFF_SAMPLES": "1"}}


def _train_batches(head: str, trainer, batch) -> list[tuple[str, int, dict]]:
    """(stage label, epoch that selects the stage, batch) for each training stage of ``head``."""
    import torch
    if head == "nndm":
        s1, s2, _ = trainer.stage_epochs
        return [("stage 1 (nnU-Net)", 0, batch), ("stage 2 (refiner)", s1, batch), ("stage 3 (joint)", s1 + s2, batch)]
    if head in ("medsegdiff", "modiff"):  # no deep supervision: the full-resolution target
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        return [("(one stage)", 0, {"data": batch["data"], "target": target})]
    if head == "recoseg":
        with_residual = {"data": torch.cat([batch["data"], batch["data"][:, :1].abs()], 1), "target": batch["target"]}
        return [("stage 1 (synthesis)", 0, batch), ("stage 2 (segmentation)", trainer.stage_epochs[0], with_residual)]
    if head == "ddmd":
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        b = {"data": batch["data"], "target": target}
        return [("stage 1 (autoencoders)", 0, b), ("stage 2 (diffusion)", trainer.stage_epochs[0], b)]
    raise ValueError(f"no benchmark adapter for head {head!r}")


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


def measure(head: str, settings: list[str]) -> dict:
    import torch

    from nnunet_diffusion.inference.options import options_from_env
    torch.set_num_threads(os.cpu_count() or 1)
    stock, batch, trainer, data, predict = stock_head_case(TRAINERS[head])
    out = _Progress(head)
    out |= {"head": head, "trainer": TRAINERS[head], "case_shape": list(data.shape[1:]),
            "patch_size": list(trainer.configuration_manager.patch_size), "batch_size": trainer.batch_size}
    trainer.network.train()
    steps = {"train_step nnUNetTrainer": lambda: stock.train_step(batch)}
    for label, epoch, b in _train_batches(head, trainer, batch):
        steps[f"train_step {label}"] = lambda epoch=epoch, b=b: _head_step(trainer, epoch, b)
    for key, seconds in interleaved_medians(steps, TRAIN_ROUNDS).items():
        out[key] = seconds
    stock.on_train_end()
    net = trainer.unwrapped_network().eval()
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
    out["predict cost of one denoiser pass per window (from 1 and 5 DDIM steps)"] = per_pass
    out[f"predict default ({defaults.sampler}, {defaults.steps} steps x {defaults.samples} samples), "
        f"EXTRAPOLATED"] = timed[1] + per_pass * (defaults.steps * defaults.samples - 1)
    for setting in settings:
        if setting == "fast" and head not in FAST:
            continue
        opts = options_from_env(defaults, T, FAST[head] if setting == "fast" else {})
        net.set_sampling(opts)
        _warm_up(net, predict)
        out[f"predict {setting} ({opts.sampler}, {opts.steps} steps x {opts.samples} samples)"] = \
            _once(lambda: predict(net))
    out["peak RSS (GB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    dev = device()
    out["device"] = str(dev)
    if dev.type == "cuda":
        out["peak GPU memory (GB)"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return dict(out)


def run_heads(workdir: Path, heads: list[str], settings: list[str], partial: Path | None = None) -> list[dict]:
    """Each head in its own process; raises if one fails. ``partial``: each head's result is appended there (one JSON
    line) as soon as it is measured, so that a run stopped half-way keeps what it measured; the caller removes it."""
    results = []
    for head in heads:
        cmd = [sys.executable, "-m", "benchmarks.speed", "--workdir", str(workdir), "--child", head,
               "--setting", *settings]
        proc = subprocess.run(cmd, env=_env(workdir), stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"speed benchmark of {head} failed (exit {proc.returncode}); its output is above")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 40, 36))
    ap.add_argument("--heads", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    ap.add_argument("--setting", nargs="+", default=["default", "fast"], choices=["default", "fast"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()
    if args.child:
        os.environ.update(_env(args.workdir))
        print(json.dumps(measure(args.child, args.setting)))
        return 0
    prepare(args.workdir, args.shape)
    for r in run_heads(args.workdir, args.heads, args.setting):
        print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
