"""benchmarks/: the tables say what was measured, the NNDM defaults are what the speed benchmark times, and a
broken measurement stops the run instead of producing a table."""
import json

import pytest
import torch

from benchmarks import speed
from benchmarks.__main__ import accuracy_table, main, render, speed_file_name, speed_table
from benchmarks.accuracy import sampling_grid
from nnunet_diffusion import config


def test_speed_table_gives_ratios_to_the_stock_trainer_of_the_same_process():
    r = {"head": "nndm", "train_step nnUNetTrainer": 2.0, "train_step stage 3 (joint)": 2.5,
         "predict nnUNetTrainer": 4.0, "predict cost of one denoiser pass per window (from 1 and 5 DDIM steps)": 0.1,
         "predict default (ddim, 5 steps x 1 samples)": 5.0, "peak RSS (GB)": 1.5}
    rows = speed_table([r]).splitlines()
    assert "| nndm | train step stage 3 (joint) | 2.50 | 1.25 |" in rows
    assert "| nndm | predict default (ddim, 5 steps x 1 samples) | 5.00 | 1.25 |" in rows
    assert any("one denoiser pass" in x and x.endswith("|  |") for x in rows)  # a cost, not a ratio


def test_an_extrapolation_from_a_pass_lost_in_timing_noise_is_marked_as_a_lower_bound():
    r = {"head": "recoseg", "train_step nnUNetTrainer": 0.02, "predict nnUNetTrainer": 0.03,
         "predict cost of one denoiser pass per window (from 1 and 5 DDIM steps)": 0.0,
         "predict default (ddpm, 1000 steps x 1 samples), EXTRAPOLATED": 0.048, "peak RSS (GB)": 1.5}
    rows = speed_table([r]).splitlines()
    assert "| recoseg | train step, stock nnUNetTrainer | 0.020 | |" in rows
    assert any("EXTRAPOLATED (a lower bound" in x and "| 0.048 | 1.60 |" in x for x in rows)


def test_train_steps_are_timed_in_interleaved_rounds_after_a_warm_up_round():
    calls = []
    medians = speed.interleaved_medians({"stock": lambda: calls.append("stock"), "head": lambda: calls.append("head")},
                                        rounds=3)
    assert calls == ["stock", "head"] * 4 and set(medians) == {"stock", "head"}


def test_accuracy_table_shows_dice_in_percent_and_hd95_per_region():
    rows = [{"trainer": "t", "setting": "ddim 5 steps x 1 samples", "seconds_per_case": 1.0,
             "metrics": {"whole tumor": {"dice": 0.9, "hd95": 3.0}, "mean over regions": {"dice": 0.9, "hd95": 3}}}]
    lines = accuracy_table(rows).splitlines()
    assert lines[0] == "| trainer | setting | s / case | Dice whole tumor | HD95 whole tumor (mm) |"
    assert lines[2] == "| t | ddim 5 steps x 1 samples | 1.00 | 90.0 | 3.0 |"


def test_every_head_with_an_expensive_default_has_a_faster_setting_and_nndm_needs_none():
    assert set(speed.FAST) | {"nndm"} == set(speed.TRAINERS)
    hp = config.spec("nndm")
    assert hp.sampler == "ddim" and hp.sampling_steps * hp.num_samples <= 10


def test_a_failing_head_measurement_raises(tmp_path):
    # an empty work folder: the child finds no planned dataset and exits non-zero; nothing may be filled in
    with pytest.raises(RuntimeError, match="speed benchmark of nndm failed"):
        speed.run_heads(tmp_path, ["nndm"], ["default"])


def test_the_samples_axis_is_taken_at_its_own_steps_and_no_setting_is_measured_twice():
    assert sampling_grid([1, 10], [1, 4, 16], 10) == [("ddim", 1, 1), ("ddim", 10, 1), ("ddim", 10, 4),
                                                      ("ddim", 10, 16)]
    assert sampling_grid([5], [1], 10) == [("ddim", 5, 1), ("ddim", 10, 1)]


