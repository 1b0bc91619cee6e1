"""``python -m benchmarks`` (``make bench``): speed of every head against nnU-Net, then steps–accuracy curves on
the phantom benchmark, then every demo model on held-out phantoms, written to benchmarks/RESULTS.md with the date,
machine, versions and commands.

    python -m benchmarks [--quick] [--part all|speed|accuracy|heldout|render] [--trainer-defaults] [--samples 1 4 16]
                         [--shape 32 40 36] [--workdir bench_work] [--phantoms bench_phantoms] [--out benchmarks/RESULTS.md]

Each part's measurements are kept as JSON in benchmarks/results/ (speed.json, accuracy.json, heldout.json, each
with its own start time, command, machine and versions) and RESULTS.md is rendered from them, so ``--part accuracy``
re-measures the accuracy and keeps the stored speed run (RESULTS.md says when and how each was taken). The speed part runs on
CUDA when there is a GPU (NNDIFF_BENCH_DEVICE=cpu|cuda chooses) and is then kept as speed_cuda.json, beside the CPU
run; --shape other than the default adds the shape to the name (speed_cuda_128x160x160.json). RESULTS.md shows every
stored speed run.

--quick: the default prediction settings are extrapolated from the cost of one denoiser pass instead of run (they
take minutes to hours per case on a CPU), and the accuracy curves use steps 1, 2, 5, 10 and samples 1, 4.
--samples: the samples axis, taken at --samples-steps DDIM steps (default 10). --trainer-defaults (on unless
--quick): also the accuracy of each head at its shipped sampler (e.g. DDMD's DDPM 1000 steps x 5 samples; about
40 min on 2 CPU cores), which each faster setting's accuracy is compared with. --heldout-cases: how many fresh
phantoms the held-out part draws (default 16; ``python -m benchmarks.heldout``). A failed measurement stops the run
before anything is written.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from nnunet_diffusion.atomic import write_text_atomic

from . import speed, table
from .speed import speed_table
from .provenance import machine as _machine
from .provenance import versions as _versions
from .heldout import result_file as heldout_file


def accuracy_table(rows: list[dict]) -> str:
    regions = [r for r in rows[0]["metrics"] if r != "mean over regions"]
    head = "| trainer | setting | s / case | " + " | ".join(f"Dice {r}" for r in regions) + " | " + \
        " | ".join(f"HD95 {r} (mm)" for r in regions) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(regions))]
    for row in rows:
        m = row["metrics"]
        lines.append(f"| {row['trainer']} | {row['setting']} | {row['seconds_per_case']:.2f} | " +
                     " | ".join(f"{100 * m[r]['dice']:.1f}" for r in regions) + " | " +
                     " | ".join(f"{m[r]['hd95']:.1f}" for r in regions) + " |")
    return "\n".join(lines)


RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_SHAPE = (32, 40, 36)


def speed_file_name(device: str, shape) -> str:
    """speed.json for the CPU run at the default shape; speed_cuda.json, speed_cpu_64x80x80.json, ... otherwise."""
    dev = "cuda" if device.startswith("cuda") else "cpu"
    tag = "" if tuple(shape) == DEFAULT_SHAPE else "_" + "x".join(map(str, shape))
    return "speed.json" if dev == "cpu" and not tag else f"speed_{dev}{tag}.json"


def _meta(argv: list[str]) -> dict:
    return {"started": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(["python -m benchmarks", *argv]),
            "machine": _machine(), "versions": _versions()}


def _provenance(meta: dict) -> str:
    return (f"Measured by `{meta['command']}`, started {meta['started']}, on {meta['machine']}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")


def _load(results_dir: Path, part: str) -> dict:
    path = results_dir / f"{part}.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python -m benchmarks --part {part}` (or the whole benchmark) "
                         "first; RESULTS.md not written")
    return json.loads(path.read_text())


def _head_of(trainer: str) -> str | None:
    return next((h for h, cls in speed.TRAINERS.items() if trainer.startswith(cls + "_")), None)


SAME_SETTINGS = ("quick", "samples", "samples_steps", "trainer_defaults")


def check_mergeable(stored: dict, run: dict) -> None:
    """Refuse to keep the stored accuracy run's rows beside a run taken with other settings (not comparable)."""
    differ = [k for k in SAME_SETTINGS if stored.get(k) != run.get(k)]
    if differ:
        raise SystemExit("--accuracy-heads keeps the other heads' rows of benchmarks/results/accuracy.json, but that "
                         "run used other settings (" + ", ".join(f"{k} {stored.get(k)!r}, now {run.get(k)!r}"
                                                              for k in differ) + "); measure every head instead")


