"""ε-prediction against x_0-prediction: how many optimiser steps a diffusion segmenter needs under each.

    python -m benchmarks.parameterisation [--iterations 4000] [--eval-at 250 500 1000 2000 4000] [--seed 0]
        [--threads 1] [--out benchmarks/results/parameterisation.json]

The equal-budget table (``make table``) found MedSegDiff, MoDiff and DDMD at their papers' ε-prediction segmenting at
chance after 2000 optimiser steps, where stock nnU-Net has plateaued. Slow learning or a broken ε path? This trains
MedSegDiff's denoiser (``nets.medsegdiff.MedSegDiffUNet``, FF-Parser and dynamic conditioning on, T = 1000, the
linear schedule) from the same seed under both parameterisations of ``heads.medsegdiff.training_loss`` (eq. 7's
ε, and ours, x_0) on a 2D toy task the image fully determines (a disc of radius 4-7 in a 32 x 32 image, 4 channels of
Gaussian noise of standard deviation 0.5 with the disc brighter by 1, i.e. two standard deviations; batch 8, AdamW
2e-4), and measures Dice of one DDIM-10 sample per image (``sample_masks``, the shared sampling loop), pooled over 16
fixed unseen images, at several points. Both paths use the same
network, schedule, sampler and data; only the regression target differs. About 8 minutes on one CPU thread.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from nnunet_diffusion.heads import medsegdiff
from nnunet_diffusion.nets.medsegdiff import MedSegDiffUNet

SIZE = 32


def discs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 4, S, S), masks (n, 1, S, S)): one disc per image, brighter by 1 in every channel."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centre = torch.randint(8, SIZE - 8, (n, 2), generator=gen)
    radius = torch.randint(4, 8, (n,), generator=gen)
    mask = ((yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
            < radius[:, None, None] ** 2).float()
    images = 0.5 * torch.randn(n, 4, SIZE, SIZE, generator=gen) + mask[:, None]
    return images, mask[:, None]


def dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float(2 * (pred * ref).sum() / (pred.sum() + ref.sum()).clamp_min(1e-6))


def run(prediction_type: str, iterations: int, eval_at: list[int], seed: int, progress: bool = False) -> list[dict]:
    """Train from ``seed`` under ``prediction_type``; Dice of one DDIM-10 sample per test image at ``eval_at``."""
    torch.manual_seed(seed)
    net = MedSegDiffUNet(2, 4, 1, [16, 32, 32, 64], [(2, 2), (2, 2), (2, 2)], [1, 1, 1, 1], (SIZE, SIZE))
    schedule = NoiseSchedule(ScheduleConfig(1000))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    test_images, test_masks = discs(16, torch.Generator().manual_seed(seed + 99))
    points, t0 = [], time.time()
    for it in range(1, iterations + 1):
        images, masks = discs(8, gen)
        loss = medsegdiff.training_loss(net, schedule, images, masks, prediction_type=prediction_type)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it in eval_at:
            net.eval()
            p = medsegdiff.sample_masks(net, schedule, test_images, 1, 10, "ddim", prediction_type=prediction_type)
            net.train()
            points.append({"steps": it, "dice": dice((p[0] > 0.5).float(), test_masks),
                           "loss": float(loss.detach()), "seconds": round(time.time() - t0, 1)})
            if progress:
                print(f"[parameterisation] {prediction_type} step {it}: Dice {points[-1]['dice']:.3f}, loss "
                      f"{float(loss.detach()):.4f} ({points[-1]['seconds']:.0f} s)", flush=True)
    return points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4000)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: leaves the other core to other work)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/parameterisation.json"))
    args = ap.parse_args(argv)
    bad = [k for k in args.eval_at if not 1 <= k <= args.iterations]
    if bad:
        raise SystemExit(f"--eval-at {bad}: every point must be in 1..--iterations ({args.iterations})")
    torch.set_num_threads(args.threads)
    result = {"settings": {"iterations": args.iterations, "eval_at": sorted(args.eval_at), "seed": args.seed,
                           "threads": args.threads, "task": f"one disc per {SIZE} x {SIZE} image, 16 test images",
                           "sampler": "ddim 10 steps x 1 sample"},
              "command": " ".join(["python -m benchmarks.parameterisation", *(argv or [])]),
              "curves": {pt: run(pt, args.iterations, set(args.eval_at), args.seed, True)
                         for pt in ("epsilon", "sample")}}
    from nnunet_diffusion.atomic import write_text_atomic

    from .provenance import machine, versions
    result["machine"], result["versions"], result["date"] = machine(), versions(), time.strftime("%Y-%m-%d %H:%M %Z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"[parameterisation] written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
