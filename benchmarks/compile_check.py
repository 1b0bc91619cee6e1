"""The trainers' torch.compile path on CUDA: does it build, train each stage and predict, and what does it cost?

    python -m benchmarks.compile_check [--workdir bench_work] [nndm medsegdiff recoseg modiff ddmd]

Needs a GPU (nnU-Net never compiles on the CPU). On the speed benchmark's synthetic dataset (made and planned if
missing), for each head: the trainer is built with nnUNet_compile=1, so ``initialize()`` compiles its
``compiled_parts`` in place; the state-dict keys must stay plain (checkpoints load without torch.compile); then 3
train steps of each stage on one real augmented batch from nnU-Net's data loader (under nnU-Net's autocast), and 3
predictions of one case with nnU-Net's predictor (8 mirrors, DDIM 5 steps). Prints each step's seconds: the first
holds the compilation. Exits non-zero when a loss or a prediction is not finite or a state-dict key changed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .nndm_cost import _env, _sync, prepare, stock_head_case
from .speed import TRAINERS, _train_batches


def _timed(fn) -> tuple[float, object]:
    _sync()
    t = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - t, result


def check(head: str) -> list[str]:
    """Compile, train and predict one head; return what went wrong (nothing when all is well)."""
    import numpy as np
    import torch
    problems = []
    stock, batch, tr, _, predict = stock_head_case(TRAINERS[head], compile_head=True)
    stock.on_train_end()  # the stock trainer only supplies the batch
    net = tr.unwrapped_network()
    if any("_orig_mod" in k for k in net.state_dict()):
        problems.append(f"{head}: compiling changed the state-dict keys")
    print(f"[{head}] compiled in place: {', '.join(tr.compiled_parts)}", flush=True)
    for label, epoch, b in _train_batches(head, tr, batch):
        tr.current_epoch = epoch
        tr.lr_scheduler.step(epoch)
        runs = [_timed(lambda: tr.train_step(b)["loss"]) for _ in range(3)]
        loss = runs[-1][1]
        if not np.isfinite(loss):
            problems.append(f"{head}: loss {loss} in {label}")
        print(f"[{head}] train {label}: steps {', '.join(f'{s:.3f}' for s, _ in runs)} s, loss {loss:.3f}", flush=True)
    net.eval()
    if hasattr(net, "refiner_updates"):
        net.refiner_updates.fill_(1)  # NNDM: refine as a trained model does
    tr.set_deep_supervision_enabled(False)
    net.set_sampling(replace(tr.sampling_defaults(), sampler="ddim", steps=5, samples=1))
    runs = [_timed(lambda: predict(net)) for _ in range(3)]
    if not bool(torch.isfinite(runs[-1][1]).all()):
        problems.append(f"{head}: non-finite prediction")
    print(f"[{head}] predict DDIM 5 steps: {', '.join(f'{s:.3f}' for s, _ in runs)} s", flush=True)
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("heads", nargs="*", default=list(TRAINERS), choices=list(TRAINERS))
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.compile_check needs a CUDA GPU: nnU-Net does not compile on the CPU "
                         "(nnUNetTrainer._do_i_compile), so there is nothing to check here")
    workdir = args.workdir.resolve()
    prepare(workdir, (32, 40, 36))
    os.environ.update(_env(workdir))  # nnUNet_compile=0: only the heads are compiled, by stock_head_case
    problems = [p for head in args.heads for p in check(head)]
    for p in problems:
        print(f"FAILED {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