def merge_accuracy(stored: dict, run: dict, measured: dict, heads: list[str]) -> dict:
    """The accuracy run of only ``heads`` (``measured``: its rows, the stock nnU-Net's first) merged into the stored
    run: the other heads' rows and notes are kept and said to be from the stored run (``earlier``). Refuses when the
    stored run was taken with other settings (``check_mergeable``)."""
    check_mergeable(stored, run)
    kept_rows = [r for r in stored["accuracy"]["rows"] if _head_of(r["trainer"]) not in (None, *heads)]
    kept_heads = sorted({_head_of(r["trainer"]) for r in kept_rows})
    kept_trainers = {r["trainer"] for r in kept_rows}
    notes = measured.get("notes", []) + [n for n in stored["accuracy"].get("notes", [])
                                         if n.split(":")[0] in kept_trainers]
    order = list(speed.TRAINERS)
    rows = sorted(measured["rows"] + kept_rows, key=lambda r: -1 if _head_of(r["trainer"]) is None
                  else order.index(_head_of(r["trainer"])))
    earlier = [e for e in stored.get("earlier", []) if set(e["heads"]) & set(kept_heads)]
    covered = {h for e in earlier for h in e["heads"]}
    if set(kept_heads) - covered:
        earlier.append({"meta": stored["meta"], "heads": sorted(set(kept_heads) - covered)})
    for e in earlier:
        e["heads"] = [h for h in e["heads"] if h in kept_heads]
    return dict(run, accuracy=dict(measured, rows=rows, notes=notes), earlier=earlier)


def _para(*sentences: str) -> str:
    """One prose paragraph of RESULTS.md, wrapped at 116 columns."""
    return textwrap.fill(" ".join(x for x in sentences if x), 116, break_long_words=False, break_on_hyphens=False)


def _on_cuda(run: dict) -> bool:
    return run["results"][0].get("device", "cpu").startswith("cuda")


def _where(run: dict) -> str:
    return ("CUDA" if _on_cuda(run) else "the CPU") + \
        f", synthetic case {'x'.join(map(str, run['results'][0]['case_shape']))}"


def speed_section(run: dict, title: str) -> list[str]:
    """Title, provenance, method and table of one stored speed run (speed.json or speed_<device>[_<shape>].json)."""
    sr = run["results"]
    fast = "; ".join(f"{h}: " + " ".join(f"{k}={v}" for k, v in env.items()) for h, env in run["fast"].items())
    return [
        title,
        _para(_provenance(run["meta"])),
        _para(f"Synthetic case {sr[0]['case_shape']}, planned patch {sr[0]['patch_size']}, batch {sr[0]['batch_size']};",
              "one process per head, stock and head measured in it on the same batch and case.",
              f"Train steps: {run.get('train_step_method', 'mean of 3 after a warm-up, the stock steps before the head')}.",
              "Prediction: nnU-Net's predictor with 8-mirror TTA, sampling once per window; stock: mean of 3 after a",
              "warm-up, each head setting: one run after an untimed warm-up at one DDIM step with the same shapes" +
              (" (--quick: the defaults extrapolated, not run)." if run["quick"] else "."),
              "On CUDA both train steps and predictions run under nnU-Net's autocast (AMP), everything on the GPU,"
              " torch.compile off as on the CPU; peak GPU memory is torch's max_memory_allocated." if _on_cuda(run) else "",
              f'"default" = the trainer config as shipped; "fast" = the documented faster setting ({fast}).',
              "Untrained weights (cost does not depend on them)."),
        speed_table(sr),
    ]


def budget_sentence(rows: list[dict]) -> list[str]:
    """What the held-out rows say about training budgets: the optimiser steps each model trained (recorded since
    2026-11-29), and whether they were equal; runs before that did not record them, and their `_demo` models had
    trained unequal budgets."""
    steps = {r["trainer"]: r.get("optimiser_steps") for r in rows}
    if None in steps.values():
        return ["Budgets: this run did not record them. The `_demo` models of that time trained unequal budgets",
                "(stock nnU-Net 60 optimiser steps, NNDM 400, MedSegDiff 60, ReCoSeg 120, MoDiff 60, DDMD 90), so the",
                "rows compare settings of one head, not heads against nnU-Net; that comparison is `make table`."]
    listed = ", ".join(f"{t} {s}" for t, s in steps.items())
    if len(set(steps.values())) == 1:
        return [f"Budgets: every model trained {next(iter(steps.values()))} optimiser steps ({listed})."]
    return [f"Budgets: unequal ({listed} optimiser steps): the rows do not compare heads against nnU-Net at equal",
            "budget; that comparison is `make table`."]


