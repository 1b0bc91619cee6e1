"""What NNDM costs next to nnU-Net's stock nnUNetTrainer, measured on the same plans, data and machine.

    python -m benchmarks.nndm_cost [--workdir DIR] [--shape Z Y X] [--steps 1 5 10] [--repeats 5]

1. makes (or reuses) the synthetic dataset in DIR and plans it with nnUNetv2_plan_and_preprocess;
2. train step: one real augmented batch from nnU-Net's data loader, then ``train_step`` timed for the stock
   nnUNetTrainer and for nnUNetTrainerNNDM in each of its three stages (paper-default refiner);
3. predict: nnU-Net's predictor (sliding window, Gaussian, 8-mirror TTA) on one preprocessed case, for the
   stock network, NNDM with refinement off, and NNDM refined with K DDIM steps (once per window, and once
   per mirror);
each group in its own process, whose peak RSS is reported. Results are printed as a Markdown table and
written to DIR/nndm_cost.json with the machine and versions. A failed measurement raises; nothing is made up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 990
DATASET = "Dataset990_NNDiffSynthetic"


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
    """What the per-head cost scripts share: the stock nnUNetTrainer (data loader started) with one real augmented
    batch, the head's trainer (fold 1, untrained weights; ``compile_head``: built with nnUNet_compile=1), one
    preprocessed case, and ``predict(network)`` running nnU-Net's predictor (sliding window, Gaussian, 8 mirrors) on
    that case. Call ``stock.on_train_end()`` after."""
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


def group_train(repeats: int) -> dict:
    import torch
    stock = _trainer("nnUNetTrainer")
    stock.on_train_start()
    batch = next(stock.dataloader_train)
    out = {"patch_size": list(stock.configuration_manager.patch_size), "batch_size": stock.batch_size,
           "train_step nnUNetTrainer": _time(lambda: stock.train_step(batch), repeats)}
    stock.on_train_end()
    nndm = _trainer("nnUNetTrainerNNDM", fold=1)
    nndm.set_deep_supervision_enabled(True)
    nndm.network.train()
    s1, s2, _ = nndm.stage_epochs
    for stage, epoch in ((1, 0), (2, s1), (3, s1 + s2)):
        nndm.current_epoch = epoch
        nndm.lr_scheduler.step(epoch)
        out[f"train_step NNDM stage {stage}"] = _time(lambda: nndm.train_step(batch), repeats)
    net = nndm.unwrapped_network()
    out["params backbone"] = sum(p.numel() for p in net.backbone.parameters())
    out["params refiner"] = sum(p.numel() for p in net.refiner.parameters())
    torch.set_grad_enabled(True)
    return out


def group_predict(repeats: int, steps: list[int]) -> dict:
    import numpy as np
    import torch
    from dataclasses import replace
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    nndm = _trainer("nnUNetTrainerNNDM", fold=2)
    net = nndm.unwrapped_network().eval()
    net.refiner_updates.fill_(1)  # timing only: the weights' values do not change the cost
    folder = nndm.preprocessed_dataset_folder
    ds = infer_dataset_class(folder)(folder)
    data = torch.from_numpy(np.asarray(ds.load_case(ds.identifiers[0])[0][:]))
    pm, cm = nndm.plans_manager, nndm.configuration_manager
    dev = device()
    stock_net = nnUNetTrainer.build_network_architecture(pm, cm, data.shape[0],
                                                         nndm.label_manager.num_segmentation_heads, False).to(dev)

    def predictor(network):
        p = nnUNetPredictor(device=dev, perform_everything_on_device=dev.type == "cuda", allow_tqdm=False)
        p.manual_initialization(network, pm, cm, None, nndm.dataset_json, "bench", (0, 1, 2))
        return p

    out = {"case_shape": list(data.shape[1:]),
           "predict nnUNetTrainer": _time(lambda: predictor(stock_net).predict_sliding_window_return_logits(data),
                                          repeats)}
    nndm.set_deep_supervision_enabled(False)
    base = net.sampling
    net.set_sampling(replace(base, refine=False))
    out["predict NNDM refine off"] = _time(lambda: predictor(net).predict_sliding_window_return_logits(data),
                                           repeats)
    for k in steps:
        for mode in ("window", "mirror"):
            net.set_sampling(replace(base, refine=True, steps=k, sampler="ddim", tta_refine=mode))
            out[f"predict NNDM DDIM {k} steps, refine per {mode}"] = _time(
                lambda: predictor(net).predict_sliding_window_return_logits(data), repeats)
    return out


def _child(group: str, args) -> dict:
    """Run one group in a fresh process; return its results and peak RSS."""
    cmd = [sys.executable, "-m", "benchmarks.nndm_cost", "--workdir", str(args.workdir), "--group", group,
           "--repeats", str(args.repeats), "--steps", *map(str, args.steps)]
    proc = subprocess.Popen(cmd, env=_env(args.workdir), stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark group {group!r} failed (exit {proc.returncode}); see its output above")
    result = json.loads(stdout.strip().splitlines()[-1])
    result[f"peak RSS {group} (GB)"] = usage.ru_maxrss / 1024 ** 2
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 40, 36))
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group", choices=("train", "predict"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()
    if args.group:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        res = group_train(args.repeats) if args.group == "train" else group_predict(args.repeats, args.steps)
        print(json.dumps(res))
        return 0
    prepare(args.workdir, args.shape)
    results = {}
    for group in ("train", "predict"):
        results.update(_child(group, args))
    import nnunetv2
    import torch
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, "
            f"{platform.processor() or platform.platform()}", "python": platform.python_version(),
            "torch": torch.__version__, "nnunetv2": nnunetv2.__version__ if hasattr(nnunetv2, "__version__")
            else "2.8.x", "device": str(device()), "synthetic_shape": list(args.shape)}
    (args.workdir / "nndm_cost.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{meta}\n\n| measurement | value | ratio to stock |\n|---|---|---|")
    for key, value in results.items():
        ratio = ""
        if key.startswith("train_step") and key != "train_step nnUNetTrainer":
            ratio = f"{value / results['train_step nnUNetTrainer']:.2f}x"
        if key.startswith("predict") and key != "predict nnUNetTrainer":
            ratio = f"{value / results['predict nnUNetTrainer']:.2f}x"
        shown = f"{value:.3f} s" if key.startswith(("train_step", "predict")) else \
            f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"| {key} | {shown} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
