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

from .nndm_cost import _env, prepare
from .speed import TRAINERS, _train_batches


def check(head: str, batch) -> list[str]:
    """Compile, train and predict one head; return what went wrong (nothing when all is well)."""
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from .nndm_cost import _trainer
    problems = []
    os.environ["nnUNet_compile"] = "1"
    t0 = time.perf_counter()
    tr = _trainer(TRAINERS[head], fold=1)
    os.environ["nnUNet_compile"] = "0"
    net = tr.unwrapped_network()
    if any("_orig_mod" in k for k in net.state_dict()):
        problems.append(f"{head}: compiling changed the state-dict keys")
    print(f"[{head}] initialize {time.perf_counter() - t0:.1f} s, compiled in place: {', '.join(tr.compiled_parts)}",
          flush=True)
    tr.network.train()
    for label, epoch, b in _train_batches(head, tr, batch):
        tr.current_epoch = epoch
        tr.lr_scheduler.step(epoch)
        seconds = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = tr.train_step(b)["loss"]
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
        if not np.isfinite(loss):
            problems.append(f"{head}: loss {loss} in {label}")
        print(f"[{head}] train {label}: steps {', '.join(f'{x:.3f}' for x in seconds)} s, loss {loss:.3f}", flush=True)
    net.eval()
    if hasattr(net, "refiner_updates"):
        net.refiner_updates.fill_(1)  # NNDM: refine as a trained model does
    tr.set_deep_supervision_enabled(False)
    ds = infer_dataset_class(tr.preprocessed_dataset_folder)(tr.preprocessed_dataset_folder)
    data = torch.from_numpy(np.asarray(ds.load_case(ds.identifiers[0])[0][:]))
    net.set_sampling(replace(tr.sampling_defaults(), sampler="ddim", steps=5, samples=1))
    seconds = []
    for _ in range(3):
        p = nnUNetPredictor(device=torch.device("cuda"), perform_everything_on_device=True, allow_tqdm=False)
        p.manual_initialization(net, tr.plans_manager, tr.configuration_manager, None, tr.dataset_json, "check",
                                (0, 1, 2))
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = p.predict_sliding_window_return_logits(data)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    if not bool(torch.isfinite(logits).all()):
        problems.append(f"{head}: non-finite prediction")
    print(f"[{head}] predict DDIM 5 steps: {', '.join(f'{x:.3f}' for x in seconds)} s", flush=True)
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
    os.environ.update(_env(workdir))
    from .nndm_cost import _trainer
    stock = _trainer("nnUNetTrainer")  # not compiled (nnUNet_compile=0 from _env): only supplies the batch
    stock.on_train_start()
    batch = next(stock.dataloader_train)
    problems = [p for head in args.heads for p in check(head, batch)]
    stock.on_train_end()
    for p in problems:
        print(f"FAILED {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
