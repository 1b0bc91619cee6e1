"""What MedSegDiff costs next to nnU-Net's stock nnUNetTrainer (same plans, case and machine).

    python -m benchmarks.medsegdiff_cost [--workdir DIR] [--trainer nnUNetTrainerMedSegDiff] [--steps 100]
                                         [--samples 5] [--sampler ddpm] [--repeats 1]

Train step on one real augmented batch, and nnU-Net's predictor (sliding window, Gaussian, 8 mirrors) on one
preprocessed case with the given sampling settings (default: the paper's 100 steps and our 5 samples), against
the stock network. Untrained weights: the cost does not depend on their values. Same dataset/workdir as
``benchmarks.nndm_cost``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from dataclasses import replace
from pathlib import Path

from .nndm_cost import _env, _time, prepare, stock_head_case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 40, 36))
    ap.add_argument("--trainer", default="nnUNetTrainerMedSegDiff")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()
    prepare(args.workdir, args.shape)
    os.environ.update(_env(args.workdir))
    import torch
    torch.set_num_threads(os.cpu_count() or 1)

    stock, batch, head, data, predict = stock_head_case(args.trainer)
    res = {"train_step nnUNetTrainer": _time(lambda: stock.train_step(batch), 3)}
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    res[f"train_step {args.trainer}"] = _time(lambda: head.train_step({"data": batch["data"], "target": target}), 3)
    stock.on_train_end()
    net = head.unwrapped_network().eval()
    res["params"] = sum(p.numel() for p in net.parameters())

    stock.set_deep_supervision_enabled(False)
    res["predict nnUNetTrainer"] = _time(lambda: predict(stock.network.eval()), 3)
    net.set_sampling(replace(net.sampling, steps=args.steps, samples=args.samples, sampler=args.sampler))
    key = f"predict {args.trainer} ({args.sampler}, {args.steps} steps x {args.samples} samples, once per window)"
    res[key] = _time(lambda: predict(net), args.repeats) if args.repeats > 1 else None
    if res[key] is None:  # one timed run (no warm-up) for the long default settings
        import time
        t0 = time.perf_counter()
        predict(net)
        res[key] = time.perf_counter() - t0
    res["case_shape"] = list(data.shape[1:])
    res["peak RSS (GB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps(res, indent=2))
    print(f"predict ratio: {res[key] / res['predict nnUNetTrainer']:.1f}x; train step ratio: "
          f"{res[f'train_step {args.trainer}'] / res['train_step nnUNetTrainer']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
