"""`nndiff evaluate` on every cohort brats-evaluation 0.0.10 has a config for, cross-checked against the evaluator
itself: the label groups of each config (read from the YAML file here) are the regions `nndiff convert-brats`
declares, and per case and group our legacy Dice / HD95 and lesion-wise Dice / HD95 / instance counts equal
brats-evaluation's on the same made-up volumes (1 mm, tiny, several lesions per case).

The evaluator's package is installed in CI without its dependencies (see _brats_evaluation); elsewhere the
cross-checks skip when it is missing.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.dataset_conversion.brats import EDITIONS, convert_brats
from nnunet_diffusion.evaluation.evaluate import (EvaluationError, brats_cohort, evaluate_folder,
                                                  is_brats_region_dataset, short_region)
from test_lesionwise import _brats_evaluation  # the one skip-or-require rule of the cross-checks

# each bundled config and the edition whose groups it scores; the groups as the config files list them
CONFIG_EDITION = {"gli": "2024-gli", "ped": "2024-ped", "mets": "2024-met", "MenRT": "2024-men-rt",
                  "MenPre": "2023-men", "GoAT": "2024-goat"}
KEY_OF_REGION = {"whole tumor": "wt", "tumor core": "tc", "enhancing tumor": "et", "non-enhancing tumor core": "netc",
                 "surrounding non-enhancing FLAIR hyperintensity": "snfh", "resection cavity": "rc",
                 "cystic component": "cc", "edema": "ed", "gross tumor volume": "gtv"}
# how a made-up tumour is drawn, in the organisers' labels: outer to inner layers, and a disjoint cavity label
LAYERS = {"gli": (2, 1, 3), "ped": (4, 3, 2, 1), "mets": (2, 1, 3), "MenRT": (1,), "MenPre": (2, 1, 3),
          "GoAT": (2, 1, 3)}
CAVITY = {"gli": 4, "mets": 4}
SHAPE = (30, 30, 30)




def config_groups(path: Path) -> dict:
    """{group: (LabelGroup or LabelMergeGroup, labels)} of a panoptica config, read with ruamel.yaml's round-trip
    loader (which keeps the tags; ruamel.yaml is installed with panoptica)."""
    from ruamel.yaml import YAML
    cfg = YAML(typ="rt").load(path.read_text())
    return {k: (g.tag.value.lstrip("!"), tuple(int(v) for v in g["value_labels"]))
            for k, g in cfg["segmentation_class_groups"]["groups"].items()}


@pytest.mark.parametrize("config", list(CONFIG_EDITION))
def test_each_editions_groups_are_its_evaluator_configs(config):
    be = _brats_evaluation()
    groups = config_groups(be.config_path(config))
    ed = EDITIONS[CONFIG_EDITION[config]]
    assert ed.evaluator_config == config
    assert {k: tuple(labels) for k, _, labels in ed.groups} == {k: labels for k, (_, labels) in groups.items()}
    # a group of several labels is their union (LabelMergeGroup), as nnU-Net's regions are
    assert all(kind == ("LabelMergeGroup" if len(labels) > 1 else "LabelGroup") for kind, labels in groups.values())
    assert {KEY_OF_REGION[name] for _, name, _ in ed.groups} == set(groups)


def test_the_configs_differ_only_in_their_label_groups():
    """Matching (maximum bipartite, Dice >= 1e-6), metrics and edge cases are the same in every config, so one
    lesion-wise convention ("panoptica") serves every cohort; only the groups (the regions) change."""
    be = _brats_evaluation()
    rest = {c: be.config_path(c).read_text().split("segmentation_class_groups")[0] for c in CONFIG_EDITION}
    assert len(set(rest.values())) == 1
    assert "MaxBipartiteMatching {matching_metric: !Metric DSC,\n  matching_threshold: 0.000001}" in rest["gli"]


def _blob(rng, centre, radii):
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii))
    return d + rng.normal(0, 0.12, SHAPE) < 1.0


def _cases(config: str):
    """(reference, prediction) label maps in the organisers' labels: three tumours per case (a cavity beside the
    first where the cohort has one); case 0 predicts them shifted and resized, case 1 misses a tumour and adds
    false-positive specks, case 2 has no innermost label on either side (a group empty on both sides)."""
    layers, cavity = LAYERS[config], CAVITY.get(config)
    rng = np.random.default_rng(36)
    out = []
    for k in range(3):
        ref = np.zeros(SHAPE, np.uint8)
        pred = np.zeros(SHAPE, np.uint8)
        for t in range(3):
            c = rng.integers(7, 23, 3)
            r = rng.uniform(2.5, 5.0, 3)
            shift = rng.integers(-2, 3, 3) if k != 1 or t else np.zeros(3, int)
            if cavity is not None and t == 0:
                ref[_blob(rng, c + [0, 0, 5], r * 0.6)] = cavity
                pred[_blob(rng, c + [0, 0, 5] + shift, r * 0.6 * rng.uniform(0.8, 1.2, 3))] = cavity
            for i, label in enumerate(layers):
                scale = 1.0 - 0.6 * i / max(1, len(layers))
                ref[_blob(rng, c, r * scale)] = label
                if not (k == 1 and t == 2):
                    pred[_blob(rng, c + shift, r * scale * rng.uniform(0.8, 1.2, 3))] = label
        if k == 1:
            pred[1:3, 1:3, 1:4] = layers[0]
            pred[27, 27, 27] = layers[-1]
        if k == 2 and len(layers) > 1:
            ref[ref == layers[-1]] = layers[-2]
            pred[pred == layers[-1]] = layers[-2]
        if k == 2 and len(layers) == 1:
            ref[:] = 0
            pred[:] = 0
        out.append((ref, pred))
    return out


def _write(a, path):
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(a, np.uint8)), str(path), useCompression=True)


def _converted_with_predictions(tmp_path: Path, edition: str, cases):
    """The references converted by convert-brats (labelsTr, dataset.json), the predictions in nnU-Net's labels
    beside them, and the organisers'-label files brats-evaluation reads."""
    ed = EDITIONS[edition]
    src, org_pred, nn_pred = tmp_path / "src", tmp_path / "org_pred", tmp_path / "nn_pred"
    org_pred.mkdir()
    nn_pred.mkdir()
    names = []
    for i, (ref, pred) in enumerate(cases):
        name = ed.example_case[:-1] + str(i + 1)
        names.append(name)
        folder = src / name
        folder.mkdir(parents=True)
        for m in ed.modalities:
            _write(np.zeros(SHAPE), folder / ed.file_name(name, m))
        _write(ref, folder / ed.file_name(name, ed.seg_suffix))
        _write(pred, org_pred / f"{name}.nii.gz")
        nn = np.zeros_like(pred)
        for value, nn_value in ed.label_to_nnunet.items():
            nn[pred == value] = nn_value
        _write(nn, nn_pred / f"{name}.nii.gz")
    res = convert_brats(src, edition, raw_root=tmp_path / "raw", progress=False)
    return res.dataset_dir, src, org_pred, nn_pred, names


