"""The table users came for (issue 20): every head against stock nnU-Net at an equal training budget, scored on
held-out cases, each head at the cheapest sampler that keeps its accuracy.

This module holds the table's machinery, each piece small enough to test on made-up inputs
(tests/test_table.py):

- budget accounting: ``optimizer_steps`` (what a trainer variant will train) and ``training_budget`` (what a
  finished training did, read from its checkpoint), from nnunet_diffusion/budget.py;
- statistics: :func:`bootstrap_interval` (95 % percentile bootstrap of a mean, SciPy's), :func:`paired_test`
  (SciPy's Wilcoxon signed-rank test against stock, paired by case) and :func:`verdict`;
- the default-choosing rule: :func:`cheapest_within`;
- resume: :class:`TableState` (what has finished, written atomically after every step); within a measurement,
  each predicted case is kept with its seconds (``benchmarks.accuracy.finished_cases``), so an interruption during
  a long sampler (DDMD's or MoDiff's paper chain: minutes per case) loses one case.

Prediction seconds: on fold 0's validation cases (curves, steps-accuracy), the predictor's sliding window on
nnU-Net's preprocessed case (export excluded, after an untimed warm-up); on the held-out cases, nnU-Net's
``predict_single_npy_array`` per case (preprocessing, sliding window and export; reading the files excluded), the
same for every trainer, so "x stock" compares like with like.

One optimiser step is one ``train_step`` call: one batch, one update of every part that trains at that stage
(NNDM's joint stage updates backbone and refiner in the same step; it counts once). A head with stages (NNDM's
nnU-Net + refiner + joint, ReCoSeg's synthesiser + segmenter, DDMD's autoencoders + diffusion) counts all of
them, baseline included: NNDM's budget is its whole schedule.
"""
from __future__ import annotations

import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# budget accounting lives in the package (the demo uses it too)
from nnunet_diffusion.budget import (Budget, early_stop_of, optimizer_steps, planned_budget,  # noqa: F401
                                     training_budget)
from nnunet_diffusion import registry
from nnunet_diffusion.errors import NNDiffError

from . import table_uncertainty
from .table_stats import (LEARNED_FLOOR, Paired, _ci, bootstrap_interval, learned, p_text,  # noqa: F401
                          paired_test, per_case, score_against, setting_label, verdict)


# ------------------------------------------------------------------------------------------------ defaults
def cheapest_within(rows: Iterable[dict], tolerance: float = 1.0) -> dict:
    """The default-choosing rule: of the measured sampling settings ``rows`` (each with ``cost``, e.g. denoiser
    passes per window = steps x samples, and ``dice``, the mean over regions in percent), the cheapest whose Dice
    is within ``tolerance`` points of the best one's. Equal cost: the more accurate. Rows with a NaN Dice are
    never chosen."""
    rows = [r for r in rows if not math.isnan(float(r["dice"]))]
    if not rows:
        raise ValueError("cheapest_within: no measured setting with a Dice value")
    best = max(float(r["dice"]) for r in rows)
    keep = [r for r in rows if float(r["dice"]) >= best - tolerance]
    return min(keep, key=lambda r: (float(r["cost"]), -float(r["dice"])))


def stock_check(curve: Sequence[dict], floor: float = 0.8) -> dict:
    """Is the budget large enough? The stock model's last curve point (fold 0's validation cases, never the
    held-out ones) must reach ``floor`` Dice in every region; ``curve`` is [{steps, dice: {region: value}}]."""
    points = sorted(curve, key=lambda q: q["steps"])
    last = points[-1]
    low = sorted(r for r, v in last["dice"].items() if v < floor)
    out = {"steps": last["steps"], "dice": last["dice"], "floor": floor, "sane": not low, "below_floor": low}
    if len(points) > 1:  # still rising? the change since the point before, per region
        out["since"] = {"steps": points[-2]["steps"],
                        "change": {r: v - points[-2]["dice"][r] for r, v in last["dice"].items()}}
    return out


def heldout_choice(d: dict) -> dict:
    """The setting a head is scored at on the held-out cases (``d``: its ``defaults`` record): its chosen default;
    for a model that did not learn (:func:`learned`), which has no default, its cheapest measured setting (the rule's
    pick among settings that all segment at chance would cost hours of held-out prediction and show nothing more)."""
    return d["chosen"] if learned(d) else cheapest_within(d["rows"], tolerance=math.inf)


def sweep_passes(grid: Sequence[tuple], named: dict) -> tuple[list[tuple], list[tuple]]:
    """The steps-accuracy settings ``grid`` ((sampler, steps, samples), plus each ``named`` chain: {name:
    SamplingOptions}) in two passes. First: every one-sample setting, and a one-sample twin of each named chain that
    draws several (the paper's DDPM chain at 1 sample). Second: the settings with several samples, the costly ones
    (MoDiff's paper chain: 250 steps x 16 samples). :meth:`TableRun.choose_default` runs the second only for a model
    that learned (its first pass's best reaches :data:`LEARNED_FLOOR`): averaging samples of a model that segments at
    chance says nothing about the sampler a trained one needs, and would cost hours per head on a CPU."""
    settings = list(grid)
    for o in named.values():
        if (o.sampler, o.steps, o.samples) not in settings:
            settings.append((o.sampler, o.steps, o.samples))
    first = [g for g in settings if g[2] == 1]
    for o in named.values():
        if o.samples > 1 and (o.sampler, o.steps, 1) not in first:
            first.append((o.sampler, o.steps, 1))
    return first, [g for g in settings if g[2] > 1]


def sweep(first: Sequence[tuple], second: Sequence[tuple], measure, floor: float = LEARNED_FLOOR
          ) -> tuple[list[dict], list[tuple]]:
    """Measure the passes of :func:`sweep_passes` (``measure(setting)`` -> a row with ``dice``, mean over regions in
    percent): the second only when the first's best reaches ``floor``. Returns the rows and the settings skipped."""
    rows = [measure(g) for g in first]
    if max(r["dice"] for r in rows) >= floor:
        return rows + [measure(g) for g in second], []
    return rows, list(second)


def setting_tags(setting: tuple, named: dict) -> list[str]:
    """The names of the ``named`` chains ``setting`` is, and "<name> at 1 sample" for a one-sample twin."""
    sampler, steps, samples = setting
    tags = [n for n, o in named.items() if (o.sampler, o.steps, o.samples) == setting]
    if samples == 1:
        tags += [f"{n} at 1 sample" for n, o in named.items() if (o.sampler, o.steps) == (sampler, steps)
                 and o.samples > 1]
    return tags


APPLIED_TAG = "[make table]"
"""The tag of the comment lines :func:`set_default_sampler` writes into a TOML (after ``# ``); the documentation
generator (devtools/docs.py) reads it to keep a run of such lines' tag once."""
APPLIED = f"# {APPLIED_TAG}"
"""The first characters of every comment line :func:`set_default_sampler` writes (and replaces on the next run)."""
COMMENT_WIDTH = 120


def set_default_sampler(toml_text: str, sampler: str, steps: int, samples: int, why: Sequence[str]) -> str:
    """``toml_text`` with the ``sampler``, ``sampling_steps`` and ``num_samples`` of its ``[defaults]`` table set,
    the lines of ``why`` written above ``sampler`` as comments starting with :data:`APPLIED` (each wrapped at
    :data:`COMMENT_WIDTH` columns; those of an earlier run replaced); every other line, comments included, kept.
    A [defaults] without the three keys is an error."""
    lines = toml_text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == "[defaults]"), None)
    if start is None:
        raise ValueError("no [defaults] table")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [line for line in lines[start + 1:end] if not line.startswith(APPLIED)]
    values = {"sampler": f'"{sampler}"', "sampling_steps": str(int(steps)), "num_samples": str(int(samples))}
    seen = set()
    for i, line in enumerate(body):
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in values:
            body[i] = f"{key} = {values[key]}"
            seen.add(key)
    if seen != set(values):
        raise ValueError(f"[defaults] lacks {sorted(set(values) - seen)}")
    at = next(i for i, line in enumerate(body) if line.split("=", 1)[0].strip() == "sampler")
    width = COMMENT_WIDTH - len(APPLIED) - 1
    body[at:at] = [f"{APPLIED} {part}" for w in why for part in textwrap.wrap(w, width, break_on_hyphens=False)]
    return "\n".join(lines[:start + 1] + body + lines[end:])