def _run(meta_cmd: str) -> dict:
    return {"command": meta_cmd, "started": "2026-01-01 00:00 UTC", "machine": "m", "versions": {"torch": "x"}}


def test_a_gpu_or_other_shape_speed_run_is_kept_beside_the_cpu_run_not_over_it():
    assert speed_file_name("cpu", (32, 40, 36)) == "speed.json"
    assert speed_file_name("cuda", (32, 40, 36)) == "speed_cuda.json"
    assert speed_file_name("cuda:0", [128, 160, 160]) == "speed_cuda_128x160x160.json"
    assert speed_file_name("cpu", (64, 80, 80)) == "speed_cpu_64x80x80.json"


def test_a_reused_benchmark_folder_of_another_shape_is_refused(tmp_path):
    from benchmarks.speed import DATASET, prepare
    from nnunet_diffusion.dataset_conversion.synthetic import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / "raw", 990, num_train=1, num_test=0, shape=(16, 20, 18), progress=False)
    assert (tmp_path / "raw" / DATASET).is_dir()
    with pytest.raises(SystemExit, match=r"shape \(16, 20, 18\).*not the asked \(32, 40, 36\).*another --workdir"):
        prepare(tmp_path, (32, 40, 36))


def test_results_md_says_how_and_when_each_part_was_measured():
    sr = {"head": "nndm", "case_shape": [1, 2, 3], "patch_size": [1, 2, 3], "batch_size": 2,
          "train_step nnUNetTrainer": 2.0, "predict nnUNetTrainer": 4.0, "peak RSS (GB)": 1.0}
    row = {"trainer": "t", "setting": "ddim 10 steps x 4 samples", "seconds_per_case": 1.0,
           "metrics": {"whole tumor": {"dice": 0.5, "hd95": 3.0}}}
    text = render({"meta": _run("python -m benchmarks --part speed"), "quick": False, "fast": {"x": {"A": "1"}},
                   "results": [sr]},
                  {"meta": _run("python -m benchmarks --part accuracy"), "quick": False, "samples": [1, 4],
                   "samples_steps": 10, "trainer_defaults": True,
                   "accuracy": {"cases": ["c1"], "rows": [row], "notes": ["r: no samples axis"]}})
    assert "Measured by `python -m benchmarks --part speed`" in text
    assert "Measured by `python -m benchmarks --part accuracy`" in text
    assert "samples 1, 4) is taken at 10 DDIM steps" in text and "trainer default" in text
    assert "r: no samples axis." in text
    assert "| t | ddim 10 steps x 4 samples | 1.00 | 50.0 | 3.0 |" in text
    assert "Speed on CUDA" not in text and "autocast" not in text


def test_results_md_shows_a_stored_cuda_run_with_its_gpu_memory():
    cpu = {"head": "nndm", "case_shape": [1, 2, 3], "patch_size": [1, 2, 3], "batch_size": 2, "device": "cpu",
           "train_step nnUNetTrainer": 2.0, "predict nnUNetTrainer": 4.0, "peak RSS (GB)": 1.0}
    gpu = dict(cpu, case_shape=[128, 160, 160], device="cuda", **{"predict nnUNetTrainer": 0.5,
                                                                  "predict fast (ddim, 10 steps x 1 samples)": 1.0,
                                                                  "peak GPU memory (GB)": 3.25})
    row = {"trainer": "t", "setting": "s", "seconds_per_case": 1.0, "metrics": {"whole tumor": {"dice": 0.5, "hd95": 3}}}
    acc = {"meta": _run("a"), "quick": False, "accuracy": {"cases": ["c1"], "rows": [row]}, "samples_steps": 10}
    text = render({"meta": _run("python -m benchmarks --part speed"), "quick": False, "fast": {}, "results": [cpu]},
                  acc, {"speed_cuda_128x160x160": {"meta": _run("python -m benchmarks --part speed --shape 128 160 160"),
                                                   "quick": True, "fast": {}, "results": [gpu]}})
    cuda_part = text[text.index("## Speed on CUDA, synthetic case 128x160x160 (speed_cuda_128x160x160)"):]
    assert "`python -m benchmarks --part speed --shape 128 160 160`" in cuda_part and "autocast" in cuda_part
    assert "| nndm | predict fast (ddim, 10 steps x 1 samples) | 1.00 | 2.00 |" in cuda_part
    assert "| nndm | peak GPU memory (GB) | 3.25 | |" in cuda_part
    assert text.index("## Speed against the stock") < text.index("## Speed on CUDA") < text.index("## Steps")


