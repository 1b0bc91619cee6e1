"""Every head of the registry end to end on the BraTS 2024 post-treatment glioma layout (2024-GLI): four labels
(NETC 1, SNFH 2, ET 3, resection cavity RC 4) scored on six overlapping groups (ET, NETC, SNFH, RC, TC = NETC + ET,
WT = NETC + SNFH + ET; RC disjoint from the tumour), i.e. non-nested nnU-Net regions with regions_class_order.

Once per module: ``nndiff make-phantoms --edition 2024-gli`` (5 post-treatment cases at 6 mm, the brain's bounding
box, 26×32×27 voxels: nnU-Net's 5-fold split needs 5 training cases), ``nndiff convert-brats --edition 2024-gli``
and ``nnUNetv2_plan_and_preprocess``. Then, per head of :data:`nnunet_diffusion.registry.HEADS` (its ``_tiny``
variant, parametrised so that a failing head names itself): fold 0 trained by ``nnUNetv2_train``, its validation
case predicted by ``nnUNetv2_predict`` (valid label maps, labels 0..4, the input's geometry) and scored by
``nndiff evaluate``'s function on the six groups. A head with extra outputs (the registry's ``residual_maps``,
``discrepancy_maps``, ``sample_outputs``) predicts with ``nndiff predict`` and that output's flag instead: nnU-Net's
own nnUNetv2_predict entry point with the same arguments, then the head's maps of the same cases, which must have
the input's geometry (MoDiff's samples: label maps of the same labels).
"""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DEVICE, nnunet_env, run
from nnunet_diffusion.evaluation.evaluate import evaluate_folder, short_region
from nnunet_diffusion.registry import HEADS

pytestmark = pytest.mark.e2e
DATASET_ID = 994
DATASET = "Dataset994_GLI2024Phantoms"
GROUPS = {"ET": [3], "NETC": [1], "SNFH": [2], "RC": [4], "TC": [1, 3], "WT": [1, 2, 3]}  # labelsTr values
LABELS = {0, 1, 2, 3, 4}
# the registry's map capabilities: nndiff predict's flag, the folder it writes, the files of one case
MAPS = {"residual_maps": ("--residuals", "residuals", "{case}.nii.gz"),
        "discrepancy_maps": ("--discrepancy", "discrepancy", "{case}_X.nii.gz"),
        "sample_outputs": ("--samples-out", "samples", "{case}_sample*.nii.gz")}


def assert_label_map_like(path: Path, ref):
    """A label map of the 2024-GLI labels in the geometry of the input image ``ref``."""
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == ref.GetSize()
    assert np.allclose(img.GetSpacing(), ref.GetSpacing()) and np.allclose(img.GetOrigin(), ref.GetOrigin())
    assert np.allclose(img.GetDirection(), ref.GetDirection())
    values = set(np.unique(sitk.GetArrayFromImage(img)).tolist())
    assert values <= LABELS, f"{path.name}: {values}"


@pytest.fixture(scope="module")
def gli2024(tmp_path_factory):
    """5 post-treatment phantoms in the 2024 layout, converted to nnU-Net raw, planned and preprocessed."""
    root = tmp_path_factory.mktemp("brats2024")
    env = nnunet_env(root)
    made = run([BIN / "nndiff", "make-phantoms", root / "src", "--edition", "2024-gli", "-n", 5, "--seed", 3,
                "--spacing", 6, "--crop", "brain", "--no-progress"], env)
    source = root / "src" / "BraTS2024-BraTS-GLI-TrainingData" / "training_data1_v2"
    converted = run([BIN / "nndiff", "convert-brats", source, "--edition", "2024-gli", "-d", DATASET_ID, "--name",
                     "GLI2024Phantoms", "--raw", root / "raw", "--no-progress"], env)
    planned = run([BIN / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", 1, "-np", 1,
                   "--verify_dataset_integrity"], env, nnUNet_n_proc_DA=1)
    print(f"\n2024-GLI dataset: make-phantoms {made.seconds:.1f} s, convert-brats {converted.seconds:.1f} s, "
          f"plan and preprocess {planned.seconds:.1f} s")
    return SimpleNamespace(root=root, env=env, raw=root / "raw" / DATASET,
                           preprocessed=Path(env["nnUNet_preprocessed"]) / DATASET)


