"""What ReCoSeg costs next to nnU-Net's stock nnUNetTrainer (same plans, case and machine).

    python -m benchmarks.recoseg_cost [--workdir DIR] [--trainer nnUNetTrainerReCoSeg] [--steps 1000 10]
                                      [--sampler ddpm ddim]

Train steps of both stages on one real augmented batch (stage 2 with the residual channel), the one-off residual
map of one preprocessed case, and nnU-Net's predictor (sliding window, Gaussian, 8 mirrors; synthesis once per
window) on that case for each (sampler, steps) pair, against the stock network. Untrained weights: the cost does
not depend on their values. Same dataset/workdir as ``benchmarks.nndm_cost``. Prints JSON and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

from .nndm_cost import _env, _time, prepare, stock_head_case


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 40, 36))
    ap.add_argument("--trainer", default="nnUNetTrainerReCoSeg")
    ap.add_argument("--steps", type=int, nargs="+", default=[1000, 10])
    ap.add_argument("--sampler", nargs="+", default=["ddpm", "ddim"])
    args = ap.parse_args(argv)
    if len(args.steps) != len(args.sampler):
        ap.error("--steps and --sampler need the same number of values (one prediction per pair)")
    args.workdir = args.workdir.resolve()
    prepare(args.workdir, args.shape)
    os.environ.update(_env(args.workdir))
    import torch

    from nnunet_diffusion.inference.residual_maps import residual_of_case
    torch.set_num_threads(os.cpu_count() or 1)

    stock, batch, head, data, predict = stock_head_case(args.trainer)
    res = {"train_step nnUNetTrainer": _time(lambda: stock.train_step(batch), 3)}
    res[f"train_step {args.trainer} stage 1 (synthesis)"] = _time(lambda: head.train_step(batch), 3)
    head.current_epoch = head.stage_epochs[0]
    with_residual = {"data": torch.cat([batch["data"], batch["data"][:, :1].abs()], 1), "target": batch["target"]}
    res[f"train_step {args.trainer} stage 2 (segmentation)"] = _time(lambda: head.train_step(with_residual), 3)
    stock.on_train_end()
    net = head.unwrapped_network().eval()
    res["params synthesiser / segmenter"] = [sum(p.numel() for p in m.parameters())
                                             for m in (net.synthesizer, net.segmenter)]
    cm = head.configuration_manager

    stock.set_deep_supervision_enabled(False)
    head.set_deep_supervision_enabled(False)
    res["predict nnUNetTrainer"] = _time(lambda: predict(stock.network.eval()), 3)
    for sampler, steps in zip(args.sampler, args.steps):
        net.set_sampling(replace(net.sampling, steps=steps, sampler=sampler))
        res[f"residual map of the case, {sampler} {steps} steps (once per case after stage 1)"] = \
            _once(lambda: residual_of_case(net, data, cm.patch_size))
        res[f"predict {args.trainer} ({sampler}, {steps} steps, once per window)"] = _once(lambda: predict(net))
    res["case_shape"] = list(data.shape[1:])
    res["peak RSS (GB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps(res, indent=2))
    base = res["predict nnUNetTrainer"]
    for k, v in res.items():
        if k.startswith(f"predict {args.trainer}"):
            print(f"{k}: {v / base:.1f}x stock predict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
