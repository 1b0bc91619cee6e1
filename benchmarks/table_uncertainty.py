"""What diffusion gives that stock nnU-Net does not, measured on the table's held-out phantoms (issue 34): uncertainty
that finds the errors, and ensembles with nnU-Net at equal training compute. The two sections of ``make table``
beside the equal-budget table of :mod:`benchmarks.table`; every function takes the :class:`~benchmarks.table.TableRun`
(``run``) and keeps its resumable steps in the run's ``state.json`` under keys starting with "uncertainty " and
"ensemble " (the second stock model's training: "train nnUNetTrainer_<variant>_seed2", as every table training).

**Uncertainty.** Each measured map on the held-out cases, against the errors of the segmentation it comes with
(:mod:`nnunet_diffusion.evaluation.uncertainty_quality`, the measures pooled over the cases): voxel AUROC of the map
for the error map and AURC (with the optimum for those errors), both inside a margin of :data:`MARGIN` voxels
(Euclidean) around the union of reference and prediction, so the far background, right almost everywhere, does not
dominate; ECE and Brier score of the fused probabilities (a reliability-diagram PNG); Spearman's rho between the cases'
mean uncertainty (inside the margin) and their Dice. The maps:

- stock nnU-Net's softmax entropy (sigmoid, per region, for BraTS's region channels): the entropy of its fused
  probabilities, what ``nndiff predict --uncertainty`` writes;
- the variance over nnU-Net's own mirror test-time augmentation: the 8 mirrored predictions of stock nnU-Net, each a
  whole sliding window on the flipped image without mirroring, flipped back (:func:`mirror_logits`; their mean is
  nnU-Net's mirrored prediction, the sliding window being linear and its tiles symmetric), each made a probability
  map at the image's grid by nnU-Net's own export, the variance per region channel; scored against stock's
  segmentation and probabilities (so its ECE and Brier are stock's);
- every learned diffusion head (its best steps-accuracy setting reached ``benchmarks.table.LEARNED_FLOOR``) at the
  sampler and steps of the default the table chose for it (what ``--apply-defaults`` ships), with
  :data:`UNCERTAINTY_SAMPLES` samples, or its chosen samples if more: the entropy of the fused probabilities. A head
  whose network draws one sample per window (``network.supports_samples`` false: ReCoSeg) is measured with one, and
  its row says so.

The cost: nnU-Net's ``predict_single_npy_array`` per case with ``save_or_return_probabilities`` (preprocessing,
sliding window with mirroring, export with the probabilities; reading excluded), x stock against stock's in this
section; the mirror variance: preprocessing, the 8 unmirrored sliding windows and their 8 exports.

**Ensembles at equal compute.** nnU-Net's own ensembling (``nnunetv2.ensembling.ensemble.ensemble_folders``, what
``nnUNetv2_ensemble`` runs: the members' probabilities averaged, nnU-Net's segmentation of the average) of stock +
each learned head, against the ensemble of two stock models: fold 0 of ``nnUNetTrainer_<variant>`` and of
``nnUNetTrainer_<variant>_seed2``, the same settings (trainer_configs/nnunet.toml). nnU-Net fixes no random seed (its
weights, batches and augmentation draw from torch's and numpy's generators, which are seeded from the operating
system at each process start, and from unseeded data-loader workers), so the two trainings differ by their seeds
alone. Every ensemble's members must have trained as many optimiser steps together as the two stock models
(:func:`equal_compute`, refused otherwise); scored like the table (bootstrap intervals, paired Wilcoxon per region)
against the two-stock ensemble, with stock alone as context.

Wiring: :func:`train_second_stock` with the table's trainings, :func:`measure` after the held-out rows,
:func:`uncertainty_result` / :func:`ensemble_result` into table.json, :func:`reliability_png` beside it, and
:func:`section_blocks` / :func:`headline_sentence` into RESULTS.md and the README.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunet_diffusion import registry
from nnunet_diffusion.evaluation.uncertainty_quality import DEFAULT_MARGIN

UNCERTAINTY_SAMPLES = 8
"""Samples per window of a head's uncertainty map (its chosen default's, when it has more)."""
MARGIN = DEFAULT_MARGIN
"""Voxels (Euclidean, voxel units) around reference and prediction inside which the voxel measures are taken."""
SEED2_SUFFIX = "_seed2"
"""The second stock model's variant is the table's variant with this suffix (``table_seed2``): identical settings."""
MAP_ENTROPY = "entropy"
MAP_MIRROR = "mirror variance"
STOCK_ENTROPY = "stock nnU-Net: softmax entropy"
STOCK_MIRROR = "stock nnU-Net: mirror-TTA variance"


# ------------------------------------------------------------------------------------------------ predicting
def heldout_inputs(run) -> tuple[Path, list[str], dict[str, list[str]]]:
    """(raw dataset folder, cases, {case: its four image files}) of the held-out phantoms, as ``run.heldout`` reads
    them."""
    raw = run.raw(heldout=True)
    cases = sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").glob("*.nii.gz"))
    return raw, cases, {c: [str(raw / "imagesTr" / f"{c}_{i:04d}.nii.gz") for i in range(4)] for c in cases}


def write_folder_jsons(p, out_dir: Path) -> None:
    """dataset.json and plans.json of the predictor ``p`` into ``out_dir``, as ``nnUNetv2_predict`` writes them:
    nnU-Net's ensembling reads them from its first input folder."""
    from nnunet_diffusion.atomic import write_text_atomic
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "dataset.json", json.dumps(p.dataset_json, indent=2))
    write_text_atomic(out_dir / "plans.json", json.dumps(p.plans_manager.plans, indent=2))


