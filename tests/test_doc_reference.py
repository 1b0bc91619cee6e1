"""documentation/reference/ and the README's generated blocks (``make docs``, devtools/docs.py):
the committed pages are what the code generates now, and the generator shows what it is given (made-up trainer
configs, variables, options and benchmark results)."""
import argparse
import json
import re
from pathlib import Path

import pytest

from devtools import docs
from nnunet_diffusion import variables
from nnunet_diffusion.inference import options

REPO = Path(__file__).resolve().parents[1]
RUN = "run `make docs` (python -m devtools.docs) and commit the pages it writes"


@pytest.fixture(scope="module")
def generated():
    return docs.pages(REPO)


# ---------------------------------------------------------------------------------------------- committed = code
def test_committed_reference_pages_are_current(generated):
    stale = [p.as_posix() for p, text in generated.items()
             if not (REPO / p).is_file() or (REPO / p).read_text(encoding="utf-8") != text]
    assert not stale, f"out of date: {', '.join(stale)} (trainer configs, variables, nndiff options or benchmark " \
                      f"results changed): {RUN}"


def test_committed_readme_blocks_are_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    new, missing = docs.replace_blocks(readme, docs.readme_blocks(REPO))
    assert not missing, f"README.md lacks the marker lines of the generated block(s) {missing}: " \
                        f"'{docs.marker(missing[0])}' ... '{docs.END_MARKER}'"
    assert new == readme, f"README.md's generated blocks are out of date: {RUN}"


def test_committed_explanation_blocks_are_current():
    blocks = docs.explanation_blocks(REPO)
    assert len(blocks) == 5, sorted(blocks)
    for page, named in blocks.items():
        text = (REPO / page).read_text(encoding="utf-8")
        new, missing = docs.replace_blocks(text, named)
        assert not missing, f"{page} lacks '{docs.marker(missing[0])}' ... '{docs.END_MARKER}'"
        assert new == text, f"{page}'s equal-budget block is out of date: {RUN}"


def test_the_headline_comes_before_every_other_table_of_the_readme():
    """Issue 20: the README's first table is the equal-budget table. No markdown table (a line starting with '|')
    may stand above the headline block; the block itself is the generated one (checked above)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index(docs.marker("headline"))
    above = [line for line in readme[:start].splitlines() if line.lstrip().startswith("|")]
    assert not above, f"README.md has a table above its headline block: {above[0]!r}"
    assert docs.marker("headline") in "\n".join(readme.splitlines()[:40]), \
        "README.md's headline block starts below its first screen (line 40)"
    # issue 23: the README is the door; everything else lives in documentation/
    assert len(readme.splitlines()) <= 200, f"README.md has {len(readme.splitlines())} lines; at most 200"


def test_every_nndiff_variable_in_the_code_is_in_the_registry():
    """A NNDIFF_* name read anywhere (package, benchmarks, tests, Makefile) must have a help text."""
    found = {}
    sources = [*REPO.glob("nnunet_diffusion/**/*.py"), *REPO.glob("dataset_conversion/**/*.py"),
               *REPO.glob("benchmarks/**/*.py"), *REPO.glob("devtools/**/*.py"), *REPO.glob("tests/**/*.py"),
               REPO / "Makefile"]
    for path in sources:
        if path.name == Path(__file__).name or not path.is_file():
            continue
        for name in re.findall(r"NNDIFF_[A-Z][A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")):
            found.setdefault(name, path.relative_to(REPO).as_posix())
    assert len(found) >= 12  # the scan itself works (8 predict-time, 3 training, benchmark and test variables)
    missing = {n: f for n, f in sorted(found.items()) if n not in variables.all_variables()}
    assert not missing, f"NNDIFF_* variables without a help text in nnunet_diffusion/variables.py (or " \
                        f"inference/options.py ENV_VARS): {missing}"


def test_trainer_constants_take_their_names_from_the_registry():
    from nnunet_diffusion import grid
    from nnunet_diffusion.trainers import ddmd, nndm, recoseg
    assert (nndm.BASELINE_ENV, grid.BASELINE_ENV, ddmd.AES_ENV, recoseg.UNLABELLED_ENV) == \
        ("NNDIFF_BASELINE", "NNDIFF_BASELINE", "NNDIFF_DDMD_AES", "NNDIFF_UNLABELLED")
    assert {"NNDIFF_BASELINE", "NNDIFF_DDMD_AES", "NNDIFF_UNLABELLED"} <= set(variables.TRAINING_VARIABLES)


def test_every_trainer_class_is_on_the_trainers_page(generated):
    """Names from the classes nnU-Net finds, not from the configs the page is generated from."""
    from nnunet_diffusion.trainers import TRAINERS
    page = generated[docs.REFERENCE / "trainers.md"]
    missing = [n for n in TRAINERS if f"`{n}`" not in page]
    assert not missing and "`nnUNetTrainerNNDM_paper`" in page and "`nnUNetTrainer_tiny`" in page, missing


def test_every_subcommand_and_predict_flag_is_on_the_nndiff_page(generated):
    page = generated[docs.REFERENCE / "nndiff.md"]
    for cmd in ("env", "trainers", "predict", "grid", "convert-brats", "evaluate", "demo"):
        assert f"## nndiff {cmd}\n" in page, cmd
    for flag in ("--steps", "--samples", "--no-refine", "--missing", "--uncertainty"):
        assert f"`{flag}" in page, flag
    # the generator is a development tool above the package (make docs), not a subcommand of the installed nndiff
    assert "## nndiff docs" not in page


# ---------------------------------------------------------------------------------------------- the generator
FAKE_TOML = """\
# Fakehead (Doe 2030; arXiv:0000.00000) on nnU-Net's pipeline: a made-up head.