@pytest.mark.parametrize("config", list(CONFIG_EDITION))
def test_evaluate_agrees_with_brats_evaluation(tmp_path, config):
    """Per case and group: legacy Dice equal and HD95 within 1e-6 mm (inf -> 373; both empty: the evaluator's NaN,
    our 1 and 0), lesion-wise Dice and HD95 (panoptica convention) and the TP / FP / FN / reference instance
    counts equal."""
    be = _brats_evaluation()
    from panoptica import Panoptica_Evaluator
    evaluator = Panoptica_Evaluator.load_from_config(str(be.config_path(config)))
    edition = CONFIG_EDITION[config]
    ds, src, org_pred, nn_pred, names = _converted_with_predictions(tmp_path, edition, _cases(config))
    cluster = edition.startswith("2024")
    # the 2024/2025 editions are evaluated with the evaluator's rule by default; 2023 MEN keeps the 2023 rule
    res = evaluate_folder(nn_pred, ds / "labelsTr", dataset_json=ds / "dataset.json", num_processes=1,
                          progress=False, lesionwise_convention=None if cluster else "panoptica")
    assert res.summary["lesionwise"]["convention"] == "panoptica"
    ours = res.per_case
    ed = EDITIONS[edition]
    assert sorted(set(ours.region)) == sorted(name for _, name, _ in ed.groups)
    seen, max_hd = set(), 0.0
    for name in names:
        ref_file = src / name / ed.file_name(name, ed.seg_suffix)
        theirs = be.evaluate_single_exam(str(org_pred / f"{name}.nii.gz"), str(ref_file), name, evaluator)
        assert "error" not in theirs, theirs
        for region in set(ours.region):
            row = ours[(ours.case == name) & (ours.region == region)].iloc[0]
            t = theirs[KEY_OF_REGION[region]]
            where = (config, name, region)
            assert (row.lesion_tp, row.lesion_fp, row.lesion_fn, row.n_ref_lesions) == (
                t["tp"], t["fp"], t["fn"], t["n_ref_instances"]), where
            if math.isnan(t["global_bin_dsc"]):
                assert (row.dice, row.hd95) == (1.0, 0.0), where      # both empty: the ranking convention
                assert math.isnan(row.lesionwise_dice) and math.isnan(t["sq_dsc"]), where
                seen.add("both empty")
                continue
            t_hd = 373.0 if math.isinf(t["global_bin_hd95"]) else t["global_bin_hd95"]
            assert row.dice == pytest.approx(t["global_bin_dsc"], abs=1e-12), where
            assert row.hd95 == pytest.approx(t_hd, abs=1e-6), where
            t_lw_hd = 373.0 if math.isinf(t["sq_hd95"]) else t["sq_hd95"]
            assert row.lesionwise_dice == pytest.approx(t["sq_dsc"], abs=1e-12), where
            assert row.lesionwise_hd95 == pytest.approx(t_lw_hd, abs=1e-6), where
            max_hd = max(max_hd, abs(row.hd95 - t_hd), abs(row.lesionwise_hd95 - t_lw_hd))
            seen.add("matched" if t["tp"] else "no match")
            if t["fp"]:
                seen.add("false positive")
            if t["fn"]:
                seen.add("missed")
    print(f"{config}: brats-evaluation agreement on {len(names)} cases, max |ΔHD95| = {max_hd:.3g} mm")
    assert {"matched", "false positive", "missed", "both empty"} <= seen, seen