def test_rendering_without_a_stored_part_stops_before_writing(tmp_path):
    out = tmp_path / "RESULTS.md"
    with pytest.raises(SystemExit, match=r"speed.json is missing: run `python -m benchmarks --part speed`"):
        main(["--part", "render", "--results-dir", str(tmp_path / "results"), "--out", str(out)])
    assert not out.exists()


@pytest.mark.e2e
def test_compile_check_captures_every_head_in_whole_graphs_on_the_cpu(tmp_path):
    """Every head's compiled parts, compiled in place (graph capture only), train each stage and predict through
    nnU-Net's predictor with no graph break (a break would mean a Python fallback, e.g. a CPU-only code path
    dynamo cannot trace). Inductor's code generation and CUDA are left to runs of the script itself."""
    import subprocess
    import sys
    from pathlib import Path
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--backend", "eager", "--repeats", "1",
                           "--workdir", str(tmp_path)], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for head in speed.TRAINERS:
        assert f"[{head}] compiled in place by compile_parts(backend='eager')" in proc.stdout
        assert f"[{head}] predict DDIM 5 steps:" in proc.stdout


def test_compile_check_reports_a_graph_break_with_its_reason():
    import torch
    from torch._dynamo.utils import counters

    from benchmarks.compile_check import graph_breaks

    class Talks(torch.nn.Module):
        def forward(self, x):
            print("a Python call dynamo cannot capture")
            return x * 2

    torch._dynamo.reset()
    counters.clear()
    part = Talks()
    part.compile(backend="eager")
    part(torch.ones(2))
    problems = graph_breaks("toy")
    assert len(problems) == 1 and problems[0].startswith("toy: 1 graph break(s) in a compiled part:")
    assert "print" in problems[0]
    counters.clear()
    assert graph_breaks("toy") == []


def test_residual_report_tells_a_wrong_sign_correction_inside_the_region_from_a_right_one():
    import numpy as np

    from benchmarks.nndm_residual import residual_report
    y = np.zeros((1, 2, 2, 2), np.float32)
    y[0, 0] = 1  # 4 voxels inside, 4 outside
    p_off = np.where(y > 0, 0.6, 0.1).astype(np.float32)
    wrong = residual_report(y, p_off, np.where(y > 0, 0.4, 0.05))[0]  # pushes the region down: loses it
    assert wrong["e inside"] == pytest.approx(0.4) and wrong["ê inside"] == pytest.approx(-0.2)
    assert wrong["e outside"] == pytest.approx(-0.1) and wrong["ê outside"] == pytest.approx(-0.05)
    assert (wrong["dice refine off"], wrong["dice refined"], wrong["voxels lost by refining"]) == (1.0, 0.0, 4)
    right = residual_report(y, p_off, np.where(y > 0, 0.95, 0.0))[0]
    assert right["ê inside"] == pytest.approx(0.35) and right["voxels gained by refining"] == 0