def test_the_dataset_has_the_six_overlapping_2024_gli_regions(gli2024):
    dj = json.loads((gli2024.raw / "dataset.json").read_text())
    regions = {short_region(k): sorted(v) for k, v in dj["labels"].items() if k != "background"}
    assert regions == GROUPS
    assert len(dj["regions_class_order"]) == len(GROUPS) and set(dj["regions_class_order"]) == LABELS - {0}
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(next((gli2024.raw / "labelsTr").glob("*.nii.gz")))))
    assert set(np.unique(seg).tolist()) == LABELS  # every label, the cavity included, in the phantoms
    plans = json.loads((gli2024.preprocessed / "nnUNetPlans.json").read_text())
    print(f"2024-GLI phantoms: {seg.shape[::-1]} voxels, 3d_fullres patch "
          f"{plans['configurations']['3d_fullres']['patch_size']}")


@pytest.mark.parametrize("head", HEADS, ids=[h.name for h in HEADS])
def test_tiny_variant_trains_predicts_and_is_scored_on_the_six_groups(gli2024, head, tmp_path):
    trainer = head.trainer_name("tiny")
    env = gli2024.env
    trained = run([BIN / "nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", trainer, "-device", DEVICE], env)
    assert f"Using trainer '{trainer}' from" in trained.output
    fold = Path(env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    validation = json.loads((fold / "validation" / "summary.json").read_text())  # nnU-Net's final validation
    assert len(validation["mean"]) == len(GROUPS)  # nnU-Net scored each of the six regions
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer
    if head.diffusion:
        assert int(ckpt["network_weights"]["region_based"]) == 1

    # the fold's validation case (held out from its training), predicted through nnU-Net's console script
    split = json.loads((gli2024.preprocessed / "splits_final.json").read_text())[0]
    cases = sorted(split["val"])
    images = tmp_path / "images"
    images.mkdir()
    for case in cases:
        for f in (gli2024.raw / "imagesTr").glob(f"{case}_*.nii.gz"):
            shutil.copy(f, images / f.name)
    pred = tmp_path / "pred"
    args = ["-i", images, "-o", pred, "-d", DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", trainer, "-device",
            DEVICE, "-npp", 1, "-nps", 1, "--disable_tta", "--disable_progress_bar"]
    maps = [m for m in MAPS if getattr(head, m)]
    if maps:  # nnUNetv2_predict's own entry point with these arguments, then the head's maps of the same cases
        predicted = run([BIN / "nndiff", "predict", *(MAPS[m][0] for m in maps), *args], env)
    else:
        predicted = run([BIN / "nnUNetv2_predict", *args], env)
    for case in cases:
        ref = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        assert_label_map_like(pred / f"{case}.nii.gz", ref)
        for m in maps:
            flag, folder, names = MAPS[m]
            files = sorted((pred / folder).glob(names.format(case=case)))
            assert files, f"{flag} wrote no {names.format(case=case)} in {pred / folder}"
            for f in files:
                img = sitk.ReadImage(str(f))
                assert img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing())
                arr = sitk.GetArrayFromImage(img)
                assert np.isfinite(arr).all()
                if m == "sample_outputs":
                    assert_label_map_like(f, ref)  # each sample is a label map of the dataset's regions

    # scored as `nndiff evaluate` scores it (its function, in this process: no second start of Python)
    result = evaluate_folder(pred, gli2024.raw / "labelsTr", tmp_path / "eval", dataset_json=gli2024.raw /
                             "dataset.json", num_processes=1, only_predicted=True, progress=False)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {short_region(k): sorted(v) for k, v in summary["regions"].items()} == GROUPS
    assert summary["n_cases"] == len(cases) and summary["lesionwise"]["convention"] == "panoptica"
    rows = result.per_case
    assert sorted(short_region(r) for r in rows["region"]) == sorted(list(GROUPS) * len(cases))
    assert ((rows["dice"] >= 0) & (rows["dice"] <= 1)).all()
    print(f"{trainer}: train {trained.seconds:.1f} s, predict {len(cases)} case(s) {predicted.seconds:.1f} s; "
          "Dice " + ", ".join(f"{short_region(r)} {d:.2f}" for r, d in zip(rows["region"], rows["dice"])))
