"""DDMD: does the inter-discrepancy X (eq. 12) separate tumour from normal tissue, in the paper's 2D slice regime
(on 2D plans, and on the slices of 3D patches) and in our 3D ``ae2_normal = "voxel"`` mode?

    OMP_NUM_THREADS=1 python -m benchmarks.ddmd_auc [--modes 2d 3d_voxel 3d_slices 3d_window] [--train 10]
        [--test 4] [--steps-2d 600] [--steps-3d 800] [--steps-slices 300] [--steps-window 800]
        [--cache /tmp/ddmd_auc_phantoms] [--out result.json]

The runs behind trainer_configs/ddmd.toml's ae2_normal and ae_input comments are kept in
benchmarks/results/ddmd_auc.json.

The phantoms are the demo's (``nnunet_diffusion.demo.PHANTOMS``: 4 mm voxels, cropped to the brain), drawn with
their own seeds (training ``(1, i)``, test ``(2, i)``), z-scored per channel over the brain as nnU-Net normalises
BraTS (zero outside). The autoencoder ensembles are the package's (``nets.ddmd.AutoencoderEnsemble``, L = 3,
default widths), trained with the package's losses (``heads.ddmd.ae_loss``: eq. 9 for AE-1, eq. 10 for AE-2) and
one Adam, as ``nnUNetTrainerDDMD``'s stage 1 does:

* ``2d`` (the paper, §3.2 and §4.1): axial slices; image-level label = tumour present in the slice's mask; every
  batch balanced (half normal, half abnormal slices, §4.1 "balanced data distribution"); AE-1 on all of them (the
  mixture set I_B), AE-2 on the normal ones (I_A);
* ``3d_voxel`` (ours, ``_voxel`` / ``_demo``): random 3D patches (nearly all hold tumour), AE-1 on every patch,
  AE-2's MSE restricted to the patch's non-tumour voxels (so AE-2 does see tumour as input);
* ``3d_slices`` (the paper's autoencoders on 3D plans, ``ae_input = "slices"``: ``_slices`` / ``_table``): random
  crops of the table's planned 3d_fullres patch (40 x 48 x 40), batch 2, cut into their axial slices; 2D
  autoencoders, AE-1 on every slice (balanced), AE-2 on the slices without a tumour voxel;
* ``3d_window`` (issue 33's option (a), measured, not shipped): 3D autoencoders on 16^3 boxes; AE-2 on boxes
  without a tumour voxel (at least half brain; a case without one falls back to its box of least tumour, counted
  and left out of AE-2), AE-1 on those and as many boxes centred on a tumour voxel.

Then X and Y (eqs. 11–13) of the unseen test phantoms by nnU-Net's sliding window (as ``nndiff predict
--discrepancy``) and, over the brain voxels, the ROC AUC of the voxel's X (and Y, and of the raw FLAIR intensity as
a reference) for tumour (any label) against normal tissue; plus the slice-level AUC of the inter-discrepancy score
(mean X over a slice's brain voxels, §3.2 / Fig. 4) for abnormal against normal slices.
Learning rate 1e-3 (the paper's 1e-4 needs its 200 epochs; the demo variant uses 1e-3 as well).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

CHANNELS = 4
MODES = ("2d", "3d_voxel", "3d_slices", "3d_window")


def load_cases(kind: int, n: int, cache: Path) -> list[dict]:
    """n phantoms of seed (kind, i) at the demo's settings: image (C, Z, Y, X) z-scored over the brain, label."""
    from nnunet_diffusion.dataset_conversion.phantoms import CONTRASTS, make_phantom_case
    from nnunet_diffusion.demo import PHANTOMS
    out = []
    for i in range(n):
        path = cache / f"case_{kind}_{i}.npz"
        if not path.is_file():
            case = make_phantom_case((kind, i), spacing=PHANTOMS["spacing"], crop=PHANTOMS["crop"])
            cache.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, image=np.stack([case.images[c] for c in CONTRASTS]).astype(np.float32),
                                label=case.label)
        z = np.load(path)
        image, label = z["image"], z["label"]
        brain = (image != 0).any(0)
        norm = np.zeros_like(image)
        for c in range(image.shape[0]):
            v = image[c][brain]
            norm[c][brain] = (v - v.mean()) / max(float(v.std()), 1e-8)
        out.append({"image": norm, "label": label, "brain": brain})
    return out