def test_heldout_counts_per_case_whether_the_refinement_raised_or_lowered_dice():
    from benchmarks.heldout import paired
    off = {"a": {"tc": 0.5, "wt": 0.9}, "b": {"tc": 0.7, "wt": 0.9}, "c": {"tc": 0.2, "wt": 0.8}}
    on = {"a": {"tc": 0.6, "wt": 0.9}, "b": {"tc": 0.4, "wt": 0.9}, "c": {"tc": 0.3, "wt": 0.85}}
    assert paired(off, on) == {"tc": {"higher": 2, "same": 0, "lower": 1}, "wt": {"higher": 1, "same": 2, "lower": 0}}


def test_heldout_measures_the_stock_nnunet_nndm_off_and_on_and_each_other_head_at_its_faster_setting():
    from benchmarks.heldout import settings_to_run
    from nnunet_diffusion.inference.options import SamplingOptions
    runs = settings_to_run(["nndm", "modiff"], "demo")
    assert [(t, label.split(" (")[0]) for t, label, _ in runs] == [
        ("nnUNetTrainer_demo", "stock"), ("nnUNetTrainerNNDM_demo", "refine off"),
        ("nnUNetTrainerNNDM_demo", "defaults"), ("nnUNetTrainerMoDiff_demo", "fast")]
    shipped = SamplingOptions(sampler="ddpm", steps=250, samples=16)
    assert runs[1][2](shipped).refine is False and runs[2][2] is None
    fast = runs[3][2](shipped)
    assert (fast.sampler, fast.steps, fast.samples) == ("ddim", 10, 4)
    assert "NNDIFF_STEPS=10" in runs[3][1]


def test_heldout_refuses_the_demo_phantoms_own_seed(tmp_path):
    from benchmarks.heldout import make_heldout
    with pytest.raises(SystemExit, match="the demo's own phantom seed"):
        make_heldout(tmp_path, 4, 0)
    assert not (tmp_path / "heldout").exists()


def test_results_md_shows_the_heldout_part_only_when_it_was_run():
    sr = {"head": "nndm", "case_shape": [1, 2, 3], "patch_size": [1, 2, 3], "batch_size": 2,
          "train_step nnUNetTrainer": 2.0, "predict nnUNetTrainer": 4.0, "peak RSS (GB)": 1.0}
    row = {"trainer": "t", "setting": "refine off", "seconds_per_case": 2.0,
           "metrics": {"tumor core": {"dice": 0.25, "hd95": 7.0}, "mean over regions": {"dice": 0.25, "hd95": 7.0}}}
    speed_run = {"meta": _run("s"), "quick": False, "fast": {}, "results": [sr]}
    acc = {"meta": _run("a"), "quick": False, "accuracy": {"cases": ["c1"], "rows": [row]}, "samples_steps": 10}
    assert "Held-out" not in render(speed_run, acc)
    heldout = {"meta": _run("python -m benchmarks --part heldout"), "heldout": {
        "cases": ["x1", "x2"], "seed": 7, "phantoms": {"edition": "2023", "spacing": "3"}, "rows": [row],
        "comparisons": {"NNDM defaults against its refinement off": {
            "tumor core": {"higher": 1, "same": 0, "lower": 1}, "mean over regions": {"higher": 1, "same": 0, "lower": 1}}}}}
    text = render(speed_run, acc, None, heldout)
    part = text[text.index("## Held-out phantoms"):]
    assert "`python -m benchmarks --part heldout`" in part and "2 fresh phantoms (seed 7" in part
    assert "BraTS 2023, 3 mm voxels" in part
    assert "| t | refine off | 2.00 | 25.0 | 7.0 |" in part
    assert "NNDM defaults against its refinement off, per case (Dice higher / same / lower): tumor core 1 / 0 / 1." in part


def _acc_row(trainer, setting, dice):
    return {"trainer": trainer, "setting": setting, "seconds_per_case": 1.0,
            "metrics": {"whole tumor": {"dice": dice, "hd95": 3.0}}}


