"""``python -m benchmarks`` (``make bench``): speed of every head against nnU-Net, then steps–accuracy curves on
the phantom benchmark, written to benchmarks/RESULTS.md with the date, machine, versions and commands.

    python -m benchmarks [--quick] [--workdir bench_work] [--phantoms bench_phantoms] [--out benchmarks/RESULTS.md]

--quick: the default prediction settings are extrapolated from the cost of one denoiser pass instead of run (they
take minutes to hours per case on a CPU), and the accuracy curves use steps 1, 2, 5, 10. A failed measurement stops
the run before anything is written.
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

from . import speed


def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "nnunetv2", "monai", "dynamic-network-architectures"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 ** 2:.0f} GB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    return f"{os.cpu_count()} CPU cores ({cpu}){mem}; {gpu}"


def speed_table(results: list[dict]) -> str:
    lines = ["| head | measurement | seconds | × stock |", "|---|---|---|---|"]
    for r in results:
        st, sp = r["train_step nnUNetTrainer"], r["predict nnUNetTrainer"]
        lines.append(f"| {r['head']} | train step, stock nnUNetTrainer | {st:.2f} | |")
        for k, v in r.items():
            if k.startswith("train_step ") and k != "train_step nnUNetTrainer":
                lines.append(f"| {r['head']} | {k.replace('train_step', 'train step')} | {v:.2f} | {v / st:.2f} |")
        lines.append(f"| {r['head']} | predict one case, stock nnUNetTrainer | {sp:.2f} | |")
        for k, v in r.items():
            if k.startswith("predict ") and k != "predict nnUNetTrainer":
                ratio = "" if "one denoiser pass" in k else f"{v / sp:.2f}"
                lines.append(f"| {r['head']} | {k} | {v:.2f} | {ratio} |")
        lines.append(f"| {r['head']} | peak RSS of this process (GB) | {r['peak RSS (GB)']:.2f} | |")
        if "peak GPU memory (GB)" in r:
            lines.append(f"| {r['head']} | peak GPU memory (GB) | {r['peak GPU memory (GB)']:.2f} | |")
    return "\n".join(lines)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("bench_work"))
    ap.add_argument("--phantoms", type=Path, default=Path("bench_phantoms"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args(argv)
    settings = ["fast"] if args.quick else ["default", "fast"]
    steps = [1, 2, 5, 10] if args.quick else [1, 2, 5, 10, 25, 100]
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    workdir = args.workdir.resolve()
    speed.prepare(workdir, (32, 40, 36))
    speed_results = speed.run_heads(workdir, list(speed.TRAINERS), settings)
    acc_cmd = [sys.executable, "-m", "benchmarks.accuracy", "--workdir", str(args.phantoms.resolve()),
               "--steps", *map(str, steps)]
    if subprocess.run(acc_cmd).returncode != 0:
        raise SystemExit("benchmarks.accuracy failed; RESULTS.md not written")
    acc = json.loads((args.phantoms.resolve() / "accuracy" / "accuracy.json").read_text())
    fast = "; ".join(f"{h}: " + " ".join(f"{k}={v}" for k, v in env.items()) for h, env in speed.FAST.items())
    text = f"""# Benchmark results

Written by `python -m benchmarks{' --quick' if args.quick else ''}` (`make bench`), started {started}, on
{_machine()}. Versions: {', '.join(f'{k} {v}' for k, v in _versions().items())}.

## Speed against the stock nnUNetTrainer (`python -m benchmarks.speed`)

Synthetic case {speed_results[0]['case_shape']}, planned patch {speed_results[0]['patch_size']}, batch
{speed_results[0]['batch_size']}; one process per head, stock and head measured in it on the same batch and case.
Train steps: mean of 3 after a warm-up. Prediction: nnU-Net's predictor with 8-mirror TTA, sampling once per
window; stock: mean of 3, each head setting: one run. "default" = the trainer config as shipped; "fast" = the
documented faster setting ({fast}). Untrained weights (cost does not depend on them).

{speed_table(speed_results)}

## Steps–accuracy on the phantom benchmark (`python -m benchmarks.accuracy`)

`nndiff demo`'s phantoms (BraTS 2021 layout, 4 mm), `_demo` trainers (minutes of training), fold 0's
{len(acc['cases'])} validation cases ({', '.join(acc['cases'])}); DDIM with the given steps; mean over cases. These
models are trained for minutes on a CPU: the table shows how accuracy and time move with the steps on one
benchmark, not what the methods reach with full training.

{accuracy_table(acc['rows'])}
"""
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