def build(dim: int, patch, strides, seed: int):
    import torch
    from nnunet_diffusion.nets.ddmd import AutoencoderEnsemble
    torch.manual_seed(seed)
    ae1 = AutoencoderEnsemble(3, dim, CHANNELS, patch, strides)
    ae2 = AutoencoderEnsemble(3, dim, CHANNELS, patch, strides)
    return ae1, ae2


def train_2d(cases, steps: int, batch: int, lr: float, seed: int):
    """The paper's regime: slices, normal = no tumour voxel, balanced batches; AE-1 on all, AE-2 on the normal."""
    import torch
    from nnunet_diffusion.heads import ddmd
    slices, labels = [], []
    for c in cases:
        for z in range(c["image"].shape[1]):
            if c["brain"][z].mean() < 0.05:
                continue  # (almost) no brain in this slice
            slices.append(c["image"][:, z])
            labels.append(c["label"][z])
    b = torch.from_numpy(np.stack(slices))
    y = torch.from_numpy((np.stack(labels) > 0)[:, None].astype(np.float32))
    abnormal = ddmd.image_labels(y, regions=True)  # eq. 9/10's image-level label: tumour present (§3.2)
    idx_n, idx_a = torch.nonzero(~abnormal).ravel(), torch.nonzero(abnormal).ravel()
    patch = tuple(b.shape[2:])
    ae1, ae2 = build(2, patch, [(2, 2)] * 4, seed)
    opt = torch.optim.Adam(list(ae1.parameters()) + list(ae2.parameters()), lr=lr)
    g = torch.Generator().manual_seed(seed)
    log = []
    for step in range(steps):
        pick_n = idx_n[torch.randint(len(idx_n), (batch // 2,), generator=g)]
        pick_a = idx_a[torch.randint(len(idx_a), (batch - batch // 2,), generator=g)]
        x = b[torch.cat([pick_n, pick_a])]
        l1, m1 = ddmd.ae_loss(ae1, x)                 # eq. 9: the mixture set
        l2, m2 = ddmd.ae_loss(ae2, b[pick_n])         # eq. 10: the normal slices
        opt.zero_grad(set_to_none=True)
        (l1 + l2).backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.append((step, float(m1.mean()), float(m2.mean())))
    stats = {"slices": len(slices), "normal_slices": int(len(idx_n)), "abnormal_slices": int(len(idx_a)),
             "patch": list(patch), "loss_log": log}
    return ae1, ae2, patch, stats


def train_3d_voxel(cases, steps: int, batch: int, lr: float, seed: int, patch=(32, 32, 32)):
    """Ours (_voxel): random 3D patches, AE-1 on every patch, AE-2's MSE on the patch's non-tumour voxels."""
    import torch
    from nnunet_diffusion.heads import ddmd
    ae1, ae2 = build(3, patch, [(2, 2, 2)] * 4, seed)
    opt = torch.optim.Adam(list(ae1.parameters()) + list(ae2.parameters()), lr=lr)
    rng = np.random.default_rng(seed)
    log, tumour_patches = [], 0
    for step in range(steps):
        xs, ys = [], []
        for _ in range(batch):
            c = cases[rng.integers(len(cases))]
            img, lab = c["image"], c["label"]
            pad = [(0, max(0, p - s)) for p, s in zip(patch, lab.shape)]
            img = np.pad(img, [(0, 0)] + pad)
            lab = np.pad(lab, pad)
            corner = [rng.integers(0, s - p + 1) for s, p in zip(lab.shape, patch)]
            sl = tuple(slice(a, a + p) for a, p in zip(corner, patch))
            xs.append(img[(slice(None), *sl)])
            ys.append(lab[sl])
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy((np.stack(ys) > 0)[:, None].astype(np.float32))
        tumour_patches += int(ddmd.image_labels(y, regions=True).sum())
        voxels = ~ddmd.tumour_voxels(y, regions=True)
        l1, m1 = ddmd.ae_loss(ae1, x)                  # eq. 9
        l2, m2 = ddmd.ae_loss(ae2, x, voxels)          # eq. 10 restricted to non-tumour voxels (ours)
        opt.zero_grad(set_to_none=True)
        (l1 + l2).backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.append((step, float(m1.mean()), float(m2.mean())))
    stats = {"patch": list(patch), "patches_with_tumour": tumour_patches / (steps * batch), "loss_log": log}
    return ae1, ae2, patch, stats


def random_crop(c: dict, patch, rng) -> tuple[np.ndarray, np.ndarray]:
    """One random crop (image (C, *patch), label (*patch)) of a case, zero-padded where the patch is larger, as
    nnU-Net's loader crops (no augmentation)."""
    img, lab = c["image"], c["label"]
    pad = [(0, max(0, p - s)) for p, s in zip(patch, lab.shape)]
    img, lab = np.pad(img, [(0, 0)] + pad), np.pad(lab, pad)
    corner = [rng.integers(0, s - p + 1) for s, p in zip(lab.shape, patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(corner, patch))
    return img[(slice(None), *sl)], lab[sl]


def train_3d_slices(cases, steps: int, batch: int, lr: float, seed: int, patch=(40, 48, 40)):
    """The paper's autoencoders inside 3D patches (``ae_input = "slices"``, ``ae2_normal = "patch"``): random 3D
    crops of the table's planned 3d_fullres patch, cut into their axial slices (``heads.ddmd.to_slices``; all-zero
    slices left out, ``has_image``); a slice is normal when it holds no tumour voxel; AE-1 (2D) on every slice with
    the batch's normal and abnormal slices weighing half each (§4.1), AE-2 (2D) on the normal slices, as
    ``nnUNetTrainerDDMD._autoencoder_step`` does."""
    import torch
    from nnunet_diffusion.heads import ddmd
    ae1, ae2 = build(2, patch[1:], [(2, 2)] * 4, seed)
    opt = torch.optim.Adam(list(ae1.parameters()) + list(ae2.parameters()), lr=lr)
    rng = np.random.default_rng(seed)
    log, n_slices, n_normal, skipped = [], 0, 0, 0
    for step in range(steps):
        crops = [random_crop(cases[rng.integers(len(cases))], patch, rng) for _ in range(batch)]
        x = ddmd.to_slices(torch.from_numpy(np.stack([c[0] for c in crops])))
        y = ddmd.to_slices(torch.from_numpy((np.stack([c[1] for c in crops]) > 0)[:, None].astype(np.float32)))
        keep = ddmd.has_image(x)
        x, y = x[keep], y[keep]
        abnormal = ddmd.image_labels(y, regions=True)
        n_slices, n_normal = n_slices + len(x), n_normal + int((~abnormal).sum())
        l1, m1 = ddmd.ae_loss(ae1, x, weights=ddmd.balanced_weights(abnormal))  # eq. 9, balanced (§4.1)
        loss = l1
        if (~abnormal).any():
            l2, m2 = ddmd.ae_loss(ae2, x[~abnormal])                               # eq. 10: the normal slices
            loss = loss + l2
        else:
            skipped += 1  # no tumour-free slice in this batch: AE-2 makes no step (the trainer's rule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.append((step, float(m1.mean()), float(m2.mean()) if (~abnormal).any() else None))
    stats = {"patch": list(patch), "ae_patch": list(patch[1:]), "slices_per_step": n_slices / steps,
             "normal_slice_fraction": n_normal / max(n_slices, 1), "ae2_skipped_steps": skipped, "loss_log": log}
    return ae1, ae2, tuple(patch[1:]), stats


def window_counts(vol: np.ndarray, window) -> np.ndarray:
    """The number of True voxels of ``vol`` in every ``window``-sized box that fits inside it (an integral volume)."""
    s = np.pad(vol.astype(np.int64), [(1, 0)] * vol.ndim).cumsum(0).cumsum(1).cumsum(2)
    (a, b, c) = window
    return (s[a:, b:, c:] - s[:-a, b:, c:] - s[a:, :-b, c:] - s[a:, b:, :-c] + s[:-a, :-b, c:] + s[:-a, b:, :-c]
            + s[a:, :-b, :-c] - s[:-a, :-b, :-c])


def tumour_free_window(c: dict, window, rng, min_brain: float = 0.5):
    """Option (a) of issue 33 (measured, not shipped): the corner of a ``window``-sized box of the case holding no
    tumour voxel and at least ``min_brain`` brain, uniformly among those; if the case has none, the box of the
    smallest tumour fraction (a fallback: it holds tumour). Returns (corner, fallback)."""
    tumour, brain = window_counts(c["label"] > 0, window), window_counts(c["brain"], window)
    enough = brain >= min_brain * np.prod(window)
    free = np.argwhere(enough & (tumour == 0))
    if len(free):
        return tuple(free[rng.integers(len(free))]), False
    frac = np.where(enough, tumour / np.maximum(brain, 1), np.inf)
    return np.unravel_index(np.argmin(frac), frac.shape), True


def train_3d_window(cases, steps: int, batch: int, lr: float, seed: int, window=(16, 16, 16)):
    """Option (a) of issue 33, measured for comparison: 3D autoencoders on ``window`` boxes (smaller than the
    planned patch, so tumour-free ones exist); per case drawn, AE-2 on a tumour-free box (``tumour_free_window``;
    a fallback box, holding tumour, is counted and left out of AE-2), AE-1 on a balanced pair: that normal box and
    a box centred on a tumour voxel (§4.1)."""
    import torch
    from nnunet_diffusion.heads import ddmd
    ae1, ae2 = build(3, window, [(2, 2, 2)] * 4, seed)
    opt = torch.optim.Adam(list(ae1.parameters()) + list(ae2.parameters()), lr=lr)
    rng = np.random.default_rng(seed)
    log, fallbacks = [], 0

    def box(c, corner):
        img = np.pad(c["image"], [(0, 0)] + [(w, w) for w in window])
        sl = tuple(slice(a + w, a + 2 * w) for a, w in zip(corner, window))
        return img[(slice(None), *sl)]

    for step in range(steps):
        normal, abnormal = [], []
        for _ in range(batch):
            c = cases[rng.integers(len(cases))]
            corner, fallback = tumour_free_window(c, window, rng)
            fallbacks += int(fallback)
            if not fallback:
                normal.append(box(c, corner))
            t = np.argwhere(c["label"] > 0)
            centre = t[rng.integers(len(t))]
            abnormal.append(box(c, [int(v) - w // 2 for v, w in zip(centre, window)]))
        xn = torch.from_numpy(np.stack(normal)) if normal else None
        xa = torch.from_numpy(np.stack(abnormal))
        x = xa if xn is None else torch.cat([xn, xa])
        is_abnormal = torch.tensor([False] * len(normal) + [True] * len(abnormal))
        l1, m1 = ddmd.ae_loss(ae1, x, weights=ddmd.balanced_weights(is_abnormal))  # eq. 9, balanced (§4.1)
        loss = l1
        if xn is not None:
            l2, m2 = ddmd.ae_loss(ae2, xn)                                           # eq. 10: tumour-free boxes
            loss = loss + l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.append((step, float(m1.mean()), float(m2.mean()) if xn is not None else None))
    stats = {"ae_patch": list(window), "fallbacks": fallbacks, "draws": steps * batch, "loss_log": log}
    return ae1, ae2, tuple(window), stats


def maps(ae1, ae2, image: np.ndarray, patch) -> np.ndarray:
    """X and Y (2, Z, Y, X) of one case by nnU-Net's sliding window (2D patches: slice by slice)."""
    import torch
    from nnunet_diffusion.heads import ddmd
    from nnunet_diffusion.inference.whole_case import sliding_window

    @torch.no_grad()
    def fn(window):
        x, y = ddmd.discrepancy(ae1(window), ae2(window))
        return torch.cat([x, y], 1)
    return sliding_window(fn, torch.from_numpy(image), patch, 2).numpy()


def evaluate(ae1, ae2, patch, cases) -> dict:
    from sklearn.metrics import roc_auc_score
    for m in (ae1, ae2):
        m.eval()
    xs, ys, flair, truth, slice_scores, slice_truth = [], [], [], [], [], []
    for c in cases:
        xy = maps(ae1, ae2, c["image"], patch)
        brain, tumour = c["brain"], c["label"] > 0
        xs.append(xy[0][brain])
        ys.append(xy[1][brain])
        flair.append(c["image"][3][brain])
        truth.append(tumour[brain])
        for z in range(brain.shape[0]):
            if brain[z].mean() >= 0.05:
                slice_scores.append(float(xy[0, z][brain[z]].mean()))
                slice_truth.append(bool(tumour[z].any()))
    truth = np.concatenate(truth)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return {"voxel_auc_X": float(roc_auc_score(truth, x)), "voxel_auc_Y": float(roc_auc_score(truth, y)),
            "voxel_auc_flair": float(roc_auc_score(truth, np.concatenate(flair))),
            "mean_X_tumour": float(x[truth].mean()), "mean_X_normal": float(x[~truth].mean()),
            "slice_auc_inter_score": float(roc_auc_score(slice_truth, slice_scores)),
            "tumour_voxels": int(truth.sum()), "brain_voxels": int(truth.size), "test_slices": len(slice_truth)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=10)
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--steps-2d", type=int, default=600)
    p.add_argument("--steps-3d", type=int, default=800)
    p.add_argument("--batch-2d", type=int, default=16)
    p.add_argument("--batch-3d", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-slices", type=int, default=300)
    p.add_argument("--steps-window", type=int, default=800)
    p.add_argument("--batch-window", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["2d", "3d_voxel"], choices=MODES)
    p.add_argument("--cache", type=Path, default=Path("/tmp/ddmd_auc_phantoms"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch
    t0 = time.time()
    train, test = load_cases(1, a.train, a.cache), load_cases(2, a.test, a.cache)
    result = {"command": "python -m benchmarks.ddmd_auc " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "phantoms_seconds": round(time.time() - t0, 1), "modes": {}}
    for mode in a.modes:
        t = time.time()
        if mode == "2d":
            ae1, ae2, patch, stats = train_2d(train, a.steps_2d, a.batch_2d, a.lr, a.seed)
            stats["steps"], stats["batch"] = a.steps_2d, a.batch_2d
        elif mode == "3d_slices":
            ae1, ae2, patch, stats = train_3d_slices(train, a.steps_slices, a.batch_3d, a.lr, a.seed)
            stats["steps"], stats["batch"] = a.steps_slices, a.batch_3d
        elif mode == "3d_window":
            ae1, ae2, patch, stats = train_3d_window(train, a.steps_window, a.batch_window, a.lr, a.seed)
            stats["steps"], stats["batch"] = a.steps_window, a.batch_window
        else:
            ae1, ae2, patch, stats = train_3d_voxel(train, a.steps_3d, a.batch_3d, a.lr, a.seed)
            stats["steps"], stats["batch"] = a.steps_3d, a.batch_3d
        stats["train_seconds"] = round(time.time() - t, 1)
        stats.update(evaluate(ae1, ae2, patch, test))
        result["modes"][mode] = stats
        print(mode, json.dumps({k: v for k, v in stats.items() if k != "loss_log"}), flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