def heldout_section(run: dict) -> list[str]:
    """Title, provenance, method, table and NNDM's per-case comparison of the stored held-out run."""
    h = run["heldout"]
    lines = [
        "## Held-out phantoms (`python -m benchmarks.heldout`)",
        _para(_provenance(run["meta"])),
        _para(f"The same `_demo` models on {len(h['cases'])} fresh phantoms (seed {h['seed']}, the demo's layout:",
              f"BraTS {h['phantoms']['edition']}, {h['phantoms']['spacing']} mm voxels) that no model has seen, in",
              "training or as a validation case; predicted from the raw",
              "NIfTI files with nnU-Net's predict_from_files (s / case: preprocessing, prediction and export, one",
              "process each). NNDM with its refinement off and at its defaults, the other heads at their documented",
              "faster setting; mean over cases."),
        accuracy_table(h["rows"]),
        _para(*budget_sentence(h["rows"])),
    ]
    for name, per_region in h.get("comparisons", {}).items():
        lines.append(_para(f"{name}, per case (Dice higher / same / lower):",
                           "; ".join(f"{r} {c['higher']} / {c['same']} / {c['lower']}" for r, c in per_region.items()
                                     if r != "mean over regions") + "."))
    return lines


def render(speed_run: dict, acc_run: dict, extra_speed: dict | None = None, heldout_run: dict | None = None,
           table_runs: dict | None = None) -> str:
    """RESULTS.md from the CPU speed run, the accuracy run, any other stored speed runs ({file stem: run}), the
    held-out run and the table runs ({file stem: run}; optional: RESULTS.md has no such section without one)."""
    extra_speed = extra_speed or {}
    tables = [x for name, run in sorted((table_runs or {}).items())
              for x in ["## The table: every head at an equal training budget against stock nnU-Net, on held-out "
                        f"phantoms (`python -m benchmarks.table`, {name}.json)",
                        *table.section(run, f"results/{name}_curves.png")]]
    acc = acc_run["accuracy"]
    samples = acc_run.get("samples", [1])
    return "\n\n".join([
        "# Benchmark results",
        *tables,
        _para("Written by `python -m benchmarks` (`make bench`) from benchmarks/results/speed.json and accuracy.json;",
              "each part says when, where and how it was measured."),
        *speed_section(speed_run, "## Speed against the stock nnUNetTrainer (`python -m benchmarks.speed`)"),
        *(x for name, run in sorted(extra_speed.items())
          for x in speed_section(run, f"## Speed on {_where(run)} ({name})")),
        "## Steps–accuracy on the phantom benchmark (`python -m benchmarks.accuracy`)",
        _para(_provenance(acc_run["meta"])),
        *(_para(f"The rows of {', '.join(e['heads'])} are kept from an earlier run with the same settings:",
                _provenance(e["meta"])) for e in acc_run.get("earlier", [])),
        _para("`nndiff demo`'s phantoms (BraTS 2021 layout, 4 mm), `_demo` trainers (minutes of training), fold 0's",
              f"{len(acc['cases'])} validation cases ({', '.join(acc['cases'])}); DDIM with the given steps unless the",
              "setting says otherwise; mean over cases; s / case = nnU-Net's predictor, export excluded.",
              f"The samples axis (samples {', '.join(map(str, samples))}) is taken at {acc_run['samples_steps']} DDIM"
              " steps." if samples != [1] else "",
              "\"(trainer default)\" = the sampler, steps and samples of `nnUNetTrainer<Head>` as shipped (for"
              " MedSegDiff, ReCoSeg, DDMD and MoDiff the papers' DDPM chains)." if acc_run.get("trainer_defaults")
              else "",
              *(f"{n}." for n in acc.get("notes", [])),
              "These models are trained for minutes on a CPU: the table shows how accuracy and time move with the",
              "sampling on one benchmark, not what the methods reach with full training."),
        accuracy_table(acc["rows"]),
        *(heldout_section(heldout_run) if heldout_run else []),
    ]) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--part", "table"]:  # hours: never part of "all"; its options are benchmarks.table's
        table.main(argv[2:])
        return main(["--part", "render"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=["all", "speed", "accuracy", "heldout", "render", "table"], default="all",
                    help="measure only this part (RESULTS.md is rendered with the other part's stored results); "
                         "render: measure nothing, only render RESULTS.md from benchmarks/results/")
    ap.add_argument("--samples", type=int, nargs="+", help="samples axis (default: 1 4 16; --quick: 1 4)")
    ap.add_argument("--samples-steps", type=int, default=10, help="DDIM steps of the samples axis (default 10)")
    ap.add_argument("--trainer-defaults", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure accuracy at each head's shipped sampler (default: on, off with --quick; "
                         "slow: about 40 min on 2 CPU cores)")
    ap.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("Z", "Y", "X"),
                    help="synthetic case shape of the speed part (default 32 40 36; a new shape needs a new --workdir)")
    ap.add_argument("--accuracy-heads", nargs="+", choices=list(speed.TRAINERS), default=list(speed.TRAINERS),
                    help="re-measure only these heads' accuracy (and the stock nnU-Net's); the other heads' rows are "
                         "kept from the stored accuracy.json, which must have been taken with the same settings")
    ap.add_argument("--heldout-cases", type=int, default=16, help="fresh phantoms of the held-out part (default 16)")
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--phantoms", type=Path, default=Path("bench_phantoms"))
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args(argv)
    settings = ["fast"] if args.quick else ["default", "fast"]
    steps = [1, 2, 5, 10] if args.quick else [1, 2, 5, 10, 25, 100]
    samples = args.samples or ([1, 4] if args.quick else [1, 4, 16])
    trainer_defaults = not args.quick if args.trainer_defaults is None else args.trainer_defaults
    if args.part in ("all", "speed"):
        meta = _meta(argv)
        workdir = args.workdir.resolve()
        speed.prepare(workdir, tuple(args.shape))
        name = speed_file_name(speed.device().type, args.shape)
        partial = args.results_dir / (name + ".partial.jsonl")  # each head as it lands; gone once the run is whole
        partial.unlink(missing_ok=True)
        results = speed.run_heads(workdir, list(speed.TRAINERS), settings, partial)
        write_text_atomic(args.results_dir / name, json.dumps(
            {"meta": meta, "quick": args.quick, "fast": speed.FAST, "train_step_method": speed.TRAIN_STEP_METHOD,
             "results": results}, indent=2))
        partial.unlink()
    if args.part in ("all", "accuracy"):
        meta = _meta(argv)
        phantoms = args.phantoms.resolve()
        acc_cmd = [sys.executable, "-m", "benchmarks.accuracy", "--workdir", str(phantoms), "--steps", *map(str, steps),
                   "--samples", *map(str, samples), "--samples-steps", str(args.samples_steps), "--out", "bench.json"]
        if trainer_defaults:
            acc_cmd.append("--trainer-defaults")
        run = {"meta": meta, "quick": args.quick, "samples": samples, "samples_steps": args.samples_steps,
               "trainer_defaults": trainer_defaults}
        stored = None
        if set(args.accuracy_heads) != set(speed.TRAINERS):
            stored = _load(args.results_dir, "accuracy")
            check_mergeable(stored, run)  # refuse before measuring, not after
        acc_cmd += ["--heads", *args.accuracy_heads]
        if subprocess.run(acc_cmd).returncode != 0:
            raise SystemExit("benchmarks.accuracy failed; RESULTS.md not written")
        run["accuracy"] = json.loads((phantoms / "accuracy" / "bench.json").read_text())
        if stored is not None:
            run = merge_accuracy(stored, run, run["accuracy"], args.accuracy_heads)
        write_text_atomic(args.results_dir / "accuracy.json", json.dumps(run, indent=2))
    if args.part in ("all", "heldout"):
        meta = _meta(argv)
        phantoms = args.phantoms.resolve()
        cmd = [sys.executable, "-m", "benchmarks.heldout", "--workdir", str(phantoms), "--cases",
               str(args.heldout_cases), "--out", "bench.json"]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit("benchmarks.heldout failed; RESULTS.md not written")
        write_text_atomic(args.results_dir / "heldout.json", json.dumps(
            {"meta": meta, "heldout": json.loads(heldout_file(phantoms, "bench.json").read_text())}, indent=2))
    extra = {p.stem: json.loads(p.read_text()) for p in sorted(args.results_dir.glob("speed_*.json"))}
    heldout = args.results_dir / "heldout.json"
    tables = {p.stem: json.loads(p.read_text()) for p in sorted(args.results_dir.glob("table*.json"))}
    text = render(_load(args.results_dir, "speed"), _load(args.results_dir, "accuracy"), extra,
                  json.loads(heldout.read_text()) if heldout.is_file() else None, tables)
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