[defaults]
num_epochs = 10                 # ten epochs, ours
num_iterations_per_epoch = 5
# why this sampler: made-up reason
sampler = "ddim"
tag = "a # inside a string"     # the real comment

[variants.quick]
# rationale of the quick variant
description = "fewer epochs | and a pipe"
num_epochs = 2
sampler = "ddpm"                # the paper's chain
"""


def test_a_made_up_config_appears_with_its_values_comments_and_variants():
    text = docs.head_section("fakehead", FAKE_TOML, "nnUNetTrainerFake")
    assert text.startswith("## Fakehead (Doe 2030)\n")
    assert "| `num_epochs` | `10` | ten epochs, ours |" in text
    assert "| `sampler` | `\"ddim\"` | why this sampler: made-up reason |" in text
    assert "| `tag` | `\"a # inside a string\"` | the real comment |" in text
    # the variant: its class name, 2 epochs x 5 iterations = 10 optimiser steps, escaped description, its changes
    row = next(line for line in text.splitlines() if line.startswith("| `nnUNetTrainerFake_quick`"))
    assert row == ("| `nnUNetTrainerFake_quick` | 10 | fewer epochs \\| and a pipe | `num_epochs = 2`; "
                   "`sampler = \"ddpm\"` (the paper's chain) |")
    assert "- `nnUNetTrainerFake_quick`: rationale of the quick variant" in text
    assert "schedule of [defaults]: 50 optimiser steps" in " ".join(text.split())  # 10 epochs x 5 iterations


def test_a_variant_removed_from_the_config_disappears():
    without = FAKE_TOML.split("[variants.quick]")[0]
    text = docs.head_section("fakehead", without, "nnUNetTrainerFake")
    assert "nnUNetTrainerFake_quick" not in text and "No variants." in text


def test_made_up_variables_appear_on_the_environment_page(monkeypatch):
    monkeypatch.setitem(variables.TRAINING_VARIABLES, "NNDIFF_MADE_UP", "a made-up training switch")
    monkeypatch.setitem(options.ENV_VARS, "NNDIFF_INVENTED", "an invented predict <option>")
    page = docs.environment_page()
    assert "| `NNDIFF_MADE_UP` | a made-up training switch |" in page
    assert "| `NNDIFF_INVENTED` |  | an invented predict &lt;option> |" in page
    assert "| `NNDIFF_STEPS` | `--steps` |" in page and "| `NNDIFF_REFINE` | `--no-refine` |" in page


def _parser(with_beta: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nndiff", description="made-up tool")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("alpha", help="the alpha command")
    p.add_argument("target", help="what to alpha")
    if with_beta:
        p.add_argument("--beta", type=int, default=3, help="beta value (%(default)s unless given)")
    p.add_argument("--gamma", nargs=3, type=int, default=(1, 2, 3), metavar=("Z", "Y", "X"))
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    return parser


def test_options_appear_and_a_removed_option_disappears():
    page = docs.nndiff_page(_parser(with_beta=True))
    assert "| [`nndiff alpha`](#nndiff-alpha) | the alpha command |" in page
    assert "| `--beta BETA` | `3` | beta value (3 unless given) |" in page
    assert "| `--gamma Z Y X` | `1 2 3` |  |" in page
    assert "| `target` | required | what to alpha |" in page
    assert "nndiff alpha [-h] [--beta BETA] [--gamma Z Y X] target" in page
    assert "--hidden" not in page  # suppressed options are not documented
    assert "--beta" not in docs.nndiff_page(_parser(with_beta=False))


def test_the_nndiff_page_does_not_depend_on_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    wide = docs.nndiff_page()
    monkeypatch.setenv("COLUMNS", "40")
    assert docs.nndiff_page() == wide


def _fake_table_result() -> dict:
    stats = {"mean": 0.9, "interval": [0.85, 0.95]}
    return {"regions": ["WT"], "date": "2031-01-02 03:04 UTC", "machine": "a made-up machine", "command":
            "python -m benchmarks --part table", "budget_steps": 2000, "heldout_cases": ["c1", "c2", "c3"],
            "phantoms": {"heldout_seed": 7, "train_cases": 24, "seed": 0, "edition": "2021", "spacing": 4.0},
            "budget": {"nnUNetTrainer_table": {"steps": 2000, "seconds": 600},
                       "nnUNetTrainerFake_table": {"steps": 2000, "seconds": 1200}},
            "rows": [{"trainer": "nnUNetTrainer_table", "setting": "stock", "seconds_per_case": 2.0,
                      "dice": {"WT": stats}, "hd95": {"WT": {"mean": 5.0, "interval": [4.0, 6.0]}}},
                     {"trainer": "nnUNetTrainerFake_table", "setting": "ddim 5", "seconds_per_case": 3.0,
                      "dice": {"WT": stats}, "hd95": {"WT": {"mean": 5.0, "interval": [4.0, 6.0]}},
                      "against_stock": {"WT": {"verdict": "no significant difference", "mean_difference": 0.0,
                                               "p_value": 0.9}}}]}


def test_the_headline_is_the_table_when_measured_and_says_so_when_not():
    absent = docs.headline_block(None)
    assert "not measured yet" in absent and "`make table`" in absent and "in progress" in absent
    measured = docs.headline_block(_fake_table_result())
    assert "nnUNetTrainerFake_table" in measured and "a made-up machine" in measured
    assert "`python -m benchmarks --part table`" in measured and "not measured yet" not in measured
    text = " ".join(measured.split())
    assert text.index("better than stock nnU-Net in some region: none.") < text.index("| nnUNetTrainerFake_table")
    assert "No significant difference in any region: nnUNetTrainerFake_table." in text


def test_costs_page_says_what_is_absent_and_renders_what_is_there(tmp_path):
    page = docs.costs_page(tmp_path)
    assert "table.json does not exist" in page and "`make table`" in page
    assert "speed.json does not exist" in page
    speed = json.loads((REPO / "benchmarks" / "results" / "speed.json").read_text())
    speed["meta"]["command"] = "python -m benchmarks --part speed --made-up-flag"
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    (tmp_path / "ddmd_auc.json").write_text("{}")
    page = docs.costs_page(tmp_path)
    assert "Measured by `python -m benchmarks --part speed --made-up-flag`" in page
    assert "speed.json does not exist" not in page
    assert "- ddmd_auc.json: `python -m benchmarks.ddmd_auc`" in page


def test_replace_blocks_keeps_everything_outside_the_markers():
    text = f"intro\n{docs.marker('heads')}\nold\nlines\n{docs.END_MARKER}\nafter\n"
    new, missing = docs.replace_blocks(text, {"heads": "NEW", "headline": "H"})
    assert new == f"intro\n{docs.marker('heads')}\nNEW\n{docs.END_MARKER}\nafter\n"
    assert missing == ["headline"]


def test_make_docs_runs_the_generator_and_names_an_invalid_config_in_one_line(monkeypatch, capsys):
    """``make docs`` is ``python -m devtools.docs`` (``--check`` through DOCS_ARGS); an invalid trainer config stops it
    with exit 2 and the config's own one-line message, not a traceback."""
    from nnunet_diffusion.errors import NNDiffConfigError
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "\ndocs: install\n\t$(PY) -m devtools.docs $(DOCS_ARGS)\n" in makefile
    calls = []
    monkeypatch.setattr(docs, "run_docs", lambda check=False: calls.append(check) or 0)
    assert docs.main(["--check"]) == 0 and docs.main([]) == 0 and calls == [True, False]

    def invalid(check=False):
        raise NNDiffConfigError("trainer_configs/nndm.toml [defaults]: a made-up problem")
    monkeypatch.setattr(docs, "run_docs", invalid)
    assert docs.main([]) == 2
    assert capsys.readouterr().err == \
        "python -m devtools.docs: error: trainer_configs/nndm.toml [defaults]: a made-up problem\n"