def test_remeasuring_one_heads_accuracy_keeps_the_other_heads_rows_and_says_when_they_were_taken():
    from benchmarks.__main__ import merge_accuracy
    settings = {"quick": False, "samples": [1, 4], "samples_steps": 10, "trainer_defaults": True}
    stored = dict(settings, meta=_run("python -m benchmarks --part accuracy"), accuracy={"cases": ["c"], "rows": [
        _acc_row("nnUNetTrainer_demo", "stock", 0.5), _acc_row("nnUNetTrainerNNDM_demo", "refine off", 0.1),
        _acc_row("nnUNetTrainerMoDiff_demo", "ddim 1 steps x 1 samples", 0.3)],
        "notes": ["nnUNetTrainerMoDiff_demo: a kept note", "nnUNetTrainerNNDM_demo: an old note"]})
    new = dict(settings, meta=dict(_run("python -m benchmarks --part accuracy --accuracy-heads nndm"),
                                   started="2026-02-02 00:00 UTC"))
    measured = {"cases": ["c"], "rows": [_acc_row("nnUNetTrainer_demo", "stock", 0.6),
                                         _acc_row("nnUNetTrainerNNDM_demo", "refine off", 0.7)], "notes": []}
    merged = merge_accuracy(stored, new, measured, ["nndm"])
    assert [(r["trainer"], r["metrics"]["whole tumor"]["dice"]) for r in merged["accuracy"]["rows"]] == [
        ("nnUNetTrainer_demo", 0.6), ("nnUNetTrainerNNDM_demo", 0.7), ("nnUNetTrainerMoDiff_demo", 0.3)]
    assert merged["accuracy"]["notes"] == ["nnUNetTrainerMoDiff_demo: a kept note"]
    assert merged["earlier"] == [{"meta": stored["meta"], "heads": ["modiff"]}]
    sr = {"head": "nndm", "case_shape": [1, 2, 3], "patch_size": [1, 2, 3], "batch_size": 2,
          "train_step nnUNetTrainer": 2.0, "predict nnUNetTrainer": 4.0, "peak RSS (GB)": 1.0}
    text = " ".join(render({"meta": _run("s"), "quick": False, "fast": {}, "results": [sr]}, merged).split())
    assert "Measured by `python -m benchmarks --part accuracy --accuracy-heads nndm`, started 2026-02-02" in text
    assert ("The rows of modiff are kept from an earlier run with the same settings: Measured by `python -m "
            "benchmarks --part accuracy`, started 2026-01-01") in text
    # a second partial run keeps the first run's provenance for the rows it still keeps
    again = merge_accuracy(merged, new, measured, ["nndm"])
    assert again["earlier"] == [{"meta": stored["meta"], "heads": ["modiff"]}]


def test_remeasuring_one_head_with_other_settings_than_the_stored_run_is_refused_before_measuring(tmp_path):
    from benchmarks.__main__ import check_mergeable, merge_accuracy
    stored = {"quick": False, "samples": [1, 4, 16], "samples_steps": 10, "trainer_defaults": True}
    with pytest.raises(SystemExit, match=r"other settings \(quick False, now True, samples \[1, 4, 16\], now \[1, 4\]"):
        check_mergeable(stored, dict(stored, quick=True, samples=[1, 4]))
    with pytest.raises(SystemExit, match=r"other settings \(quick False, now True"):
        merge_accuracy(stored, dict(stored, quick=True, samples=[1, 4]), {"rows": []}, ["nndm"])


class _FakeNet:
    """Just enough of a head's network for speed.measure: two parts of known size, a settable sampling."""

    def __init__(self):
        import torch
        self.backbone, self.refiner = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)  # 3*2+2 = 8 and 2*1+1 = 3
        self.refiner_updates = torch.zeros(1)
        self.schedule = type("S", (), {"num_train_timesteps": 100})()
        self.sampling = None

    def parameters(self):
        return [*self.backbone.parameters(), *self.refiner.parameters()]

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def set_sampling(self, opts):
        self.sampling = opts


