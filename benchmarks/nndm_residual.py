"""Does NNDM's refiner predict the residual it should, on cases it has not seen?

    python -m benchmarks.nndm_residual [--workdir nndiff_demo] [--variant demo] [--steps 5] [--split val|train]

For fold 0's validation cases (``--split train``: its training cases, which the refiner learned its residuals on) of ``nndiff demo``'s models (DIR as written by the demo), nnU-Net's predictor gives
the backbone's probabilities p (refinement off) and the refined ones p' (DDIM ``--steps``), both in nnU-Net's
preprocessed space. Per region it prints the true residual e = y − p (paper §4.2) and the applied correction
ê = p' − p, averaged inside the region (y = 1) and outside it, and the Dice of p and p'. A refiner that generalises
has ê near e on both sides; one whose ê has the wrong sign inside the region removes tumour the backbone had found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from .accuracy import _predictor, fold0_cases, preprocessed_cases, use_demo_workdir


def residual_report(y, p_off, p_on) -> list[dict]:
    """Per-region means of e = y − p_off and ê = p_on − p_off inside and outside y, and both Dice scores (the
    evaluation's dice_from_counts); arrays are (regions, Z, Y, X), y binary, p probabilities."""
    from nnunet_diffusion.evaluation.metrics import dice_from_counts
    out = []
    for r in range(y.shape[0]):
        inside = y[r] > 0
        e, e_hat = y[r] - p_off[r], p_on[r] - p_off[r]

        def dice(p):
            pred = p[r] > 0.5
            return dice_from_counts(int((pred & inside).sum()), int((pred & ~inside).sum()), int((~pred & inside).sum()))

        out.append({"voxels": int(inside.sum()), "dice refine off": dice(p_off), "dice refined": dice(p_on),
                    "e inside": float(e[inside].mean()) if inside.any() else float("nan"),
                    "ê inside": float(e_hat[inside].mean()) if inside.any() else float("nan"),
                    "e outside": float(e[~inside].mean()), "ê outside": float(e_hat[~inside].mean()),
                    "voxels lost by refining": int(((p_off[r] > 0.5) & (p_on[r] <= 0.5)).sum()),
                    "voxels gained by refining": int(((p_off[r] <= 0.5) & (p_on[r] > 0.5)).sum())})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("nndiff_demo"))
    ap.add_argument("--variant", default="demo")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--split", choices=("val", "train"), default="val", help="fold 0's cases to look at")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    from nnunet_diffusion.demo import DATASET
    model = workdir / "nnUNet_results" / DATASET / f"nnUNetTrainerNNDM_{args.variant}__nnUNetPlans__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        raise SystemExit(f"{model}/fold_0/checkpoint_final.pth is missing: run `nndiff demo --workdir {args.workdir}` "
                         "first (it trains the NNDM model this check reads)")
    use_demo_workdir(workdir)
    import numpy as np
    import torch

    from nnunet_diffusion.evaluation.metrics import region_mask
    torch.set_num_threads(os.cpu_count() or 1)
    cases = fold0_cases(workdir, args.split)
    p = _predictor(model)
    lm = p.label_manager
    if not lm.has_regions:
        raise SystemExit(f"{model}: not a region-based (BraTS) model; this check reads sigmoid region outputs")
    ds = preprocessed_cases(p, cases)
    refined = replace(p.network.sampling, refine=True, sampler="ddim", steps=args.steps)
    report = {}
    for case in cases:
        data, seg, _, _ = ds.load_case(case)
        x = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
        labels = np.asarray(seg[:])[0]
        y = np.stack([region_mask(labels, r) for r in lm.foreground_regions]).astype(np.float32)
        probs = {}
        for name, sampling in (("off", replace(refined, refine=False)), ("on", refined)):
            p.network.set_sampling(sampling)
            probs[name] = torch.sigmoid(p.predict_logits_from_preprocessed_data(x).float()).numpy()
        report[case] = dict(zip(map(str, lm.foreground_regions), residual_report(y, probs["off"], probs["on"])))
        for region, row in report[case].items():
            print(f"{case} region {region}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in row.items()), flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