def apply_defaults(result: dict, configs: Path) -> list[str]:
    """Write every head's chosen default sampler (``result["defaults"]``, from ``table.json``) into the
    ``[defaults]`` of its ``configs/<head>.toml``, with the measurement as the comment; returns one line per head.
    A head with a model trained to its own plateau (issue 33) that learned takes that model's choice, else its
    equal-budget model's. A head whose model did not learn (:func:`learned`) keeps its ``[defaults]``, and its line
    says why."""
    from nnunet_diffusion.trainers import TRAINERS
    done = []
    chosen: dict[str, tuple[str, dict]] = {}  # head -> (trainer, record): its own-plateau model's if that learned
    for trainer, d in sorted(result["defaults"].items()):
        head = TRAINERS[trainer].head
        own = trainer.endswith("_" + PLATEAU_VARIANT) and learned(d)
        if head not in chosen or own:
            chosen[head] = (trainer, d)
    for head, (trainer, d) in sorted(chosen.items()):
        c, best = d["chosen"], max(d["rows"], key=lambda r: r["dice"])
        path = configs / f"{head}.toml"
        if not learned(d):
            done.append(f"{path}: [defaults] kept: {trainer}'s best setting ({best['setting']}) scored "
                        f"{best['dice']:.1f} mean Dice, below the {LEARNED_FLOOR:g} of a model that learned to "
                        f"segment in {result['budget_steps']} optimiser steps; its steps-accuracy curve says nothing "
                        "about the sampler a trained model needs")
            continue
        if "sampler" not in TRAINERS[trainer].predict_only():  # e.g. ReCoSeg's residual_sampler = "inference"
            done.append(f"{path}: [defaults] kept: its sampler is a training key (ReCoSeg's residual_sampler = "
                        f"\"inference\" draws the training residual maps with it), so moving it would change what "
                        f"the model trains on; the measured settings are in table.json (chosen: {c['setting']}, "
                        f"{c['dice']:.1f})")
            continue
        paper = [r for r in d["rows"] if "paper" in r.get("tags", [])]
        why = [f"shipped sampler, chosen by `make table` ({result['date']}; {result['budget_steps']} optimiser steps "
               f"of {trainer}): the cheapest setting within {d['tolerance']:g} Dice point (mean over regions, fold "
               f"0's validation cases) of the best measured: {c['setting']} {c['dice']:.1f} (best: "
               f"{best['setting']}, {best['dice']:.1f}"
               + (f"; the paper's chain {paper[0]['setting']}, {paper[0]['dice']:.1f}" if paper else
                  "; the paper's chain not measured") + "). The paper's chain: the `_paper` variant."]
        path.write_text(set_default_sampler(path.read_text(), c["sampler"], c["steps"], c["samples"], why))
        done.append(f"{path}: [defaults] sampler {c['setting']}")
    return done