class _FakeTrainer:
    def __init__(self, net):
        from types import SimpleNamespace

        from nnunet_diffusion.inference.options import SamplingOptions
        self.net, self.network = net, net
        self.configuration_manager = SimpleNamespace(patch_size=[4, 4, 4])
        self.batch_size, self.stage_epochs, self.compiled_parts = 2, (1, 1, 1), ("backbone", "refiner")
        self.lr_scheduler = SimpleNamespace(step=lambda epoch: None)
        self.defaults = SamplingOptions(sampler="ddim", steps=5, samples=1)

    def unwrapped_network(self):
        return self.net

    def sampling_defaults(self):
        return self.defaults

    def train_step(self, batch):
        pass

    def stage_batches(self, batch):  # NNDM's three stages (its trainer's stage_batches)
        s1, s2, _ = self.stage_epochs
        return [("stage 1 (nnU-Net)", 0, batch), ("stage 2 (refiner)", s1, batch), ("stage 3 (joint)", s1 + s2, batch)]

    def on_train_end(self):
        pass

    def set_deep_supervision_enabled(self, on):
        pass


def test_speed_measures_nndms_per_mirror_sweep_an_asked_sampling_and_the_parts_sizes(monkeypatch):
    import torch
    net = _FakeNet()
    head, stock = _FakeTrainer(net), _FakeTrainer(torch.nn.Identity())
    seen = []
    monkeypatch.setenv("NNDIFF_BENCH_DEVICE", "cpu")
    monkeypatch.setattr(speed, "stock_head_case", lambda name: (stock, {"data": None}, head, torch.zeros(1, 4, 5, 6),
                                                                lambda n: seen.append(getattr(n, "sampling", None))))
    out = speed.measure("nndm", [], sampling=("ddpm", 7, 2), per_mirror=[1, 3], repeats=2)
    assert (out["params"], out["params backbone"], out["params refiner"]) == (11, 8, 3)
    for key in ("predict refine off", "predict --sampling (ddpm, 7 steps x 2 samples)",
                *(f"predict refine per {m} (ddim, {k} steps x 1 samples)"
                  for k in (1, 3) for m in ("window", "mirror"))):
        assert isinstance(out[key], float), key
    ran = {(o.refine, o.sampler, o.steps, o.samples, o.tta_refine) for o in seen if o is not None}
    assert {(False, "ddim", 5, 1, "window"), (True, "ddpm", 7, 2, "window"), (True, "ddim", 3, 1, "window"),
            (True, "ddim", 3, 1, "mirror"), (True, "ddim", 1, 1, "mirror")} <= ran


def test_speed_hands_its_options_to_each_heads_process_and_the_per_mirror_sweep_to_nndm_only(monkeypatch, tmp_path):
    import json
    import subprocess
    from types import SimpleNamespace
    cmds, measured = [], []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: cmds.append(cmd) or SimpleNamespace(
        returncode=0, stdout=json.dumps({"head": cmd[cmd.index("--child") + 1]})))
    speed.run_heads(tmp_path, ["nndm", "medsegdiff"], ["fast"], None, "nnUNetTrainerX", ("ddpm", 7, 2), [1, 3], 2)
    monkeypatch.setattr(speed, "measure", lambda *a: measured.append(a) or {})
    monkeypatch.setattr(speed, "_env", lambda workdir: {})
    for cmd in cmds:
        speed.main(cmd[cmd.index("--workdir"):])
    assert measured == [("nndm", ["fast"], "nnUNetTrainerX", ("ddpm", 7, 2), [1, 3], 2),
                        ("medsegdiff", ["fast"], "nnUNetTrainerX", ("ddpm", 7, 2), None, 2)]