@pytest.fixture(scope="module")
def gli_2024(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gli2024")
    return _converted_with_predictions(tmp, "2024-gli", _cases("gli")[:2])


def test_cli_defaults_to_the_evaluators_rule_for_the_2024_cluster(gli_2024, tmp_path, capsys):
    from nnunet_diffusion.cli import main
    ds, _, _, nn_pred, _ = gli_2024
    assert main(["evaluate", str(nn_pred), str(ds / "labelsTr"), "--dataset-json", str(ds / "dataset.json"), "-o",
                 str(tmp_path / "o"), "-np", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "convention panoptica" in out and "| resection cavity |" in out
    # the BraTS 2023 rule can still be asked for; the edition names the cohort (GLI)
    assert main(["evaluate", str(nn_pred), str(ds / "labelsTr"), "--dataset-json", str(ds / "dataset.json"), "-o",
                 str(tmp_path / "p"), "-np", "1", "--no-progress", "--lesionwise-convention", "brats2023"]) == 0
    assert "convention brats2023, cohort GLI" in capsys.readouterr().out


def test_lesionwise_defaults_and_cohorts_per_edition(tmp_path):
    one_label = dict(EDITIONS["2024-men-rt"].dataset_json(), brats_edition="2024-men-rt",
                     brats_lesionwise_convention="panoptica")
    assert is_brats_region_dataset(one_label)           # lesion-wise by default, though it has no list regions
    assert brats_cohort({"brats_edition": "2024-ped"}) == "PED"
    assert brats_cohort({"brats_edition": "2023-men"}) == "MEN"
    assert brats_cohort({"brats_edition": "2024-men-rt"}) is None
    assert brats_cohort({"brats_edition": "2021"}) == "GLI"
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    a = np.zeros((8, 8, 8), np.uint8)
    a[2:5, 2:5, 2:5] = 1
    _write(a, ref / "BraTS-MEN-RT-0001-1.nii.gz")
    _write(a, pred / "BraTS-MEN-RT-0001-1.nii.gz")
    res = evaluate_folder(pred, ref, dataset_json=one_label, num_processes=1, progress=False)
    assert res.summary["lesionwise"]["convention"] == "panoptica"
    assert res.per_case.region.tolist() == ["gross tumor volume"] and res.per_case.lesionwise_dice.item() == 1.0
    with pytest.raises(EvaluationError, match="the BraTS 2023 lesion-wise rule has no parameters for edition "
                                              "2024-men-rt"):
        evaluate_folder(pred, ref, dataset_json=one_label, progress=False, lesionwise_convention="brats2023")
    res = evaluate_folder(pred, ref, dataset_json=one_label, num_processes=1, progress=False,
                          lesionwise_convention="brats2023", lesionwise_cohort="MEN")
    assert res.summary["lesionwise"]["cohort"] == "MEN"
    assert [short_region(n) for n in ("resection cavity", "surrounding non-enhancing FLAIR hyperintensity",
                                      "non-enhancing tumor core", "cystic component", "edema",
                                      "gross tumor volume")] == ["RC", "SNFH", "NETC", "CC", "ED", "GTV"]