def predict_probabilities(p, inputs: dict[str, list[str]], out_dir: Path, progress: str = "") -> float:
    """:func:`benchmarks.accuracy.predict_raw_cases` with the probabilities kept: per case nnU-Net's
    ``predict_single_npy_array(..., save_or_return_probabilities=True)`` writes ``<case>.nii.gz``, ``<case>.npz``
    (fused probabilities on the image's grid) and ``<case>.pkl``; dataset.json and plans.json beside them. Returns
    seconds per case (reading excluded); resumable per case (``<case>.seconds``)."""
    from .accuracy import raw_case_loop
    write_folder_jsons(p, out_dir)
    return raw_case_loop(p, inputs, out_dir, lambda image, props, case: p.predict_single_npy_array(
        image, props, None, str(out_dir / case), True), progress=progress)


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's mirror test-time augmentation's flips (``_internal_maybe_mirror_and_predict``): none, then every
    combination of the allowed axes; 8 for three axes."""
    import itertools
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def mirror_logits(p, data) -> list:
    """The logits of each of nnU-Net's mirrored predictions of the preprocessed ``data`` (channels first, a torch
    tensor), in the order of :func:`mirror_combinations`: for each flip, nnU-Net's sliding window on the flipped data
    with the predictor's mirroring off, flipped back. Their mean is nnU-Net's mirrored prediction (the sliding window
    is linear in the network's outputs and its tiles and Gaussian are symmetric under a flip). The predictor's
    ``use_mirroring`` is restored. A predictor without mirror axes is an error."""
    import torch
    axes = p.allowed_mirroring_axes
    if not axes:
        raise ValueError("the predictor has no mirror axes (its trainer disabled mirroring): no mirror-TTA variance")
    offset = data.ndim - len(p.configuration_manager.patch_size)  # 1 for 3-D: spatial axis a is data axis a + 1
    was = p.use_mirroring
    p.use_mirroring = False
    out = []
    try:
        for c in mirror_combinations(axes):
            dims = [a + offset for a in c]
            logits = p.predict_logits_from_preprocessed_data(torch.flip(data, dims) if dims else data).cpu()
            out.append(torch.flip(logits, dims) if dims else logits)
    finally:
        p.use_mirroring = was
    return out


def mirror_probabilities(p, image: np.ndarray, props: dict) -> list[np.ndarray]:
    """The probability maps of nnU-Net's mirrored predictions of one raw case (``image``, ``props`` as the plans'
    reader returns them), each on the image's grid as nnU-Net exports probabilities (resampled, crop reverted,
    transposed back): preprocessing as ``predict_single_npy_array``, then :func:`mirror_logits`."""
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    ppa = PreprocessAdapterFromNpy([image], [None], [props], [None], p.plans_manager, p.dataset_json,
                                   p.configuration_manager, num_threads_in_multithreaded=1, verbose=False)
    dct = next(ppa)
    out = []
    for logits in mirror_logits(p, dct["data"]):
        _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, p.plans_manager, p.configuration_manager, p.label_manager, dct["data_properties"],
            return_probabilities=True)
        out.append(np.asarray(probs, dtype=np.float32))
    return out


def predict_mirror_variance(p, inputs: dict[str, list[str]], out_dir: Path, progress: str = "") -> float:
    """Per case the variance over nnU-Net's mirrored predictions (:func:`mirror_probabilities`,
    ``uncertainty_quality.mirror_variance``), written to ``out_dir/<case>.npz`` (``variance``, channels first).
    Returns seconds per case (preprocessing, the sliding windows, their exports, the variance); resumable per case."""
    from nnunet_diffusion.atomic import atomic_path
    from nnunet_diffusion.evaluation.uncertainty_quality import mirror_variance

    from .accuracy import raw_case_loop

    def save(case, variance):
        with atomic_path(out_dir / f"{case}.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, variance=variance)
    return raw_case_loop(p, inputs, out_dir, lambda image, props, case: mirror_variance(
        mirror_probabilities(p, image, props)), save=save, progress=progress)


def probabilities(run, trainer: str, label: str, change=None) -> dict:
    """``trainer``'s fold-0 predictions of the held-out cases with their probabilities at the sampling ``change``
    gives (a function of the network's SamplingOptions; None: as the checkpoint recorded them, stock nnU-Net), under
    the name ``label``: state key "uncertainty probabilities <trainer> <label>" -> {folder, seconds_per_case, cases,
    run}. Shared by both sections (stock's predictions once)."""
    from .accuracy import _predictor
    key = f"uncertainty probabilities {trainer} {label}"
    if run.state.done(key):
        return run.state.get(key)
    _, cases, inputs = heldout_inputs(run)
    p = _predictor(run.model_folder(trainer))
    if change is not None:
        p.network.set_sampling(change(p.network.sampling))
    out = run.workdir / "probabilities" / f"{trainer}__{label}".replace(" ", "_").replace("/", "-")
    seconds = predict_probabilities(p, inputs, out, progress=f"[table] {key}")
    run.state.record(key, {"folder": str(out), "seconds_per_case": seconds, "cases": cases, "run": run.run_id})
    return run.state.get(key)


# ------------------------------------------------------------------------------------------------ measuring
def folder_quality(pred_dir: Path, labels_dir: Path, dataset_json: dict, cases: Sequence[str],
                   margin: float | None = MARGIN, uncertainty_dir: Path | None = None) -> dict:
    """The uncertainty quality of one prediction folder (``<case><file_ending>`` segmentations and ``<case>.npz``
    probabilities) against ``labels_dir``: the map is the entropy of the probabilities, or, with ``uncertainty_dir``,
    its ``<case>.npz``'s ``variance`` (:func:`predict_mirror_variance`). Returns {"quality": {region:
    RegionQuality.as_dict()}, "dice": {region: [per case]}, "mean_uncertainty": {region: [per case]}} (the per-case
    values inside the margin, in ``cases`` order; Dice NaN where reference and prediction are both empty)."""
    from nnunet_diffusion.evaluation.evaluate import regions_from_dataset_json
    from nnunet_diffusion.evaluation.uncertainty_quality import case_voxels_from_files, pooled_quality
    regions, ignore = regions_from_dataset_json(dataset_json)
    ending = dataset_json.get("file_ending", ".nii.gz")
    per_case = []
    for c in cases:
        unc = None
        if uncertainty_dir is not None:
            with np.load(Path(uncertainty_dir) / f"{c}.npz") as f:
                unc = f["variance"]
        per_case.append(case_voxels_from_files(Path(pred_dir) / f"{c}{ending}", Path(labels_dir) / f"{c}{ending}",
                                               Path(pred_dir) / f"{c}.npz", regions, margin, ignore, unc))
    quality = pooled_quality(per_case)
    return {"quality": {r: q.as_dict() for r, q in quality.items()},
            "dice": {r: [pc[r].dice for pc in per_case] for r in quality},
            "mean_uncertainty": {r: [pc[r].mean_uncertainty for pc in per_case] for r in quality}}


def mirror_variances(run, trainer: str) -> dict:
    """``trainer``'s mirror-TTA variance of every held-out case (:func:`predict_mirror_variance`): state key
    "uncertainty mirror variance <trainer>" -> {folder, seconds_per_case, mirrors, cases, run}."""
    from .accuracy import _predictor
    key = f"uncertainty mirror variance {trainer}"
    if run.state.done(key):
        return run.state.get(key)
    _, cases, inputs = heldout_inputs(run)
    p = _predictor(run.model_folder(trainer))
    n = len(mirror_combinations(p.allowed_mirroring_axes or ()))
    folder = run.workdir / "probabilities" / f"{trainer}__mirror_variance"
    seconds = predict_mirror_variance(p, inputs, folder, progress=f"[table] {key}")
    run.state.record(key, {"folder": str(folder), "seconds_per_case": seconds, "mirrors": n, "cases": cases,
                           "run": run.run_id})
    return run.state.get(key)


def supports_samples(run, trainer: str) -> bool:
    """Whether ``trainer``'s network draws several samples per window (its ``supports_samples``; ReCoSeg's does not),
    read from its fold-0 model once: state key "uncertainty supports_samples <trainer>"."""
    from .accuracy import _predictor
    key = f"uncertainty supports_samples {trainer}"
    if not run.state.done(key):
        run.state.record(key, bool(_predictor(run.model_folder(trainer)).network.supports_samples))
    return run.state.get(key)


def stock_trainer(run) -> str:
    return f"{registry.HEADS[0].trainer}_{run.args.variant}"  # stock nnU-Net: the registry's first head


def learned_heads(run) -> tuple[list[tuple[str, str, dict]], list[dict]]:
    """([(head, trainer, chosen setting)] of the diffusion heads that learned, [{trainer, reason}] of those that did
    not), from the table's ``default <trainer>`` records (:func:`benchmarks.table.learned`)."""
    from .table_stats import LEARNED_FLOOR, learned
    ok, skipped = [], []
    for head, cls in run.heads:
        if not registry.head(head).diffusion:
            continue
        trainer = f"{cls}_{run.args.variant}"
        d = run.state.records.get(f"default {trainer}")
        if d is None:
            raise ValueError(f"{trainer}: no 'default {trainer}' record in {run.state.path}; run the table's "
                             f"steps-accuracy sweep first")
        if learned(d):
            ok.append((head, trainer, d["chosen"]))
        else:
            best = max(d["rows"], key=lambda r: r["dice"])
            skipped.append({"trainer": trainer, "reason": f"did not learn (best setting {best['setting']}: "
                            f"{best['dice']:.1f} mean Dice, below {LEARNED_FLOOR:g})"})
    return ok, skipped


def _change(sampler: str, steps: int, samples: int):
    return lambda o: replace(o, sampler=sampler, steps=steps, samples=samples)


def _record_quality(run, key: str, source: dict, extra: dict, uncertainty_dir: Path | None = None) -> None:
    raw, cases, _ = heldout_inputs(run)
    q = folder_quality(Path(source["folder"]), raw / "labelsTr", json.loads((raw / "dataset.json").read_text()),
                       cases, MARGIN, uncertainty_dir)
    run.state.record(key, {**extra, "cases": cases, "margin": MARGIN, "run": run.run_id, **q})
    auroc = ", ".join(f"{r} {v['auroc']:.3f}" for r, v in q["quality"].items())
    print(f"[table] {key}: AUROC {auroc}", flush=True)


def measure_uncertainty(run) -> None:
    """The uncertainty section's rows (state keys "uncertainty <trainer> <map label>"), then "uncertainty section"
    listing them: stock's softmax entropy and mirror-TTA variance, and each learned head's entropy at its chosen
    sampler with :data:`UNCERTAINTY_SAMPLES` samples."""
    from .table_stats import setting_label
    if run.state.done("uncertainty section"):
        return
    stock = stock_trainer(run)
    base = probabilities(run, stock, "stock")
    keys = []
    key = f"uncertainty {stock} {STOCK_ENTROPY}"
    if not run.state.done(key):
        _record_quality(run, key, base, {"trainer": stock, "label": STOCK_ENTROPY, "map": MAP_ENTROPY,
                                         "setting": "stock", "samples": None, "note": "",
                                         "seconds_per_case": base["seconds_per_case"]})
    keys.append(key)
    key = f"uncertainty {stock} {STOCK_MIRROR}"
    if not run.state.done(key):
        mirrors = mirror_variances(run, stock)
        _record_quality(run, key, base, {"trainer": stock, "label": STOCK_MIRROR, "map": MAP_MIRROR,
                                         "setting": f"{mirrors['mirrors']} mirrored predictions",
                                         "samples": mirrors["mirrors"],
                                         "note": "scored against stock's segmentation and probabilities",
                                         "seconds_per_case": mirrors["seconds_per_case"]}, Path(mirrors["folder"]))
    keys.append(key)
    heads, skipped = learned_heads(run)
    for head, trainer, chosen in heads:
        key = f"uncertainty {trainer} {MAP_ENTROPY}"
        if not run.state.done(key):
            supports = supports_samples(run, trainer)
            n = max(UNCERTAINTY_SAMPLES, chosen["samples"]) if supports else chosen["samples"]
            label = setting_label((chosen["sampler"], chosen["steps"], n))
            src = probabilities(run, trainer, label, _change(chosen["sampler"], chosen["steps"], n))
            note = "" if supports else "its network draws one sample per window"
            _record_quality(run, key, src, {"trainer": trainer, "label": f"{trainer}: entropy", "map": MAP_ENTROPY,
                                            "setting": label, "samples": n, "note": note,
                                            "seconds_per_case": src["seconds_per_case"]})
        keys.append(key)
    run.state.record("uncertainty section", {"rows": keys, "stock": keys[0], "not_measured": skipped})


def uncertainty_result(run) -> dict | None:
    """The uncertainty section of table.json (None until :func:`measure_uncertainty` finished): per row (map) its
    trainer, setting, samples, seconds per case and x stock (against stock's prediction with probabilities), and
    per region the measures (``RegionQuality.as_dict``, with the reliability table) and the per-case Dice and mean
    uncertainty."""
    sec = run.state.records.get("uncertainty section")
    if sec is None:
        return None
    rows = [dict(run.state.get(k)) for k in sec["rows"]]
    stock_s = run.state.get(sec["stock"])["seconds_per_case"]
    for r in rows:
        r["x_stock"] = r["seconds_per_case"] / stock_s
        r.pop("run", None)
    return {"margin": rows[0]["margin"], "samples": UNCERTAINTY_SAMPLES, "regions": list(rows[0]["quality"]),
            "cases": rows[0]["cases"], "rows": rows, "not_measured": sec["not_measured"]}


# ------------------------------------------------------------------------------------------------ ensembles
def second_stock(run) -> str:
    """The second stock model's trainer: ``nnUNetTrainer_<variant>_seed2``."""
    return stock_trainer(run) + SEED2_SUFFIX


def train_second_stock(run) -> None:
    """Train fold 0 of :func:`second_stock` (``run.train``; state key "train <trainer>"), after checking that its
    variant trains the table's budget (it must be identical to the table's variant but for the description)."""
    from nnunet_diffusion.budget import optimizer_steps
    variant = run.args.variant + SEED2_SUFFIX
    try:
        steps = optimizer_steps("nnunet", variant)
    except Exception as e:  # an unknown variant: the SpecError names the file and the variants it has
        raise SystemExit(f"the ensemble section needs trainer_configs/nnunet.toml [variants.{variant}], a copy of "
                         f"[variants.{run.args.variant}]: {e}") from None
    if steps != run.budget:
        raise SystemExit(f"trainer_configs/nnunet.toml [variants.{variant}] trains {steps} optimiser steps, not the "
                         f"table's {run.budget}: make it identical to [variants.{run.args.variant}]")
    run.train("nnunet", second_stock(run))


def member_steps(run, trainer: str) -> int:
    """Optimiser steps ``trainer``'s fold 0 trained: its "train <trainer>" record, else read from its checkpoint
    (:func:`nnunet_diffusion.budget.training_budget`)."""
    rec = run.state.records.get(f"train {trainer}")
    if rec is not None:
        return int(rec["steps"])
    from nnunet_diffusion.budget import training_budget
    return training_budget(run.model_folder(trainer) / "fold_0" / "checkpoint_final.pth").steps


def equal_compute(members: Mapping[str, int], reference: Mapping[str, int]) -> int:
    """The training compute of an ensemble (``members``: {member: optimiser steps}) when it equals that of the
    ``reference`` ensemble (the two stock models); a ValueError naming every member and its steps otherwise, or
    for an ensemble of fewer than two members. Returns the total."""
    total, ref_total = sum(int(v) for v in members.values()), sum(int(v) for v in reference.values())

    def named(d):
        return " + ".join(f"{m} ({int(s)} steps)" for m, s in d.items())
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members; got {named(members) or 'none'}")
    if total != ref_total:
        raise ValueError(f"unequal training compute: {named(members)} = {total} optimiser steps, but the reference "
                         f"ensemble {named(reference)} = {ref_total}; ensembles are compared at equal compute only")
    return total


def ensemble_folder(folders: Sequence[Path], out: Path, num_processes: int = 1) -> Path:
    """nnU-Net's ensembling of the prediction folders ``folders`` (each with ``<case>.npz`` and ``<case>.pkl`` for the
    same cases, and the first with dataset.json and plans.json, as ``nnUNetv2_predict --save_probabilities`` writes
    them) into ``out``: ``nnunetv2.ensembling.ensemble.ensemble_folders``, the function behind ``nnUNetv2_ensemble``
    (probabilities averaged, nnU-Net's segmentation of the average)."""
    from nnunetv2.ensembling.ensemble import ensemble_folders
    ensemble_folders([str(f) for f in folders], str(out), save_merged_probabilities=False,
                     num_processes=num_processes)
    return out


def ensemble_settings(run) -> list[tuple[str, list[tuple[str, str, object]]]]:
    """(name, [(member trainer, label, change)]) of the section: the two stock models first (the reference), stock
    alone (one model, half the compute: context, not an ensemble), then stock + each learned head at the setting of
    its held-out row (its chosen default)."""
    from .table_stats import setting_label
    stock = stock_trainer(run)
    out = [("two stock nnU-Net models", [(stock, "stock", None), (second_stock(run), "stock", None)]),
           ("stock nnU-Net alone", [(stock, "stock", None)])]
    for _, trainer, c in learned_heads(run)[0]:
        label = setting_label((c["sampler"], c["steps"], c["samples"]))
        out.append((f"stock + {trainer}", [(stock, "stock", None),
                                            (trainer, label, _change(c["sampler"], c["steps"], c["samples"]))]))
    return out


def measure_ensembles(run) -> None:
    """Each ensemble of :func:`ensemble_settings` on the held-out cases (state key "ensemble <name>"): its members'
    predictions with probabilities (:func:`probabilities`), :func:`equal_compute` against the two stock models,
    nnU-Net's ensembling (:func:`ensemble_folder`), the table's evaluation; then "ensemble section" listing them."""
    from .accuracy import evaluate_cases
    from .table_stats import per_case
    if run.state.done("ensemble section"):
        return
    raw, cases, _ = heldout_inputs(run)
    settings = ensemble_settings(run)
    reference = {t: member_steps(run, t) for t, _, _ in settings[0][1]}
    for _, members in settings:  # every ensemble's accounting before any prediction or ensembling
        if len(members) > 1:
            equal_compute({t: member_steps(run, t) for t, _, _ in members}, reference)
    keys = []
    for name, members in settings:
        key = f"ensemble {name}"
        keys.append(key)
        if run.state.done(key):
            continue
        steps = {t: member_steps(run, t) for t, _, _ in members}
        preds = [probabilities(run, t, label, change) for t, label, change in members]
        if len(members) > 1:
            out = run.workdir / "ensembles" / name.replace(" ", "_").replace("+", "plus")
            ensemble_folder([Path(p["folder"]) for p in preds], out)
        else:
            out = Path(preds[0]["folder"])
        res = evaluate_cases(out, raw, cases)
        run.state.record(key, {"name": name, "members": [{"trainer": t, "setting": label, "steps": steps[t],
                                                          "seconds_per_case": p["seconds_per_case"]}
                                                         for (t, label, _), p in zip(members, preds)],
                               "training_steps": sum(steps.values()), "cases": cases,
                               "seconds_per_case": sum(p["seconds_per_case"] for p in preds),
                               "dice": per_case(res, "dice"), "hd95": per_case(res, "hd95"), "run": run.run_id})
        print(f"[table] {key}: " + ", ".join(f"{r} {100 * np.mean(v):.1f}" for r, v in per_case(res, "dice").items()),
              flush=True)
    run.state.record("ensemble section", {"rows": keys})


def ensemble_result(run) -> dict | None:
    """The ensemble section of table.json (None until :func:`measure_ensembles` finished): per row its members
    (trainer, setting, optimiser steps, prediction seconds), training steps, seconds per case, Dice and HD95 per region
    (mean, bootstrap interval) and the paired test against the two-stock ensemble (``benchmarks.table.score_against``),
    the per-case values kept."""
    from .table_stats import score_against
    sec = run.state.records.get("ensemble section")
    if sec is None:
        return None
    measured = [run.state.get(k) for k in sec["rows"]]
    ref = measured[0]
    regions = list(ref["dice"])
    rows = [{"name": m["name"], "members": m["members"], "training_steps": m["training_steps"],
             "seconds_per_case": m["seconds_per_case"], "per_case": {"dice": m["dice"], "hd95": m["hd95"]},
             **score_against(m, ref, regions)} for m in measured]
    return {"regions": regions, "cases": ref["cases"], "reference": ref["name"], "rows": rows}


def measure(run) -> None:
    """Both sections, after the table's held-out rows: the uncertainty maps, then the ensembles (the second stock
    model must be trained: :func:`train_second_stock`)."""
    measure_uncertainty(run)
    measure_ensembles(run)


# ------------------------------------------------------------------------------------------------ rendering
def _f(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def uncertainty_markdown(section: dict | None) -> str:
    """The uncertainty section's table: one row per map and region: voxel AUROC for the errors, AURC (optimal), ECE,
    Brier, Spearman rho of mean uncertainty against Dice (p), samples, s / case and x stock."""
    from .table_stats import p_text
    if not section:
        return "(the uncertainty section has not been measured yet)"
    head = ["uncertainty map", "setting", "region", "AUROC (errors)", "AURC (optimal)", "ECE", "Brier",
            "Spearman rho vs Dice (p)", "s / case", "x stock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in section["rows"]:
        for region, q in row["quality"].items():
            rho = "–" if math.isnan(q["spearman_rho"]) else f"{q['spearman_rho']:+.2f} ({p_text(q['spearman_p'])})"
            lines.append("| " + " | ".join([
                row["label"], row["setting"] + (f" ({row['note']})" if row.get("note") else ""), region,
                _f(q["auroc"]), f"{_f(q['aurc'], 4)} ({_f(q['optimal_aurc'], 4)})", _f(q["ece"]), _f(q["brier"], 4),
                rho, f"{row['seconds_per_case']:.2f}", f"{row['x_stock']:.2f}"]) + " |")
    return "\n".join(lines)


def ensemble_markdown(section: dict | None) -> str:
    """The ensemble section's table: one row per ensemble, its members and training steps, Dice and HD95 per region
    as mean [95 % interval], the paired test against the two-stock ensemble, s / case and x stock alone."""
    from .table_stats import _ci, p_text
    if not section:
        return "(the ensemble section has not been measured yet)"
    regions = section["regions"]
    head = ["ensemble", "members (optimiser steps)", "training steps"] + [f"Dice {r} (%)" for r in regions] \
        + [f"HD95 {r} (mm)" for r in regions] + [f"against {section['reference']} (Dice, paired Wilcoxon)",
                                                 "s / case", "x stock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stock = next((r for r in section["rows"] if len(r["members"]) == 1), section["rows"][0])
    stock_s = stock["seconds_per_case"]
    for row in section["rows"]:
        cells = [row["name"], " + ".join(f"{m['trainer']} ({m['setting']}, {m['steps']})" for m in row["members"]),
                 str(row["training_steps"])]
        cells += [_ci(row["dice"][r], 100) for r in regions] + [_ci(row["hd95"][r]) for r in regions]
        cells.append("; ".join(f"{r}: {c['verdict']} ({100 * c['mean_difference']:+.1f}, {p_text(c['p_value'])})"
                               for r, c in row["against_stock"].items()) or "(the reference)")
        cells += [f"{row['seconds_per_case']:.2f}", f"{row['seconds_per_case'] / stock_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reliability_png(section: dict | None, path: Path) -> Path | None:
    """The reliability diagrams of the section's fused probabilities (one panel per region; stock nnU-Net's, whose
    entropy and mirror-variance rows share them, and each head's), written to ``path``; None without a section."""
    from nnunet_diffusion.evaluation.uncertainty_quality import bins_from_dict, reliability_diagram
    if not section:
        return None
    curves = {}
    for row in section["rows"]:
        if row["map"] != MAP_ENTROPY:
            continue
        name = "stock nnU-Net" if row["label"] == STOCK_ENTROPY else f"{row['trainer']} ({row['setting']})"
        curves[name] = {r: bins_from_dict(q["calibration"]) for r, q in row["quality"].items()
                        if q.get("calibration") is not None}
    return reliability_diagram(curves, path, f"fused probabilities on {len(section['cases'])} held-out phantoms, "
                                             f"within {section['margin']:g} voxels of reference or prediction")


def _mean_auroc(row: dict) -> float:
    v = [q["auroc"] for q in row["quality"].values() if not math.isnan(q["auroc"])]
    return float(np.mean(v)) if v else math.nan


def headline_sentence(result: dict) -> str:
    """For the README's headline block: the best error-finding map (highest voxel AUROC, mean over regions) against
    stock's softmax entropy per region, and whether any stock + head ensemble beats the two-stock ensemble (the
    paired test's verdict "better" in some region). "" when neither section is in ``result``."""
    parts = []
    u, e = result.get("uncertainty"), result.get("ensembles")
    if u:
        rows = [r for r in u["rows"] if not math.isnan(_mean_auroc(r))]
        stock = next(r for r in u["rows"] if r["label"] == STOCK_ENTROPY)
        if rows:
            best = max(rows, key=_mean_auroc)
            per = " / ".join(f"{region} {_f(q['auroc'], 2)}" for region, q in best["quality"].items())
            base = " / ".join(f"{_f(q['auroc'], 2)}" for q in stock["quality"].values())
            parts.append(f"Best error-finding uncertainty map (voxel AUROC for the errors, within {u['margin']:g} "
                         f"voxels of reference or prediction, {len(u['cases'])} held-out phantoms): {best['label']}"
                         + (f" ({best['setting']})" if best["label"] != STOCK_ENTROPY else "")
                         + f", AUROC {per}" + ("" if best is stock else f" (stock's softmax entropy: {base})") + ".")
    if e:
        better = []
        for row in e["rows"][1:]:
            if len(row["members"]) < 2:
                continue
            wins = [f"{r} {100 * c['mean_difference']:+.1f} points" for r, c in row["against_stock"].items()
                    if c["verdict"] == "better"]
            if wins:
                better.append(f"{row['name']} ({', '.join(wins)})")
        parts.append("At equal training compute, better than the ensemble of two stock nnU-Net models: "
                     + ("; ".join(better) if better else "no stock + head ensemble, in any region") + " (Dice, paired "
                     "Wilcoxon, p < 0.05 and an interval of the difference that excludes 0).")
    return " ".join(parts)


def section_blocks(result: dict, png_name: str) -> list[str]:
    """RESULTS.md's blocks for both sections (paragraphs, tables, the reliability PNG ``png_name``), or [] when
    neither was measured; to go after :func:`benchmarks.table.section`'s blocks."""
    import textwrap

    def para(text: str) -> str:
        return textwrap.fill(text, 116, break_long_words=False, break_on_hyphens=False)

    out = []
    u, e = result.get("uncertainty"), result.get("ensembles")
    if u:
        skipped = "; ".join(f"{s['trainer']} {s['reason']}" for s in u["not_measured"])
        out += [para(f"Uncertainty that finds the errors (issue 34), on the same {len(u['cases'])} held-out phantoms: "
                     "each map against the errors of the segmentation it comes with. AUROC: how well the map separates "
                     "the wrong voxels from the right ones (1 perfect, 0.5 chance), and AURC, the area under the "
                     "risk-coverage curve (lower is better; in brackets the least any map reaches on those errors), "
                     f"both pooled over the cases within {u['margin']:g} voxels (Euclidean) of reference or "
                     "prediction; ECE (15 bins) and Brier score: calibration of the fused probabilities (the mirror "
                     "variance is scored with stock's); Spearman rho: the cases' mean uncertainty against their Dice "
                     "(negative: the more uncertain cases are the worse ones). Stock nnU-Net's maps: the entropy of its "
                     "fused sigmoid probabilities (what nndiff predict --uncertainty writes) and the variance over its "
                     "8 mirrored predictions; each learned head: the entropy of its fused probabilities at its chosen "
                     f"sampler with {u['samples']} samples (its chosen samples if more; a head that draws one sample "
                     "per window says so). s / case: nnU-Net's predict_single_npy_array with the probabilities "
                     "exported; x stock against stock's."
                     + (f" Not measured: {skipped}." if skipped else "")),
                uncertainty_markdown(u), f"![Reliability diagrams of the fused probabilities]({png_name})"]
    if e:
        out += [para("Ensembles at equal training compute: nnU-Net's own ensembling (nnunetv2's ensemble_folders, "
                     "behind nnUNetv2_ensemble: the members' probabilities averaged) of stock nnU-Net + each learned "
                     "head, against the ensemble of two stock models trained with identical settings (nnU-Net fixes no "
                     "seed: the two trainings differ by their random draws alone), the same optimiser steps in total; "
                     "stock alone (half the compute) for context. Each head at its held-out row's setting. Scored "
                     f"against the two-stock ensemble on the same {len(e['cases'])} held-out phantoms: mean [95 % "
                     "bootstrap interval], paired Wilcoxon of Dice per case (better/worse only where p < 0.05 and the "
                     "interval of the difference excludes 0). s / case: the members' predictions with probabilities, "
                     "added."),
                ensemble_markdown(e)]
    headline = headline_sentence(result)
    return out + ([para(headline)] if headline else [])