def test_docs_check_names_each_stale_page_and_writing_fixes_it(tmp_path, capsys):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text(f"# x\n{docs.marker('headline')}\n{docs.END_MARKER}\n"
                                        f"{docs.marker('heads')}\n{docs.END_MARKER}\n")
    assert docs.run_docs(check=True, repo=tmp_path) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "documentation/reference/trainers.md" in err and "README.md" in err
    assert not (tmp_path / "documentation").exists()  # --check writes nothing
    assert docs.run_docs(repo=tmp_path) == 0
    assert docs.run_docs(check=True, repo=tmp_path) == 0
    page = tmp_path / "documentation" / "reference" / "environment.md"
    page.write_text(page.read_text() + "hand edit\n")
    capsys.readouterr()
    assert docs.run_docs(check=True, repo=tmp_path) == 1
    err = capsys.readouterr().err
    assert "documentation/reference/environment.md" in err and "trainers.md" not in err
    (tmp_path / "README.md").write_text("# no markers\n")
    assert docs.run_docs(repo=tmp_path) == 1
    assert "README.md has no '<!-- generated by make docs: headline -->'" in capsys.readouterr().err


def test_heads_status_column_reads_the_verdicts_of_the_equal_budget_table():
    from devtools.docs import equal_budget_status, heads_block
    assert equal_budget_status("nnUNetTrainerNNDM_table", None) == "not measured yet (`make table`)"
    verdicts = {"whole tumor": {"verdict": "better"}, "tumor core": {"verdict": "no significant difference"},
                "enhancing tumor": {"verdict": "worse"}}
    result = {"variant": "table", "rows": [
        {"trainer": "nnUNetTrainer_table", "setting": "stock", "against_stock": {}},
        {"trainer": "nnUNetTrainerNNDM_table", "setting": "refinement off (its backbone)",
         "against_stock": {r: {"verdict": "worse"} for r in verdicts}},
        {"trainer": "nnUNetTrainerNNDM_table", "setting": "ddim 5 steps x 1 samples", "against_stock": verdicts}]}
    assert equal_budget_status("nnUNetTrainerNNDM_table", result) == "WT better, TC no difference, ET worse"
    assert equal_budget_status("nnUNetTrainerDDMD_table", result) == "not in the table"
    nndm_row = next(line for line in heads_block(result=result).splitlines() if "`nnUNetTrainerNNDM`" in line)
    assert nndm_row.rstrip(" |").endswith("WT better, TC no difference, ET worse")
    # a head whose model did not learn (best setting below the floor) says so beside its verdicts
    result["defaults"] = {"nnUNetTrainerNNDM_table": {"rows": [{"setting": "ddim 1 steps x 1 samples", "dice": 4.0}]}}
    assert equal_budget_status("nnUNetTrainerNNDM_table", result) == \
        "WT better, TC no difference, ET worse; did not learn to segment in the budget"