def test_heldout_budget_sentence_says_whether_the_models_trained_equal_steps():
    from benchmarks.__main__ import budget_sentence
    old = " ".join(budget_sentence([{"trainer": "A"}, {"trainer": "B", "optimiser_steps": 400}]))
    assert "did not record them" in old and "make table" in old
    equal = " ".join(budget_sentence([{"trainer": "A", "optimiser_steps": 200}, {"trainer": "B", "optimiser_steps": 200}]))
    assert equal == "Budgets: every model trained 200 optimiser steps (A 200, B 200)."
    unequal = " ".join(budget_sentence([{"trainer": "A", "optimiser_steps": 60}, {"trainer": "B", "optimiser_steps": 400}]))
    assert unequal.startswith("Budgets: unequal (A 60, B 400 optimiser steps)")


def test_parameterisation_benchmark_writes_both_curves_and_refuses_points_outside_the_run(tmp_path):
    from benchmarks import parameterisation
    images, masks = parameterisation.discs(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 4, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}
    disc = masks[0, 0] > 0
    assert images[0][:, disc].mean() > images[0][:, ~disc].mean() + 0.5  # the image determines the mask
    assert parameterisation.dice(masks, masks) == pytest.approx(1.0) and parameterisation.dice(masks, 0 * masks) == 0
    out = tmp_path / "p.json"
    assert parameterisation.main(["--iterations", "2", "--eval-at", "1", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    steps = {pt: [p["steps"] for p in curve] for pt, curve in result["curves"].items()}
    assert steps == {"epsilon": [1, 2], "sample": [1, 2]}
    assert all(0.0 <= p["dice"] <= 1.0 for c in result["curves"].values() for p in c) and "machine" in result
    with pytest.raises(SystemExit, match=r"--eval-at \[3\]"):
        parameterisation.main(["--iterations", "2", "--eval-at", "3", "--out", str(out)])


def test_every_trainer_names_its_stages_for_the_speed_benchmark():
    """benchmarks.speed times each stage with the batch the trainer's own stage_batches gives (the registry has no
    per-head branch for it): NNDM three stages, ReCoSeg two (stage 2 with one more channel, the residual map), DDMD
    two, a one-stage head one with the full-resolution target when it trains without deep supervision."""
    from nnunet_diffusion.trainers import TRAINERS

    def bare(name, **attrs):
        tr = object.__new__(TRAINERS[name])
        tr.__dict__.update(attrs)
        return tr
    batch = {"data": torch.zeros(2, 4, 8, 8, 8), "target": [torch.ones(2, 3, 8, 8, 8), torch.ones(2, 3, 4, 4, 4)]}
    nndm = bare("nnUNetTrainerNNDM_tiny", stage_epochs=[2, 3, 4], enable_deep_supervision=True)
    assert [(label, epoch) for label, epoch, _ in nndm.stage_batches(batch)] == \
        [("stage 1 (nnU-Net)", 0), ("stage 2 (refiner)", 2), ("stage 3 (joint)", 5)]
    recoseg = bare("nnUNetTrainerReCoSeg_tiny", stage_epochs=[3, 1], enable_deep_supervision=True)
    (_, e1, b1), (_, e2, b2) = recoseg.stage_batches(batch)
    assert (e1, e2) == (0, 3) and b1["data"].shape[1] == 4 and b2["data"].shape[1] == 5
    ddmd = bare("nnUNetTrainerDDMD_tiny", stage_epochs=[1, 2], enable_deep_supervision=False)
    assert [(e, tuple(b["target"].shape)) for _, e, b in ddmd.stage_batches(batch)] == \
        [(0, (2, 3, 8, 8, 8)), (1, (2, 3, 8, 8, 8))]
    msd = bare("nnUNetTrainerMedSegDiff_tiny", enable_deep_supervision=False)
    (label, epoch, b), = msd.stage_batches(batch)
    assert (label, epoch, tuple(b["target"].shape)) == ("(one stage)", 0, (2, 3, 8, 8, 8))
