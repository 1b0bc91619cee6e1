"""The trainers' torch.compile path: does it build, train each stage and predict, and what does it cost?

    python -m benchmarks.compile_check [--workdir bench_work] [--backend inductor|eager] [--repeats 3]
                                       [nndm medsegdiff …]

On the speed benchmark's synthetic dataset (made and planned if missing), for each head: its ``compiled_parts``
are compiled in place; the state-dict keys must stay plain (checkpoints load without torch.compile); then
``--repeats`` train steps of each stage on one real augmented batch from nnU-Net's data loader (under nnU-Net's
autocast on CUDA), and as many predictions of one case with nnU-Net's predictor (8 mirrors, DDIM 5 steps). Prints
each step's seconds: the first holds the compilation. Exits non-zero when a loss or a prediction is not finite, a
state-dict key changed, or dynamo broke a compiled part's graph (each break is a Python fallback, and a sign the
part will recompile).

Who compiles: on CUDA with the default backend, the trainer itself, built with nnUNet_compile=1 as
``nnUNetv2_train`` builds it (the path users take). On the CPU nnU-Net never compiles (nnUNetTrainer._do_i_compile),
so the script calls the trainer's ``compile_parts()`` itself: that checks the same graphs through inductor's CPU code
generation, not CUDA's kernels or AMP. ``--backend eager`` only captures the graphs (dynamo, no code generation):
the quick check of graph breaks, seconds per head instead of minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .speed import TRAINERS, _env, _sync, device, prepare, stock_head_case


def _timed(fn) -> tuple[float, object]:
    _sync()
    t = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - t, result


def check(head: str, backend: str = "inductor", repeats: int = 3) -> list[str]:
    """Compile, train and predict one head; return what went wrong (nothing when all is well)."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters
    problems = []
    dev = device()
    by_trainer = dev.type == "cuda" and backend == "inductor"
    torch._dynamo.reset()
    counters.clear()
    stock, batch, tr, _, predict = stock_head_case(TRAINERS[head], compile_head=by_trainer)
    stock.on_train_end()  # the stock trainer only supplies the batch
    net = tr.unwrapped_network()
    if by_trainer:
        if any(getattr(net, part)._compiled_call_impl is None for part in tr.compiled_parts):
            problems.append(f"{head}: initialize() with nnUNet_compile=1 on CUDA did not compile its parts")
    else:
        tr.compile_parts(backend=backend)
    if any("_orig_mod" in k for k in net.state_dict()):
        problems.append(f"{head}: compiling changed the state-dict keys")
    who = "by initialize() (nnUNet_compile=1)" if by_trainer else f"by compile_parts(backend={backend!r})"
    print(f"[{head}] compiled in place {who} on {dev}: {', '.join(tr.compiled_parts)}", flush=True)
    for label, epoch, b in tr.stage_batches(batch):
        tr.current_epoch = epoch
        tr.lr_scheduler.step(epoch)
        runs = [_timed(lambda: tr.train_step(b)["loss"]) for _ in range(repeats)]
        loss = runs[-1][1]
        if not np.isfinite(loss):
            problems.append(f"{head}: loss {loss} in {label}")
        print(f"[{head}] train {label}: steps {', '.join(f'{s:.3f}' for s, _ in runs)} s, loss {loss:.3f}", flush=True)
    net.eval()
    if hasattr(net, "refiner_updates"):
        net.refiner_updates.fill_(1)  # NNDM: refine as a trained model does
    tr.set_deep_supervision_enabled(False)
    net.set_sampling(replace(tr.sampling_defaults(), sampler="ddim", steps=5, samples=1))
    runs = [_timed(lambda: predict(net)) for _ in range(repeats)]
    if not bool(torch.isfinite(runs[-1][1]).all()):
        problems.append(f"{head}: non-finite prediction")
    print(f"[{head}] predict DDIM 5 steps: {', '.join(f'{s:.3f}' for s, _ in runs)} s", flush=True)
    return problems + graph_breaks(head)


def graph_breaks(head: str) -> list[str]:
    """One problem per distinct graph break dynamo counted since ``torch._dynamo.utils.counters`` was cleared."""
    from torch._dynamo.utils import counters
    return [f"{head}: {count} graph break(s) in a compiled part: {' '.join(reason.split())[:500]}"
            for reason, count in counters["graph_break"].items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("heads", nargs="*", metavar="HEAD", help=f"heads to check (default: all of {', '.join(TRAINERS)})")
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                    help="torch.compile backend (default inductor, what nnU-Net uses); eager: graph capture only")
    ap.add_argument("--repeats", type=int, default=3, help="train steps per stage and predictions (default 3; the "
                    "first holds the compilation)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1; got {args.repeats}")
    unknown = sorted(set(args.heads) - set(TRAINERS))
    if unknown:  # checked here: argparse's choices refuse an empty nargs="*" list on Python 3.11
        ap.error(f"unknown head(s) {', '.join(unknown)}: choose from {', '.join(TRAINERS)}")
    workdir = args.workdir.resolve()
    prepare(workdir, (32, 40, 36))
    os.environ.update(_env(workdir))  # nnUNet_compile=0: only the heads are compiled, by check()
    problems = [p for head in args.heads or list(TRAINERS) for p in check(head, args.backend, args.repeats)]
    for p in problems:
        print(f"FAILED {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