def _nndm_result():
    """A made-up table.json: stock and NNDM's two rows, one region, numbers picked by hand."""
    def row(trainer, setting, dice, seconds, against=None):
        return {"trainer": trainer, "setting": setting, "seconds_per_case": seconds,
                "dice": {"whole tumor": {"mean": dice, "interval": [dice - 0.01, dice + 0.01]}},
                "against_stock": against or {}}
    return {"variant": "table", "date": "2026-12-01 10:00 UTC", "budget_steps": 2000,
            "heldout_cases": [f"c{i}" for i in range(20)], "rows": [
                row("nnUNetTrainer_table", "stock", 0.90, 2.0),
                row("nnUNetTrainerNNDM_table", "refinement off (its backbone)", 0.89, 2.0,
                    {"whole tumor": {"verdict": "no significant difference", "mean_difference": -0.01,
                                     "p_value": 0.5}}),
                row("nnUNetTrainerNNDM_table", "ddim 5 steps x 1 samples", 0.85, 5.0,
                    {"whole tumor": {"verdict": "worse", "mean_difference": -0.05, "p_value": 0.001}})]}


def test_each_explanation_page_ends_with_what_the_equal_budget_table_measured_for_its_head():
    absent = docs.equal_budget_paragraph("nndm", None)
    assert absent.startswith("Nothing here shows that NNDM beats nnU-Net.") and "not measured yet" in absent
    text = " ".join(docs.equal_budget_paragraph("nndm", _nndm_result()).split())
    for part in ("2026-12-01 10:00 UTC", "2000 optimiser steps", "20 held-out phantoms",
                 "refinement off (its backbone): Dice WT 89.0 against 90.0 (no significant difference, -1.0 points, "
                 "p=0.500); prediction 1.00x stock's time.",
                 "ddim 5 steps x 1 samples: Dice WT 85.0 against 90.0 (worse, -5.0 points, p=0.001); prediction "
                 "2.50x stock's time; target 1.3x.", "[measured costs](../reference/costs.md)"):
        assert part in text, part
    assert "not in the equal-budget table" in docs.equal_budget_paragraph("ddmd", _nndm_result())
    result = _nndm_result()
    rows = [{"setting": "ddim 1 steps x 1 samples", "dice": 4.0},
            {"setting": "ddpm 1000 steps x 1 samples", "dice": 6.5}]
    result["defaults"] = {"nnUNetTrainerNNDM_table": {"rows": rows}}
    text = " ".join(docs.equal_budget_paragraph("nndm", result).split())
    assert "NNDM's model did not learn to segment in these 2000 steps (its best sampling setting scored 6.5 mean " \
           "Dice on fold 0's validation cases, below 50)" in text
    assert "target" not in text   # its row is not a default: no cost target is claimed for it
    # the one-sample run of its shipped chain measured: the paragraph says what that chain costs
    rows[1].update(tags=["shipped at 1 sample"], seconds_per_case=40.0)
    result["validation_stock_seconds"] = 2.0
    text = " ".join(docs.equal_budget_paragraph("nndm", result).split())
    assert "its shipped sampler, ddpm 1000 steps x 1 samples, is over the target of 1.3x by itself: ddpm 1000 " \
           "steps x 1 samples took 40 s / case on fold 0's validation cases, 20x stock's there." in text