# ------------------------------------------------------------------------------------------------ resume
class TableState:
    """What has finished, as JSON in ``path``: {key: record}. Written atomically after every record, so an
    interrupted run resumes from the last finished step and never reads a half-written file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str):
        return self.records[key]

    def record(self, key: str, value) -> None:
        from nnunet_diffusion.atomic import write_text_atomic
        self.records[key] = value
        write_text_atomic(self.path, json.dumps(self.records, indent=2, sort_keys=True))



# ------------------------------------------------------------------------------------------------ rendering
NOT_LEARNED_MARK = " †"


def not_learned(result: dict, trainer: str) -> bool:
    """Did ``trainer``'s model fail to learn to segment in the table's budget (its best steps-accuracy setting below
    :data:`LEARNED_FLOOR`)? False for a trainer without a defaults record (stock nnU-Net)."""
    d = result.get("defaults", {}).get(trainer)
    return d is not None and not learned(d)


def not_learned_sentence(result: dict) -> str:
    """The footnote of the rows marked :data:`NOT_LEARNED_MARK` ("" when every head learned)."""
    parts = []
    for trainer, d in result.get("defaults", {}).items():
        if not learned(d):
            best = max(d["rows"], key=lambda r: r["dice"])
            parts.append(f"{trainer} {best['dice']:.1f} ({best['setting']})")
    if not parts:
        return ""
    return (f"{NOT_LEARNED_MARK.strip()} did not learn to segment in {result['budget_steps']} optimiser steps, the "
            "budget at which stock nnU-Net has plateaued: the best sampling setting of each scored below "
            f"{LEARNED_FLOOR:g} mean Dice on fold 0's validation cases ({'; '.join(parts)}). Its row is its cheapest "
            "measured setting, not a default: its trainer config keeps the sampler of its [defaults].")


def config_changes(trainer: str, recorded: dict) -> list[str]:
    """How today's trainer_configs/ differ from ``recorded``, the trainer config ``trainer``'s model trained under
    (its checkpoint's "trainer_config"): "key old -> new" for each training key (predict-only keys, which the table
    sets per row, left out), "key (added since) = new" for a key the model predates. [] when it would train the same."""
    from nnunet_diffusion.spec import config_differences
    from nnunet_diffusion.trainers import TRAINERS
    cls = TRAINERS.get(trainer)
    if cls is None:
        return ["(no such trainer today)"]
    hp = cls.hparams()
    keys = set(hp.keys())  # what a checkpoint records beyond its spec (e.g. NNDM's residual_source_used) left out
    new, changed = config_differences({k: v for k, v in recorded.items() if k in keys}, hp.as_dict(),
                                      cls.predict_only())
    return changed + [f"{k} (added since) = {hp.as_dict()[k]!r}" for k in new]


def config_sentence(result: dict) -> str:
    """Whether the table's models trained under today's trainer_configs/ ("" when every one did): a table.json that
    records no configs (a run before they were recorded), or the trainers whose config changed since, with the keys."""
    recorded = result.get("trainer_configs")
    if recorded is None:
        return ("This table.json does not record the trainer configs its models trained under (a run before they "
                "were recorded): trainer_configs/ may have changed since, and `make table` measures today's.")
    parts = []
    for trainer, cfg in sorted(recorded.items()):
        changes = ["(its checkpoint records no config)"] if cfg is None else config_changes(trainer, cfg)
        if changes:
            parts.append(f"{trainer}: {'; '.join(changes)}")
    if not parts:
        return ""
    return ("Trained under other settings than today's trainer_configs/ (its row is the earlier config's; `make "
            f"table` measures today's): {'. '.join(parts)}.")


BUSY_MARK = " ‡"
BUSY_LOAD = 1.5
"""A training whose load average exceeded this x the machine's cores ran beside other work: at its end (1, 5 or
15 min), or during it (the 5-min load sampled as each epoch starts, every attempt of a resumed training; runs since
2026-12-07 record it). The training itself keeps about one core per process busy (nnU-Net's and its augmentation
worker's, load ~2 on 2 cores), so more means something else shared the CPU and its wall time overstates a quiet
run's."""


def busy(result: dict, b: dict) -> bool:
    """Did the training recorded as ``b`` (a budget record with "load_average_after" and, in newer runs,
    "load_average_5min_max") run beside other work?"""
    cores = result.get("cpu_count") or 2
    return max((b.get("load_average_after") or []) + [b.get("load_average_5min_max") or 0]) > BUSY_LOAD * cores


def busy_sentence(result: dict, trainings: dict | None = None) -> str:
    """The footnote of the wall times marked :data:`BUSY_MARK` ("" when none is): ``trainings`` ({trainer: budget
    record}, default the equal-budget table's ``result["budget"]``) that :func:`busy` finds, with their loads."""
    trainings = result.get("budget", {}) if trainings is None else trainings

    def loads(b):
        end = (f"{' / '.join(f'{x:g}' for x in b['load_average_after'])} at its end"
               if b.get("load_average_after") else "")
        during = (f"5-min load up to {b['load_average_5min_max']:g} during it"
                  if b.get("load_average_5min_max") is not None else "")
        return "; ".join(x for x in (end, during) if x)
    parts = [f"{t} ({loads(b)})" for t, b in sorted(trainings.items()) if busy(result, b)]
    if not parts:
        return ""
    return (f"{BUSY_MARK.strip()} trained beside other work: its load average (1 / 5 / 15 min) at its end, or its "
            f"5-min load sampled at every epoch, exceeded {BUSY_LOAD:g} x the {result.get('cpu_count') or 2} cores, "
            f"so its wall time overstates a quiet run's (the optimiser steps, and so the accuracy, are unaffected): "
            f"{'; '.join(parts)}.")


def markdown(result: dict) -> str:
    """The table of ``table.json``: one row per trainer and setting, Dice (%) and HD95 (mm) per region as mean
    [95 % bootstrap interval], the paired test against stock per region, prediction seconds per case and x stock,
    and the budget each trainer trained with."""
    regions = result["regions"]
    head = ["trainer", "prediction setting", "optimiser steps", "training wall time"]
    head += [f"Dice {r} (%)" for r in regions] + [f"HD95 {r} (mm)" for r in regions]
    head += ["against stock (Dice, paired Wilcoxon)", "s / case", "x stock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stock_s = result["rows"][0]["seconds_per_case"]
    for row in result["rows"]:
        b = result["budget"][row["trainer"]]
        mark = NOT_LEARNED_MARK if not_learned(result, row["trainer"]) else ""
        steps = str(b["steps"]) + (f" of {b['cap_steps']} ({b['early_stop']['reason'].split(':')[0]})"
                                   if b.get("early_stop") else f" of {b['cap_steps']} (cap)" if "cap_steps" in b else "")
        cells = [row["trainer"] + mark, row["setting"], steps,
                 f"{b['seconds'] / 60:.0f} min" + (BUSY_MARK if busy(result, b) else "")]
        cells += [_ci(row["dice"][r], 100) for r in regions] + [_ci(row["hd95"][r]) for r in regions]
        if row.get("against_stock"):
            cells.append("; ".join(f"{r}: {c['verdict']} ({100 * c['mean_difference']:+.1f}, {p_text(c['p_value'])})"
                                   for r, c in row["against_stock"].items()))
        else:
            cells.append("(the reference)")
        cells += [f"{row['seconds_per_case']:.2f}", f"{row['seconds_per_case'] / stock_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _voxels(size) -> str:
    return " x ".join(str(round(v)) for v in size) + " voxels"


def provenance_line(result: dict) -> str:
    p = result["phantoms"]
    return (f"{result['date']}, {result['machine']}; {len(result['heldout_cases'])} held-out phantoms (seed "
            f"{p['heldout_seed']}) never seen in training or in any choice, {p['train_cases']} training phantoms "
            f"(seed {p['seed']}, fold 0 of nnU-Net's 5-fold split), BraTS {p['edition']} layout at {p['spacing']} mm"
            f"{', shape ' + 'x'.join(map(str, p['shape'])) if p.get('shape') else ''}"
            + (f" (nnU-Net's plans: median image {_voxels(result['plans']['median_image_size_in_voxels'])}, patch "
               f"{_voxels(result['plans']['patch_size'])}, batch {result['plans']['batch_size']})"
               if result.get("plans") else "")
            + f"; every trainer "
            f"{result['budget_steps']} optimiser steps; "
            + ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
            + f"; `{result['command']}`")


def plot_curves(result: dict, png: Path) -> None:
    """Dice per region against optimiser steps, one line per trainer (and NNDM's refinement off), one panel per
    region, from the snapshots' scores on fold 0's validation cases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    regions = result["regions"]
    fig, axes = plt.subplots(1, len(regions), figsize=(4.2 * len(regions), 3.6), sharey=True)
    for ax, region in zip(np.atleast_1d(axes), regions):
        for label, points in sorted(result["curves"].items()):
            pts = sorted(points, key=lambda q: q["steps"])
            ax.plot([q["steps"] for q in pts], [100 * q["dice"][region] for q in pts], marker="o", ms=3,
                    label=label)
        ax.set_title(region)
        ax.set_xlabel("optimiser steps")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("Dice (%), fold 0 validation cases")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 3) // 4), 1, 1))
    from nnunet_diffusion.atomic import atomic_path
    try:
        with atomic_path(png, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def verdict_sentences(result: dict) -> list[str]:
    """One plain sentence per head row: where it is better than stock, where worse, where no different."""
    return [f"{row['trainer']} ({row['setting']}): Dice {_verdict_text(row)}." for row in result["rows"][1:]]


def summary_sentence(result: dict) -> str:
    """The table's answer in one sentence, for the top of the README: which heads (rows at their default, NNDM's
    refinement off apart) are better than stock nnU-Net in some region, which are worse in every region or in some,
    which no different in any; "none" said plainly."""
    groups = {"better": [], "worse everywhere": [], "worse": [], "same": []}
    for row in result["rows"][1:]:
        if row.get("kind") == "plateau":
            continue  # not at the equal budget: plateau_sentence
        verdicts = {r: c["verdict"] for r, c in row["against_stock"].items()}
        label = row["trainer"] + (" with its refinement off" if row["setting"].startswith("refinement off") else "")
        better = [r for r, v in verdicts.items() if v == "better"]
        worse = [r for r, v in verdicts.items() if v == "worse"]
        if better:
            groups["better"].append(f"{label} ({', '.join(better)})")
        if worse and len(worse) == len(verdicts):
            groups["worse everywhere"].append(label)
        elif worse:
            groups["worse"].append(f"{label} ({', '.join(worse)})")
        if not better and not worse:
            groups["same"].append(label)
    worse_clauses = ([f"Worse in every region: {'; '.join(groups['worse everywhere'])}."]
                     if groups["worse everywhere"] else []) \
        + ([f"Worse in some region: {'; '.join(groups['worse'])}."] if groups["worse"] else [])
    return " ".join([f"At an equal budget of {result['budget_steps']} optimiser steps, on "
                     f"{len(result['heldout_cases'])} held-out phantoms: better than stock nnU-Net in some region: "
                     f"{'; '.join(groups['better']) or 'none'}.",
                     *(worse_clauses or ["Worse in some region: none."]),
                     f"No significant difference in any region: {'; '.join(groups['same']) or 'none'}.",
                     *([plateau_sentence(result)] if plateau_sentence(result) else []),
                     "(Dice, paired Wilcoxon test per region: p < 0.05 and a bootstrap interval of the difference "
                     "that excludes 0.)"])


def _verdict_text(row: dict) -> str:
    by = {}
    for r, c in row["against_stock"].items():
        by.setdefault(c["verdict"], []).append(r)
    return "; ".join(f"{v} than stock in {', '.join(rs)}" if v != "no significant difference" else
                     f"not significantly different from stock in {', '.join(rs)}" for v, rs in by.items())


def plateau_sentence(result: dict) -> str:
    """The own-plateau rows (issue 33) in one sentence: each head's steps, why it stopped, and its verdict against
    stock ("" when the run has none)."""
    parts = []
    for row in result["rows"]:
        if row.get("kind") != "plateau":
            continue
        b = result["budget"][row["trainer"]]
        stop = b.get("early_stop")
        why = (f"stopped at {b['steps']} steps ({stop['reason'].split(':')[0]})" if stop else
               f"ran to its cap of {b.get('cap_steps', b['steps'])} steps without a plateau")
        parts.append(f"{row['trainer']} {why}, {b['seconds'] / 60:.0f} min: {_verdict_text(row)}")
    if not parts:
        return ""
    return "Trained to their own plateau (up to 4x the budget): " + "; ".join(parts) + "."


X0_NOTE = ("Rows marked \"x0 (NOT the paper's)\": the same head trained at the same budget with its denoiser predicting "
           "the mask x0 (loss ||x0 - x0_hat||^2) instead of the noise, as Diff-UNet and ImgX-DiffSeg do: not the "
           "parameterisation of its paper. They separate the method from its parameterisation.")
PLATEAU_NOTE = ("Rows marked \"own plateau\": the head's [variants.table_plateau], trained until nnU-Net's online EMA "
                "pseudo Dice (fold 0's validation patches, the head's cheap online-validation sampler) stopped rising "
                "(trainers/early_stop.py), or stopped early where it was still at chance, capped at 4x the budget; "
                "their sampler chosen on their own steps-accuracy curve. Not an equal-budget comparison: the steps and "
                "wall time are in the row.")

INSAMPLE_NOTE = ("Rows marked \"in-sample residual maps\": ReCoSeg's [variants.table_insample], at the same budget, its "
                 "segmenter trained on residual maps drawn by one synthesiser that trained on those very cases (the "
                 "earlier default), against the default's maps of cases the synthesiser never saw "
                 "(synthesis_cases = \"cross\", issue 32). Both draw their training maps with the sampler they predict "
                 "with.")


# issue 20's cost targets: every head's default prediction at most 3x stock nnU-Net's, NNDM's at most 1.3x
COST_TARGETS = {"nnUNetTrainerNNDM": 1.3}
COST_TARGET = 3.0


def cost_target(trainer: str) -> float:
    return next((v for k, v in COST_TARGETS.items() if trainer.startswith(k + "_")), COST_TARGET)


def shipped_cost(d: dict, stock_val: float | None, target: float) -> str:
    """For a head that did not learn: what its shipped [defaults] chain costs, from the one-sample run of that chain on
    fold 0's validation cases ("" when it was not measured)."""
    one = next((r for r in d["rows"] if {"shipped", "shipped at 1 sample"} & set(r.get("tags", []))), None)
    if one is None or not stock_val:
        return ""
    ratio = one["seconds_per_case"] / stock_val
    full = next((r["setting"] for r in d.get("not_measured", []) if "shipped" in r.get("tags", [])), one["setting"])
    measured = (f"{one['setting']} took {one['seconds_per_case']:.0f} s / case on fold 0's validation cases, "
                f"{ratio:.0f}x stock's there")
    if ratio > target:
        return (f"; its shipped sampler, {full}, is over the target of {target:g}x by "
                + ("its first sample alone: " if full != one["setting"] else "itself: ") + measured)
    return f"; its shipped sampler, {full}: {measured}"


def target_sentences(result: dict) -> list[str]:
    """One sentence per head at its chosen default: whether its held-out prediction time is within its target (x
    stock, :data:`COST_TARGETS`), and where it is not, what the target would cost in accuracy: the best of its
    steps-accuracy settings whose validation time is within the target x stock's validation time (both the
    predictor's time on fold 0's validation cases), or that none is."""
    stock_s = result["rows"][0]["seconds_per_case"]
    stock_val = result.get("validation_stock_seconds")
    out = []
    for row in result["rows"][1:]:
        d = result["defaults"].get(row["trainer"])
        if d is not None and not learned(d) and row["setting"] == heldout_choice(d)["setting"]:
            out.append(f"{row['trainer']}: no default chosen (its model did not learn in the budget, so no cheaper "
                       "setting can be shown to keep a trained model's accuracy): its cost target is not assessed"
                       + shipped_cost(d, stock_val, cost_target(row["trainer"])) + ".")
            continue
        if d is None or row["setting"] != d["chosen"]["setting"]:
            continue  # NNDM's refinement off: its backbone, not a default
        target, ratio = cost_target(row["trainer"]), row["seconds_per_case"] / stock_s
        text = f"{row['trainer']} at its default ({row['setting']}): {ratio:.2f}x stock, "
        if ratio <= target:
            out.append(text + f"within the target of {target:g}x.")
            continue
        best = max(r["dice"] for r in d["rows"])
        text += f"over the target of {target:g}x; the cheapest setting within {d['tolerance']:g} Dice point of its " \
                f"best ({best:.1f}, mean of regions) costs that much"
        if stock_val:
            under = [r for r in d["rows"] if r["seconds_per_case"] <= target * stock_val]
            if under:
                u = max(under, key=lambda r: r["dice"])
                text += f"; within {target:g}x stock its best setting is {u['setting']} at {u['dice']:.1f} " \
                        f"({best - u['dice']:.1f} points below its best)"
            else:
                fastest = min(d["rows"], key=lambda r: r["seconds_per_case"])
                text += f"; none of its settings is within {target:g}x stock (the fastest, {fastest['setting']}, " \
                        f"{fastest['seconds_per_case'] / stock_val:.1f}x on the validation cases)"
        out.append(text + ".")
    return out


def timing_runs(result: dict) -> str:
    """Whether the held-out rows' times were taken in one run of the command (comparable) or, the run interrupted
    and resumed, in several: rows at different moments, and a row whose cases were begun in an earlier run split."""
    runs = {r.get("run") for r in result["rows"]}
    if None in runs:
        return "the run that measured each row not recorded"
    split = sum(1 for r in result["rows"] if r.get("resumed_cases"))
    if len(runs) == 1 and not split:
        return "every row in the same process"
    return (f"the rows in several runs of the command (interrupted and resumed: rows finished by {len(runs)} "
            f"run(s)" + (f", {split} row(s) with cases from an earlier run" if split else "") + "), taken at "
            "different moments, so x stock also carries the machine's load at each")


def section(result: dict, png_name: str) -> list[str]:
    """RESULTS.md's blocks (wrapped paragraphs, the table, a list) for one table run, rendered by
    ``python -m benchmarks``."""
    import textwrap

    def para(text: str) -> str:
        return textwrap.fill(text, 116, break_long_words=False, break_on_hyphens=False)

    defaults = [f"- {trainer}: {d['chosen']['setting']} ({d['chosen']['dice']:.1f}; best "
                f"{max(d['rows'], key=lambda r: r['dice'])['setting']} {max(r['dice'] for r in d['rows']):.1f})"
                + ("" if learned(d) else f"; below the {LEARNED_FLOOR:g} of a model that learned: not a default, "
                   f"its [defaults] kept; its held-out row is its cheapest setting, {heldout_choice(d)['setting']}")
                + ("" if not d.get("not_measured") else "; the settings with several samples not measured (the "
                   "one-sample ones showed a model that did not learn): " + ", ".join(
                       x["setting"] + (f" ({', '.join(x['tags'])})" if x["tags"] else "") for x in d["not_measured"]))
                for trainer, d in result["defaults"].items()]
    check = result.get("stock_check")
    budget = [] if check is None else [para(
        f"Budget check: at {check['steps']} steps the stock model scores "
        + " / ".join(f"{r} {100 * v:.1f}" for r, v in check["dice"].items()) + " Dice on fold 0's validation cases; "
        + ("every region reaches" if check["sane"] else f"**{', '.join(check['below_floor'])} below**")
        + f" the {100 * check['floor']:.0f} % a plateaued stock model should reach"
        + ("." if check["sane"] else
           ": the budget is too small and this table understates what training longer gives.")
        + ("" if "since" not in check else
           f" Since {check['since']['steps']} steps it changed by "
           + " / ".join(f"{100 * v:+.1f}" for v in check["since"]["change"].values())
           + " points: a region still rising by more than a point is not fully plateaued, and the heads' rows are "
           "as far from their own plateaus as their curves show."))]
    footnote = not_learned_sentence(result)
    drift, loaded = config_sentence(result), busy_sentence(result)
    return [para(summary_sentence(result)), para(f"Taken {provenance_line(result)}."), *([para(drift)] if drift else []),
            *budget,
            para("Dice and HD95: mean over the held-out cases [95 % percentile bootstrap interval]; against stock: the "
                 "paired Wilcoxon signed-rank test of Dice per case (better/worse only where p < 0.05 and the interval "
                 "of the difference excludes 0), the mean difference in Dice points. s / case: nnU-Net's "
                 "predict_single_npy_array per case (preprocessing, sliding window with mirroring, export; reading "
                 f"the files excluded), {timing_runs(result)}."),
            markdown(result), *([para(footnote)] if footnote else []), *([para(loaded)] if loaded else []),
            *([para(X0_NOTE)] if any(r.get("kind") == "x0" for r in result["rows"]) else []),
            *([para(PLATEAU_NOTE)] if any(r.get("kind") == "plateau" for r in result["rows"]) else []),
            *([para(INSAMPLE_NOTE)] if any(r.get("kind") == "in-sample" for r in result["rows"]) else []),
            "\n".join(map(para, verdict_sentences(result))),
            f"![Dice per region against optimiser steps, fold 0 validation cases]({png_name})",
            para("Each head's default sampler: the cheapest setting (denoiser passes per window = steps x samples) "
                 f"within {result['tolerance']:g} Dice point (mean over regions) of the best measured on fold 0's "
                 "validation cases (the papers' own chains " + ("included" if result["paper_chain_measured"] else
                                                                "not measured in this run") + "):"),
            "\n".join(defaults),
            para("Cost targets (issue 20: every head's default prediction at most 3x stock, NNDM's at most 1.3x), "
                 "from the held-out s / case:"),
            "\n".join("- " + para(x) for x in target_sentences(result)),
            *([para("NNDM's refiner on top of the trained stock model (issue 32): the stock model's fold 0 as "
                    "NNDIFF_BASELINE, each residual source's refiner trained its own steps on top of it, and stock "
                    "trained as many steps longer; the same held-out cases, scored against stock fold 0 (Dice paired "
                    "Wilcoxon; HD95's verdict beside it; LW Dice: lesion-wise, cases without a lesion left out)."),
               refiner_markdown(result["refiner"])] if result.get("refiner") else []),
            *table_uncertainty.section_blocks(result, png_name.replace("_curves", "_reliability"))]


# ------------------------------------------------------------------------------------------------ the run
# issue 32: the refiner section's NNDM variants (trainer_configs/nndm.toml), one per residual source
REFINERS = {"out of fold, cascade corruption": "refiner_oof", "out of fold, no corruption": "refiner_oof_clean",
            "in sample (the backbone's own)": "refiner_insample"}
STOCK_LONGER = "table_refiner"  # trainer_configs/nnunet.toml: the table's stock model, the refiner's steps longer


def refiner_markdown(section: dict | None) -> str:
    """The refiner section's table: one row per trainer and setting, Dice (and lesion-wise Dice) per region as mean
    [95 % interval], the paired test against stock fold 0, HD95's verdict, steps and wall time (a training beside
    other work marked, :func:`busy`), s / case."""
    if not section:
        return "(the refiner section has not been measured yet)"
    regions = section["regions"]
    head = ["trainer", "setting", "training"] + [f"Dice {r} (%)" for r in regions] \
        + [f"LW Dice {r} (%)" for r in regions] + ["against stock (Dice; HD95)", "s / case", "x stock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stock_s = section["rows"][0]["seconds_per_case"]
    for row in section["rows"]:
        t = row.get("training") or {}
        steps = (f"{t['refiner_steps']} refiner steps on stock's {t['steps'] - t['refiner_steps']}"
                 if "refiner_steps" in t else f"{t.get('steps', '?')} steps")
        if "seconds" in t:  # the refiner's own wall time (stock's apart); a stock row's whole training
            steps += f", {t['seconds'] / 60:.0f} min" + (BUSY_MARK if busy(section, t) else "")
        cells = [row["trainer"], row["setting"], steps]
        cells += [_ci(row["dice"][r], 100) for r in regions]
        cells += [_ci(row["lesionwise_dice"][r], 100) if "lesionwise_dice" in row else "-" for r in regions]
        cells.append("; ".join(f"{r}: {c['verdict']} ({100 * c['mean_difference']:+.1f}, {p_text(c['p_value'])}); "
                               f"HD95 {c['hd95_verdict'].replace('better', 'lower').replace('worse', 'higher')}"
                               for r, c in row["against_stock"].items()) or "(the reference)")
        cells += [f"{row['seconds_per_case']:.2f}", f"{row['seconds_per_case'] / stock_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    loaded = busy_sentence(section, {r["trainer"]: r["training"] for r in section["rows"] if r.get("training")})
    return "\n".join(lines + (["", loaded] if loaded else []))


DATASET_ID = 503
HEADS = tuple((h.name, h.trainer) for h in registry.HEADS)  # stock nnU-Net first: the reference row
# issue 33: beside its equal-budget row, a head whose trainer config declares these variants gets a row trained to its
# own plateau (stop rules of trainers/early_stop.py, capped at PLATEAU_CAP x the budget) and a row under
# x0-prediction at the equal budget (NOT its paper's parameterisation); issue 32: ReCoSeg's segmenter trained on
# in-sample residual maps (its synthesiser saw those cases) at the equal budget, the contrast to its default's maps of
# unseen cases
PLATEAU_VARIANT, X0_VARIANT, INSAMPLE_VARIANT = "table_plateau", "table_x0", "table_insample"
PLATEAU_CAP = 4
EXTRA_KINDS = {PLATEAU_VARIANT: "plateau", X0_VARIANT: "x0", INSAMPLE_VARIANT: "in-sample"}
RESULTS = Path(__file__).resolve().parent / "results"


def parser():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench_table"))
    ap.add_argument("--variant", default="table", help="the trainer variant every head trains (its TOML sets the "
                    "budget; all must give the same optimiser steps)")
    ap.add_argument("--heads", nargs="+", default=[h for h, _ in HEADS[1:]], choices=[h for h, _ in HEADS[1:]])
    ap.add_argument("--train-cases", type=int, default=24)
    ap.add_argument("--heldout-cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="phantom seed of the training cases")
    ap.add_argument("--heldout-seed", type=int, default=20261129)
    ap.add_argument("--spacing", type=float, default=4.0, help="phantom voxel size in mm")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="phantom volume shape (e.g. 128 160 160 at 1 mm "
                    "for a BraTS-size patch on a GPU)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 25, 100])
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--samples-steps", type=int, default=10)
    ap.add_argument("--paper-chain", choices=["on", "off"], default="on", help="measure each head's paper sampling "
                    "chain on the steps-accuracy curve (the issue asks for it; on a CPU DDMD's DDPM 1000 steps x 5 "
                    "samples takes about 20 min per case); off leaves it out unless it is the shipped setting")
    ap.add_argument("--tolerance", type=float, default=1.0, help="Dice points (mean over regions) a default may "
                    "lose against the best measured setting")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--apply-defaults", action="store_true", help="measure nothing: write each head's chosen default "
                    "sampler from the finished run's table.json into trainer_configs/<head>.toml [defaults], with the "
                    "measurement as a comment")
    ap.add_argument("--refiner", choices=["on", "off", "only"], default="on", help="the refiner section (issue "
                    "32): NNDM's refiner trained on top of stock nnU-Net's five folds with each residual source of "
                    "REFINERS, and stock trained as many steps longer; 'only': that section and nothing else")
    ap.add_argument("--stock-folds-only", action="store_true", help="prepare the data and train stock nnU-Net's "
                    "five folds (resumable), nothing else: the trainings no head's code touches")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/table.json (table_cuda.json "
                    "on a GPU)")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.command = " ".join(["python -m benchmarks --part table", *argv])  # = make table TABLE_ARGS="..."
    if args.apply_defaults:
        out = args.out or RESULTS / ("table.json" if args.device == "cpu" else "table_cuda.json")
        if not out.is_file():
            raise SystemExit(f"--apply-defaults: {out} does not exist; run the table first")
        configs = Path(__file__).resolve().parents[1] / "trainer_configs"
        for line in apply_defaults(json.loads(out.read_text()), configs):
            print(line)
        print("now run `make docs` (the reference pages and the README show the defaults) and commit both")
        return 0
    if args.train_cases < 5 or args.heldout_cases < 2:
        raise SystemExit(f"--train-cases must be >= 5 (nnU-Net's 5-fold split) and --heldout-cases >= 2; got "
                         f"{args.train_cases} and {args.heldout_cases}")
    heads = [(h, c) for h, c in HEADS if not registry.head(h).diffusion or h in args.heads]  # stock always
    try:
        budget = planned_budget(args.variant, heads, "the table")
    except NNDiffError as e:
        raise SystemExit(str(e)) from None
    run = TableRun(args, heads, budget)
    try:
        run.check_extra_budgets()
    except NNDiffError as e:
        raise SystemExit(str(e)) from None
    run.prepare()
    stock = f"{HEADS[0][1]}_{args.variant}"
    run.train("nnunet", stock, 0)  # stock's fold 0: the reference row of every section
    if not (args.stock_folds_only or args.refiner == "only"):
        # the heads before stock's folds 1-4 (which only the refiner section needs): the rows no earlier run
        # measured come first, so a run cut off for good (its machine lost) has measured the most it could
        for head, cls in heads:
            run.train(head, f"{cls}_{args.variant}")
            run.measure_training(head, cls)
        for head, cls, variant, kind in run.extra_trainings():  # issue 33: own plateau, x0
            run.train(head, f"{cls}_{variant}", variant=variant, plateau=kind == "plateau")
            run.measure_training(head, cls, variant, kind)
    if args.stock_folds_only or args.refiner != "off":
        for fold in range(1, 5):  # stock nnU-Net's 5-fold CV: all five feed the refiner's out-of-fold residuals
            run.train("nnunet", stock, fold)
    if args.stock_folds_only:
        print(f"[table] --stock-folds-only: {stock}'s five folds are trained", flush=True)
        return 0
    if args.refiner != "off":  # issue 32: NNDM's refiner on top of the trained stock model, beside the equal budget
        run.refiner_trainings()
        run.heldout(run.refiner_settings())
        if args.refiner == "only":
            print(refiner_markdown(run.refiner_result()))
            return 0
    table_uncertainty.train_second_stock(run)  # issue 34: the two-stock ensemble's second model
    run.heldout()  # measures nothing the loops above measured (each row is recorded in state.json as it is taken)
    table_uncertainty.measure(run)  # issue 34: uncertainty quality and ensembles at equal compute
    run.write()
    return 0


def final_validation_env(trainer: str) -> dict:
    """NNDIFF_* for ``nnUNetv2_train``'s own final validation of a table training: the head's online-validation
    sampler with one sample instead of its shipped chain. The table measures every setting itself (the steps-accuracy
    rows include the shipped one); nnU-Net's final validation at the paper chains would add hours (DDMD's DDPM 1000
    steps x 5 samples: about 20 min per case on 2 CPU cores) and decide nothing. Stock nnU-Net: nothing."""
    from nnunet_diffusion.trainers import TRAINERS
    cls = TRAINERS.get(trainer)
    if cls is None or not hasattr(cls, "sampling_defaults"):
        return {}
    o = cls.sampling_defaults(validation=True)
    return {"NNDIFF_SAMPLER": o.sampler, "NNDIFF_STEPS": str(o.steps), "NNDIFF_SAMPLES": "1"}


class TableRun:
    """The run's steps, each recorded in ``<workdir>/state.json`` when it finishes and skipped when found there:
    phantoms and nnU-Net's planning, each training (resumed with nnU-Net's ``--c`` from its last checkpoint), the
    curve point of each kept checkpoint, each steps-accuracy setting, each held-out prediction."""

    def __init__(self, args, heads, budget: int):
        from nnunet_diffusion.environment import workdir_environment
        self.args, self.heads, self.budget = args, heads, budget
        self.paper_chain = args.paper_chain == "on"
        self.workdir = args.workdir.resolve()
        self.state = TableState(self.workdir / "state.json")
        self.logs = self.workdir / "logs"
        self.env = workdir_environment(self.workdir)
        self.run_id = f"{os.uname().nodename} pid {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("nnUNet_")})
        for k in [k for k in os.environ if k.startswith("NNDIFF_")]:
            del os.environ[k]  # predict-time overrides would change what is measured

    # -------------------------------------------------------------- data
    @property
    def dataset(self) -> str:
        return self.state.get("data")["dataset"]

    def raw(self, heldout: bool = False) -> Path:
        return self.workdir / ("heldout_raw" if heldout else "nnUNet_raw") / self.dataset

    def model_folder(self, trainer: str) -> Path:
        return self.workdir / "nnUNet_results" / self.dataset / f"{trainer}__nnUNetPlans__3d_fullres"

    def val_cases(self) -> list[str]:
        split = self.workdir / "nnUNet_preprocessed" / self.dataset / "splits_final.json"
        return json.loads(split.read_text())[0]["val"]

    def prepare(self) -> None:
        from nnunet_diffusion.dataset_conversion.brats import convert_brats
        from nnunet_diffusion.dataset_conversion.phantoms import make_phantoms
        from nnunet_diffusion.environment import BIN, run_logged as _run
        a = self.args
        if not self.state.done("data"):
            settings = dict(edition="2021", spacing=a.spacing, shape=a.shape, crop="brain")
            print(f"[table] phantoms: {a.train_cases} training (seed {a.seed}) + {a.heldout_cases} held-out (seed "
                  f"{a.heldout_seed}), {a.spacing} mm", flush=True)
            train = make_phantoms(self.workdir / "phantoms_train", n=a.train_cases, seed=a.seed, overwrite=True,
                                  **settings)
            res = convert_brats([train["training"]], "2021", raw_root=self.workdir / "nnUNet_raw",
                                dataset_id=DATASET_ID, overwrite=True)
            held = make_phantoms(self.workdir / "phantoms_heldout", n=a.heldout_cases, seed=a.heldout_seed,
                                 first_case=10000, overwrite=True, **settings)
            convert_brats([held["training"]], "2021", raw_root=self.workdir / "heldout_raw", dataset_id=DATASET_ID,
                          overwrite=True)
            self.state.record("data", {"dataset": res.dataset_dir.name, "phantoms": dict(
                settings, train_cases=a.train_cases, heldout_cases=a.heldout_cases, seed=a.seed,
                heldout_seed=a.heldout_seed)})
        if not self.state.done("plan"):
            seconds = _run([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", "1",
                            "-np", "1", "--verify_dataset_integrity"], self.env, self.logs / "plan.log",
                           "[table] nnUNetv2_plan_and_preprocess")
            self.state.record("plan", {"seconds": seconds})

    # -------------------------------------------------------------- training
    def extra_trainings(self) -> list[tuple[str, str, str, str]]:
        """(head, class, variant, kind) of the issue-33 rows: each head of the run whose trainer config declares
        :data:`PLATEAU_VARIANT` ("plateau") or :data:`X0_VARIANT` ("x0")."""
        from nnunet_diffusion import config
        return [(head, cls, v, kind) for head, cls in self.heads if registry.head(head).diffusion
                for v, kind in EXTRA_KINDS.items() if v in config.variant_names(head)]

    def check_extra_budgets(self) -> None:
        """Before any training: every x0 variant takes the table's budget, every plateau variant's cap is
        :data:`PLATEAU_CAP` x the budget (NNDiffError naming the variant otherwise)."""
        for head, cls, variant, kind in self.extra_trainings():
            want = self.budget * (PLATEAU_CAP if kind == "plateau" else 1)
            got = optimizer_steps(head, variant)
            if got != want:
                raise NNDiffError(f"trainer_configs/{head}.toml [variants.{variant}]: {got} optimiser steps, but the "
                                  f"table's {kind} rows take {want} ({'the cap, ' + str(PLATEAU_CAP) + ' x ' if kind == 'plateau' else ''}the "
                                  f"budget of {self.budget})")

    def extra_kind(self, trainer: str) -> str | None:
        """"plateau" / "x0" for the trainer of an issue-33 row, None otherwise."""
        return next((kind for _, cls, v, kind in self.extra_trainings() if f"{cls}_{v}" == trainer), None)

    def train(self, head: str, trainer: str, fold: int = 0, variant: str | None = None, plateau: bool = False) -> None:
        """One training of ``trainer`` on ``fold`` (state key "train <trainer>", "train <trainer> fold <f>" beyond
        fold 0). Stock nnU-Net trains with ``--npz``: its folds' validation outputs are the out-of-fold predictions
        a refiner trains on (issue 32). ``variant`` (default the run's) is the trainer's; ``plateau``: the training
        may end before its schedule, by a stop rule its checkpoint records (issue 33), else it must take the table's
        budget."""
        from nnunet_diffusion import config
        variant = variant or self.args.variant
        key = f"train {trainer}" + (f" fold {fold}" if fold else "")
        if self.state.done(key):
            return
        spec = config.spec(head, variant)
        final, load = self._run_training(trainer, fold, dict(self.env, **final_validation_env(trainer)),
                                         spec.total_epochs, "[table]", npz=not registry.head(head).diffusion)
        b, stop = training_budget(final), early_stop_of(final)
        if plateau:
            if b.steps > spec.optimizer_steps or (b.steps < spec.optimizer_steps and not stop):
                raise SystemExit(f"{trainer} trained {b.steps} optimiser steps: neither its cap of "
                                 f"{spec.optimizer_steps} nor a recorded stop rule")
        elif b.steps != self.budget:
            raise SystemExit(f"{trainer} trained {b.steps} optimiser steps, not the table's {self.budget}")
        self.state.record(key, {"steps": b.steps, "seconds": b.seconds, **load,
                                **({"cap_steps": spec.optimizer_steps, "early_stop": stop} if plateau else {})})

    def _run_training(self, trainer: str, fold, env: dict, epochs: int, tag: str, npz: bool = False):
        """``nnUNetv2_train`` of ``trainer`` on ``fold`` (resumed with ``--c`` from its last checkpoint; each attempt's
        log in logs/train_<trainer>[_fold<f>].<attempt>.log); returns its checkpoint_final.pth and the machine's load
        average (1, 5, 15 min) before and after, and the highest 5-min load sampled as each epoch started (every
        attempt's samples, kept in logs/<name>.<attempt>.loads.json as they are taken): wall times taken beside
        other work say so."""
        from nnunet_diffusion.environment import train_fold
        fold_dir = self.model_folder(trainer) / f"fold_{fold}"
        name = f"train_{trainer}" + (f"_fold{fold}" if fold else "")
        attempt = len(list(self.logs.glob(f"{name}.*.log")))
        before = [round(x, 2) for x in os.getloadavg()]
        samples, sidecar = [], self.logs / f"{name}.{attempt}.loads.json"

        def sample():
            samples.append(round(os.getloadavg()[1], 2))
            sidecar.write_text(json.dumps(samples))
        train_fold(DATASET_ID, "3d_fullres", fold, trainer, fold_dir, env, self.logs / f"{name}.{attempt}.log", tag,
                   epochs, self.args.device, npz=npz, on_epoch=sample)
        load = {"load_average_before": before, "load_average_after": [round(x, 2) for x in os.getloadavg()]}
        sampled = [x for f in self.logs.glob(f"{name}.*.loads.json") for x in json.loads(f.read_text())]
        if sampled:
            load["load_average_5min_max"] = max(sampled)
        return fold_dir / "checkpoint_final.pth", load

    # -------------------------------------------------------------- measuring
    def _measure(self, key: str, trainer: str, cases: list[str], change=None, checkpoint="checkpoint_final.pth",
                 **extra):
        """Predict fold 0's validation ``cases`` with ``trainer``'s ``checkpoint`` (``change`` maps the network's
        SamplingOptions to the ones to use), evaluate, record {seconds_per_case, dice per region, **extra}."""
        from .accuracy import evaluate_cases, mean_metrics, predict_cases
        if self.state.done(key):
            return self.state.get(key)
        out = self.workdir / "measure" / key.replace(" ", "_").replace("/", "-")
        sampling = None if change is None else (lambda net: change(net.sampling))
        seconds = predict_cases(self.model_folder(trainer), cases, out, sampling, checkpoint=checkpoint, resume=True,
                                progress=f"[table] {key}")
        from nnunet_diffusion.evaluation.evaluate import ALL_REGIONS
        dice = {r: m["dice"] for r, m in mean_metrics(evaluate_cases(out, self.raw(), cases)).items()
                if r != ALL_REGIONS}
        self.state.record(key, {"seconds_per_case": seconds, "dice": dice, **extra})
        print(f"[table] {key}: " + ", ".join(f"{r} {100 * v:.1f}" for r, v in dice.items()), flush=True)
        return self.state.get(key)

    def curve(self, head: str, trainer: str) -> None:
        """Dice on fold 0's validation cases at every kept checkpoint: the head's online-validation sampler (NNDM:
        its defaults, and its refinement off)."""
        from dataclasses import replace

        from nnunet_diffusion.trainers import TRAINERS
        fold = self.model_folder(trainer) / "fold_0"
        changes = {trainer: None}
        if registry.head(head).refinement_toggle:
            changes[f"{trainer} (refinement off)"] = lambda o: replace(o, refine=False)
        elif registry.head(head).diffusion:
            val = TRAINERS[trainer].sampling_defaults(validation=True)
            changes[trainer] = lambda o, v=val: replace(o, sampler=v.sampler, steps=v.steps, samples=v.samples)
        for ckpt in sorted(fold.glob("checkpoint_ep*.pth")) + [fold / "checkpoint_final.pth"]:
            steps = training_budget(ckpt).steps
            for label, change in changes.items():
                self._measure(f"curve {label} {ckpt.name}", trainer, self.val_cases(), change, ckpt.name, steps=steps)

    def choose_default(self, head: str, cls: str, trainer: str) -> None:
        """The steps-accuracy curve of the converged model on fold 0's validation cases, and the default chosen by
        :func:`cheapest_within` (cost = denoiser passes per window = steps x samples). The settings with several
        samples only for a model that learned (:func:`sweep_passes`, :func:`sweep`); those skipped are recorded."""
        from dataclasses import replace

        from nnunet_diffusion.trainers import TRAINERS

        from .accuracy import _predictor, sampling_grid
        if not registry.head(head).diffusion or self.state.done(f"default {trainer}"):
            return
        a = self.args
        samples = a.samples if _predictor(self.model_folder(trainer)).network.supports_samples else [1]
        named = {"shipped": TRAINERS[cls].sampling_defaults()}
        if self.paper_chain:
            named["paper"] = TRAINERS.get(f"{cls}_paper", TRAINERS[cls]).sampling_defaults()
        first, second = sweep_passes(sampling_grid(a.steps, samples, a.samples_steps), named)

        def measure(setting):
            sampler, k, n = setting
            label = setting_label(setting)
            m = self._measure(f"steps {trainer} {label}", trainer, self.val_cases(),
                              lambda o, s=sampler, k=k, n=n: replace(o, sampler=s, steps=k, samples=n))
            return {"setting": label, "sampler": sampler, "steps": k, "samples": n, "cost": k * n,
                    "tags": setting_tags(setting, named), "seconds_per_case": m["seconds_per_case"],
                    "dice": 100 * float(np.mean(list(m["dice"].values())))}

        rows, skipped = sweep(first, second, measure)
        skipped = [{"setting": setting_label(g), "tags": setting_tags(g, named)} for g in skipped]
        if skipped:
            print(f"[table] {trainer}: best one-sample setting {max(r['dice'] for r in rows):.1f} mean Dice, below "
                  f"{LEARNED_FLOOR:g} (not learned): the settings with several samples not measured "
                  f"({', '.join(x['setting'] for x in skipped)})", flush=True)
        chosen = cheapest_within(rows, a.tolerance)
        self.state.record(f"default {trainer}", {"rows": rows, "chosen": chosen, "tolerance": a.tolerance,
                                                 "not_measured": skipped})
        print(f"[table] {trainer}: default {chosen['setting']} (mean Dice {chosen['dice']:.1f}; best "
              f"{max(r['dice'] for r in rows):.1f})", flush=True)

    def heldout_settings(self) -> list[tuple[str, str, object]]:
        """(trainer, label, change) on the held-out cases: stock, NNDM with its refinement off, every head at its
        chosen default, then the issue-33 rows (:meth:`heldout_settings_of` each)."""
        return [s for head, cls in self.heads for s in self.heldout_settings_of(head, cls, self.args.variant)] + [
            s for head, cls, variant, kind in self.extra_trainings()
            for s in self.heldout_settings_of(head, cls, variant, kind)]

    def heldout_settings_of(self, head: str, cls: str, variant: str, kind: str | None = None
                            ) -> list[tuple[str, str, object]]:
        """(trainer, label, change) of one training on the held-out cases: stock as it is; a head at the equal
        budget at its chosen default (NNDM also with its refinement off); a plateau row at the sampler chosen on its
        own steps-accuracy curve; an x0 or in-sample row at its trainer config's own sampler."""
        from dataclasses import replace

        from nnunet_diffusion.trainers import TRAINERS
        trainer = f"{cls}_{variant}"
        if not registry.head(head).diffusion:
            return [(trainer, "stock", None)]
        if kind in (None, "plateau"):
            c = heldout_choice(self.state.get(f"default {trainer}"))
            change = (lambda o, c=c: replace(o, sampler=c["sampler"], steps=c["steps"], samples=c["samples"]))
            if kind == "plateau":  # the sampler chosen on this model's own steps-accuracy curve
                return [(trainer, f"own plateau, {c['setting']}", change)]
            off = [(trainer, "refinement off (its backbone)", lambda o: replace(o, refine=False))]
            return (off if registry.head(head).refinement_toggle else []) + [(trainer, c["setting"], change)]
        o = TRAINERS[trainer].sampling_defaults()
        label = "x0 (NOT the paper's)" if kind == "x0" else "in-sample residual maps"
        return [(trainer, f"{label}, {setting_label((o.sampler, o.steps, o.samples))}", None)]

    def measure_training(self, head: str, cls: str, variant: str | None = None, kind: str | None = None) -> None:
        """Everything the table measures of one training, as soon as it is trained: its curve, its sampler sweep
        (equal-budget and plateau rows) and its held-out rows. The same measurements as measuring every training
        at the end, so a run cut off for good has the trained heads' numbers in state.json."""
        variant = variant or self.args.variant
        trainer = f"{cls}_{variant}"
        self.curve(head, trainer)
        if kind in (None, "plateau"):
            self.choose_default(head, cls, trainer)
        self.heldout(self.heldout_settings_of(head, cls, variant, kind))

    def heldout(self, settings=None) -> None:
        """Every setting of ``settings`` (default :meth:`heldout_settings`: (trainer, label, change)) on the held-out
        cases, from their raw files; each case recorded as it finishes (an interrupted run resumes at the next case).
        Per case: Dice and HD95 per region, and the lesion-wise Dice where the evaluation has it."""
        from .accuracy import _predictor, evaluate_cases, finished_cases, predict_raw_cases
        raw = self.raw(heldout=True)
        cases = sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").glob("*.nii.gz"))
        inputs = {c: [str(raw / "imagesTr" / f"{c}_{i:04d}.nii.gz") for i in range(4)] for c in cases}
        for trainer, label, change in settings or self.heldout_settings():
            key = f"heldout {trainer} {label}"
            if self.state.done(key):
                continue
            p = _predictor(self.model_folder(trainer))
            if change is not None:
                p.network.set_sampling(change(p.network.sampling))
            out = self.workdir / "heldout_predictions" / key.replace(" ", "_")
            resumed = len(finished_cases(out, cases))  # cases an interrupted run measured before this one
            seconds = predict_raw_cases(p, inputs, out, progress=f"[table] {key}")
            res = evaluate_cases(out, raw, cases)
            record = {"trainer": trainer, "setting": label, "seconds_per_case": seconds, "run": self.run_id,
                      "resumed_cases": resumed, "cases": cases, "dice": per_case(res, "dice"),
                      "hd95": per_case(res, "hd95")}
            if "lesionwise_dice" in res.per_case:
                record["lesionwise_dice"] = per_case(res, "lesionwise_dice")
            self.state.record(key, record)
            print(f"[table] {key}: {seconds:.2f} s / case", flush=True)

    # -------------------------------------------------------------- the refiner section (issue 32)
    def refiner_trainings(self) -> None:
        """NNDM's refiner on top of stock nnU-Net's trained fold 0 (``NNDIFF_BASELINE``), one training per residual
        source of :data:`REFINERS`, and the stock model trained the refiner's extra optimiser steps longer
        (:data:`STOCK_LONGER`); each recorded like the table's trainings, with the baseline's budget beside its own."""
        from nnunet_diffusion import config
        stock = f"{HEADS[0][1]}_{self.args.variant}"
        base = self.state.get(f"train {stock}")
        for label, variant in REFINERS.items():
            trainer = f"{HEADS[1][1]}_{variant}"
            key = f"train refiner {trainer}"
            if self.state.done(key):
                continue
            env = dict(self.env, **final_validation_env(trainer), NNDIFF_BASELINE=stock)
            epochs = config.total_epochs(config.spec("nndm", variant), from_baseline=True)
            final, load = self._run_training(trainer, 0, env, epochs, "[table refiner]")
            own = training_budget(final)
            self.state.record(key, {"source": label, "refiner_steps": own.steps - base["steps"],
                                    "steps": own.steps, "seconds": own.seconds - base["seconds"], **load})
        longer = f"{HEADS[0][1]}_{STOCK_LONGER}"
        key = f"train {longer}"
        if not self.state.done(key):
            final, load = self._run_training(longer, 0, self.env, config.spec("nnunet", STOCK_LONGER).total_epochs,
                                             "[table refiner]")
            b = training_budget(final)
            self.state.record(key, {"steps": b.steps, "seconds": b.seconds, **load})

    def refiner_settings(self) -> list[tuple[str, str, object]]:
        """(trainer, label, change) of the refiner section on the held-out cases: stock fold 0 (the reference), the
        stock model trained longer, and each refiner at its shipped sampler and with its refinement off (its backbone
        after the joint stage)."""
        from dataclasses import replace
        out = [(f"{HEADS[0][1]}_{self.args.variant}", "stock", None), (f"{HEADS[0][1]}_{STOCK_LONGER}", "stock", None)]
        for variant in REFINERS.values():
            trainer = f"{HEADS[1][1]}_{variant}"
            out += [(trainer, "refinement off (its backbone)", lambda o: replace(o, refine=False)),
                    (trainer, "refined (shipped sampler)", None)]
        return out

    def refiner_result(self) -> dict | None:
        """The refiner section of table.json (None before its held-out rows exist): rows scored against stock fold 0
        with the same statistics as the table, the lesion-wise Dice beside them, each row's per-case values kept."""
        settings = self.refiner_settings()
        keys = [f"heldout {t} {label}" for t, label, _ in settings]
        if not all(self.state.done(k) for k in keys):
            return None
        measured = [self.state.get(k) for k in keys]
        stock = measured[0]
        regions = list(stock["dice"])
        rows = []
        for (trainer, label, _), m in zip(settings, measured):
            train = self.state.records.get(f"train refiner {trainer}") or self.state.records.get(f"train {trainer}")
            row = {"trainer": trainer, "setting": label, "seconds_per_case": m["seconds_per_case"],
                   "training": train, "per_case": {k: m[k] for k in ("dice", "hd95", "lesionwise_dice") if k in m},
                   **score_against(m, stock, regions)}
            if "lesionwise_dice" in m:  # a case without a lesion in either has none (NaN): left out of the mean
                row["lesionwise_dice"] = {}
                for r, v in m["lesionwise_dice"].items():
                    v = [x for x in v if not math.isnan(x)]
                    row["lesionwise_dice"][r] = {"mean": float(np.mean(v)) if v else math.nan,
                                                 "interval": bootstrap_interval(v) if v else (math.nan, math.nan),
                                                 "cases": len(v)}
            rows.append(row)
        return {"regions": regions, "cases": stock["cases"], "rows": rows, "cpu_count": os.cpu_count()}

    # -------------------------------------------------------------- output
    def result(self) -> dict:
        from .provenance import machine, versions
        settings = self.heldout_settings()
        measured = [self.state.get(f"heldout {t} {label}") for t, label, _ in settings]
        stock = measured[0]
        regions = list(stock["dice"])
        rows = []
        for m in measured:
            rows.append({"trainer": m["trainer"], "setting": m["setting"], "seconds_per_case": m["seconds_per_case"],
                         "run": m.get("run"), "resumed_cases": m.get("resumed_cases", 0),
                         "kind": self.extra_kind(m["trainer"]), **score_against(m, stock, regions)})
        curves = {}
        for key, rec in self.state.records.items():
            if key.startswith("curve "):
                label = key[len("curve "):].rsplit(" ", 1)[0]
                curves.setdefault(label, []).append({"steps": rec["steps"], "dice": rec["dice"]})
        plans = json.loads((self.workdir / "nnUNet_preprocessed" / self.dataset / "nnUNetPlans.json").read_text())
        plans = {k: plans["configurations"]["3d_fullres"][k]
                 for k in ("spacing", "median_image_size_in_voxels", "patch_size", "batch_size")}
        return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "versions": versions(),
                "command": self.args.command,
                "phantoms": self.state.get("data")["phantoms"], "plans": plans, "variant": self.args.variant,
                "budget_steps": self.budget,
                "budget": {t: self.state.get(f"train {t}") for t in {m["trainer"] for m in measured}},
                "regions": regions, "heldout_cases": stock["cases"], "validation_cases": self.val_cases(),
                "curves": curves, "stock_check": stock_check(curves[self.heads[0][1] + "_" + self.args.variant]),
                "paper_chain_measured": self.paper_chain, "tolerance": self.args.tolerance,
                "validation_stock_seconds": self.state.get(
                    f"curve {self.heads[0][1]}_{self.args.variant} checkpoint_final.pth")["seconds_per_case"],
                "defaults": {k[len("default "):]: v for k, v in self.state.records.items() if k.startswith("default ")},
                "rows": rows, "refiner": self.refiner_result(), "trainer_configs": self.trainer_configs(),
                "cpu_count": os.cpu_count(),
                "uncertainty": table_uncertainty.uncertainty_result(self),
                "ensembles": table_uncertainty.ensemble_result(self)}

    def trainer_configs(self) -> dict:
        """{trainer: the trainer config its fold-0 model trained under (checkpoint_final.pth's "trainer_config")}
        for every trainer the run trained, so the documentation can say when trainer_configs/ changed since."""
        import torch
        out = {}
        for folder in sorted((self.workdir / "nnUNet_results" / self.dataset).glob("*__nnUNetPlans__3d_fullres")):
            final = folder / "fold_0" / "checkpoint_final.pth"
            if final.is_file():
                cfg = torch.load(final, map_location="cpu", weights_only=False).get("trainer_config")
                out[folder.name.split("__")[0]] = cfg
        return out

    def write(self) -> None:
        from nnunet_diffusion.atomic import write_text_atomic
        result = self.result()
        out = self.args.out or RESULTS / ("table.json" if self.args.device == "cpu" else "table_cuda.json")
        plot_curves(result, out.with_name(out.stem + "_curves.png"))
        table_uncertainty.reliability_png(result["uncertainty"], out.with_name(out.stem + "_reliability.png"))
        write_text_atomic(out, json.dumps(result, indent=2))
        print(markdown(result))
        print(table_uncertainty.uncertainty_markdown(result["uncertainty"]))
        print(table_uncertainty.ensemble_markdown(result["ensembles"]))
        print(f"[table] written: {out} and {out.with_name(out.stem + '_curves.png')}")


if __name__ == "__main__":
    sys.exit(main())
