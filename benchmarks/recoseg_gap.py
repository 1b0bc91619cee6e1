"""ReCoSeg's residual map on the cases its synthesiser trained on and on unseen ones, with and without unlabelled
images in the synthesiser's training (issue 19, items 9 and 10).

    python -m benchmarks.recoseg_gap [--labelled 4] [--unlabelled 8] [--heldout 6] [--iters 400] [--steps 5]
                                     [--shape 40 48 36] [--seed 0] [--configs ...] [--json OUT.json]

Phantoms (``dataset_conversion.phantoms``, brain crop, 4 channels in nnU-Net's BraTS order T1, T1ce, T2, FLAIR,
z-scored inside the brain as nnU-Net's ZScore normalisation does) are drawn from fixed seeds: ``--labelled``
training cases, ``--unlabelled`` extra images (their labels are never read) and ``--heldout`` unseen cases. A small
synthesiser (the ``_demo`` variant's: TimeConditionedUNet [16, 32], predicts T1ce itself, Adam 1e-3) is trained for
``--iters`` iterations (batch 2, random 32³ crops) with the same seed and budget on three pools of images: the
labelled cases only; those plus the unlabelled images (what ``unlabelled_folder`` / NNDIFF_UNLABELLED adds to
stage 1); the unlabelled images only (``synthesis_cases = "unlabelled"``: the labelled cases are then unseen by the
synthesiser, as at prediction). The residual r = |synthetic T1ce − T1ce| of every case is computed by
``recoseg_residuals.case_residual`` -- the one function that makes both stage 2's training residuals and the
prediction's -- with DDIM ``--steps``.

Reported per model and split (train = the labelled cases, seen by the synthesiser unless it trained on the
unlabelled images only; held-out = unseen): mean r inside the tumour (labels 1-3), inside the enhancing tumour (3)
and in the brain outside the tumour, and the AUC of r as a voxel score for tumour vs. the rest of the brain (0.5 =
r says nothing about where the tumour is). The gap of item 9 is train - held-out; what unlabelled images change is
"+ unlabelled" - "labelled only" on held-out cases.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

CHANNELS = ("T1", "T1ce", "T2", "FLAIR")  # nnU-Net's BraTS order; T1ce (1) is synthesised
SEEDS = {"labelled": 1000, "unlabelled": 2000, "heldout": 3000}
CONFIGS = ("labelled only", "+ unlabelled", "unlabelled only")


def phantom(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """(data (4, Z, Y, X) float32 z-scored inside the brain and 0 outside, label (Z, Y, X))."""
    from nnunet_diffusion.dataset_conversion.phantoms import make_phantom_case
    case = make_phantom_case(seed, shape=tuple(shape), crop="brain")
    images = np.stack([case.images[c].astype(np.float32) for c in CHANNELS])
    mask = (images != 0).any(0)
    data = np.zeros_like(images)
    for c in range(len(CHANNELS)):
        v = images[c][mask]
        data[c][mask] = (v - v.mean()) / max(v.std(), 1e-8)
    return data, case.label.astype(np.int16)


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` voxels vs the others (Mann–Whitney U / n⁺n⁻)."""
    from scipy.stats import rankdata
    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def residual_stats(r: np.ndarray, label: np.ndarray, brain: np.ndarray) -> dict:
    tumour, enh = label > 0, label == 3
    rest = brain & ~tumour
    return {"r tumour": float(r[tumour].mean()), "r enhancing": float(r[enh].mean()) if enh.any() else float("nan"),
            "r brain outside tumour": float(r[rest].mean()),
            "AUC tumour": auc(r[brain], tumour[brain]), "AUC enhancing": auc(r[brain], enh[brain])}