def test_an_explanation_page_without_its_markers_is_named(tmp_path, capsys):
    page = tmp_path / "documentation" / "explanation" / "nndm.md"
    page.parent.mkdir(parents=True)
    page.write_text("# NNDM\n\nno markers\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text(f"# x\n{docs.marker('headline')}\n{docs.END_MARKER}\n"
                                        f"{docs.marker('heads')}\n{docs.END_MARKER}\n")
    assert docs.run_docs(repo=tmp_path) == 1
    err = capsys.readouterr().err
    assert "documentation/explanation/nndm.md has no '<!-- generated by make docs: equal-budget -->'" in err
    page.write_text(f"# NNDM\n\n{docs.marker('equal-budget')}\n{docs.END_MARKER}\n\nafter\n")
    assert docs.run_docs(repo=tmp_path) == 0
    written = page.read_text()
    assert "Nothing here shows that NNDM beats nnU-Net." in written and written.endswith("\n\nafter\n")


@pytest.mark.parametrize("marker", ["20261129)", "3.", "-", "#", ">"])
def test_wrapped_paragraph_never_starts_a_line_with_a_markdown_block_marker(marker):
    """A word that would open a list, heading or quote at the start of a wrapped line goes with the word before it."""
    words = ["word"] * 22 + [marker, "never", "seen"] + ["word"] * 30
    for shift in range(6):   # the marker lands at the start of a line for one of these
        text = " ".join(["x"] * shift + words)
        lines = docs._wrap(text).split("\n")
        assert " ".join(lines).split() == text.split()
        assert max(map(len, lines)) <= 116 + len(" word")   # one word moved, not a line joined to another
        assert len(lines) > 1 and not any(re.match(r"([-+*]|\d+[.)]|#+|>|=+)( |$)", line) for line in lines[1:])


def test_the_make_table_comment_of_a_default_keeps_its_tag_once_on_the_trainers_page():
    """`python -m benchmarks.table --apply-defaults` writes its reason over several `# [make table]` lines."""
    from benchmarks import table
    fake = FAKE_TOML.replace('sampler = "ddim"\n', 'sampler = "ddim"\nsampling_steps = 5\nnum_samples = 1\n', 1)
    toml = table.set_default_sampler(fake, "ddim", 2, 1, ["chosen by the rule, " + "because " * 30 + "measured"])
    assert toml.count("# [make table]") > 1
    text = docs.head_section("fakehead", toml, "nnUNetTrainerFake")
    row = next(line for line in text.splitlines() if line.startswith("| `sampler` |"))
    assert row.count("[make table]") == 1
    assert ("why this sampler: made-up reason [make table] chosen by the rule, " + "because " * 30 + "measured |") in row