def train_synthesiser(pool: list[np.ndarray], iters: int, seed: int, patch=(32, 32, 32)):
    import torch
    from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
    from nnunet_diffusion.heads import recoseg
    from nnunet_diffusion.nets import TimeConditionedUNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    schedule = NoiseSchedule(ScheduleConfig(1000, "linear_beta", 1e-4, 0.02))
    net = TimeConditionedUNet(3, 4, 1, (16, 32), [(2, 2, 2)], 1)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    losses = []
    for _ in range(iters):
        batch = []
        for _ in range(2):
            data = pool[rng.integers(len(pool))]
            corner = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(data.shape[1:], patch)]
            crop = data[(slice(None), *[slice(c, c + p) for c, p in zip(corner, patch)])]
            pad = [(0, 0)] + [(0, p - s) for s, p in zip(crop.shape[1:], patch)]
            batch.append(np.pad(crop, pad))
        x = torch.from_numpy(np.stack(batch))
        loss = recoseg.synthesis_loss(net, schedule, x, 1, prediction_type="sample")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return net.eval(), schedule, float(np.mean(losses[-50:]))


def residuals(net, schedule, cases, steps: int, patch=(32, 32, 32)) -> list[dict]:
    import torch
    from nnunet_diffusion.inference import recoseg_residuals
    from nnunet_diffusion.inference.options import SamplingOptions
    from nnunet_diffusion.inference.recoseg_network import ReCoSegNetwork

    network = ReCoSegNetwork(net, torch.nn.Identity(), schedule, SamplingOptions(True, steps, "ddim", 1, 0, "window",
                                                                                   "mean"), 4,
                             prediction_type="sample", clip=5.0).eval()
    network.target_channel.fill_(1)
    out = []
    with torch.no_grad():
        for data, label in cases:
            r = recoseg_residuals.case_residual(network, torch.from_numpy(data), patch)[1][0].numpy()
            out.append(residual_stats(r, label, (data != 0).any(0)))
    return out


def mean_stats(rows: list[dict]) -> dict:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labelled", type=int, default=4)
    ap.add_argument("--unlabelled", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=6)
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 48, 36], help="phantom grid x y z (brain crop)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                    help="which synthesiser trainings to run (default: all three)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    t0 = time.time()
    cases = {k: [phantom(SEEDS[k] + i, args.shape) for i in range(getattr(args, k))]
             for k in ("labelled", "unlabelled", "heldout")}
    print(f"phantoms: {', '.join(f'{len(v)} {k}' for k, v in cases.items())}, shape {cases['labelled'][0][0].shape}"
          f" ({time.time() - t0:.0f} s)", flush=True)
    results = {}
    pools = {"labelled only": [d for d, _ in cases["labelled"]],
             "+ unlabelled": [d for d, _ in cases["labelled"]] + [d for d, _ in cases["unlabelled"]],
             "unlabelled only": [d for d, _ in cases["unlabelled"]]}
    for name, pool in pools.items():
        if name not in args.configs or (name != "labelled only" and not cases["unlabelled"]):
            continue
        t = time.time()
        net, schedule, loss = train_synthesiser(pool, args.iters, args.seed)
        res = {"images": len(pool), "final loss (mean of last 50)": loss,
               "train": mean_stats(residuals(net, schedule, cases["labelled"], args.steps)),
               "held-out": mean_stats(residuals(net, schedule, cases["heldout"], args.steps)),
               "seconds": round(time.time() - t, 1)}
        res["gap (train - held-out)"] = {k: res["train"][k] - res["held-out"][k] for k in res["train"]}
        results[name] = res
        print(f"\n{name}: synthesiser trained on {len(pool)} images, {args.iters} iterations, loss {loss:.3f} "
              f"({res['seconds']} s)", flush=True)
        print(f"  {'':24s}" + "".join(f"{k:>24s}" for k in res["train"]))
        for split in ("train", "held-out", "gap (train - held-out)"):
            print(f"  {split:24s}" + "".join(f"{v:24.3f}" for v in res[split].values()), flush=True)
    if "+ unlabelled" in results and "labelled only" in results:
        a, b = results["labelled only"]["held-out"], results["+ unlabelled"]["held-out"]
        results["held-out change from unlabelled images"] = {k: b[k] - a[k] for k in a}
        print("\nheld-out change from unlabelled images (+ unlabelled − labelled only):")
        print("  " + ", ".join(f"{k} {v:+.3f}" for k, v in results["held-out change from unlabelled images"].items()))
    meta = {"command": " ".join(["python -m benchmarks.recoseg_gap", *(argv if argv is not None else sys.argv[1:])]),
            "machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "seconds": round(time.time() - t0, 1), "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\ntotal {meta['seconds']} s on {meta['machine']}, {meta['threads']} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
