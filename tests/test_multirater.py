"""Multi-rater conversion: fakes of the ISBI 2015 and LIDC-IDRI layouts → nnU-Net raw with vote-count labels and
rater masks; bad inputs stop with errors naming the case and file."""
import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_diffusion.dataset_conversion.multirater import (MultiRaterCaseError, MultiRaterConversionError,
                                                            convert_isbi2015, convert_lidc)
from nnunet_diffusion.dataset_conversion.multirater import _phantom_blob as _blob
from nnunet_diffusion.dataset_conversion.multirater import write_isbi2015_phantom as make_fake_isbi  # noqa: F401


def test_isbi_conversion_writes_vote_counts_and_rater_masks(tmp_path):
    src = make_fake_isbi(tmp_path / "isbi", subjects=1, timepoints=2, shape=(10, 12, 11))
    out = convert_isbi2015(src, tmp_path / "raw", dataset_id=520, progress=False)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["nndiff_raters"] == 2 and dj["labels"] == {"background": 0, "1 rater": 1, "2 raters": 2}
    assert dj["channel_names"] == {"0": "FLAIR", "1": "MPRAGE", "2": "PD", "3": "T2"} and dj["numTraining"] == 2
    for case in ("training01_01", "training01_02"):
        m1 = sitk.ReadImage(str(src / "training01" / "masks" / f"{case}_mask1.nii"))
        m2 = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "training01" / "masks" / f"{case}_mask2.nii")))
        label = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(m1) + m2)
        assert np.allclose(label.GetSpacing(), m1.GetSpacing()) and np.allclose(label.GetOrigin(), m1.GetOrigin())
        for r, ref in ((1, sitk.GetArrayFromImage(m1)), (2, m2)):
            rater = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsRaters" / f"{case}_rater{r}.nii.gz")))
            assert np.array_equal(rater, ref)
        flair_src = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "training01" / "preprocessed" /
                                                              f"{case}_flair_pp.nii")))
        flair = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz")))
        assert np.array_equal(flair, flair_src)  # channel 0 is FLAIR, voxel for voxel
    assert not (out / "imagesTs").exists()


def test_isbi_bad_inputs_name_case_and_file(tmp_path):
    src = make_fake_isbi(tmp_path / "isbi", subjects=1, timepoints=2, shape=(8, 8, 8))
    pre, masks = src / "training01" / "preprocessed", src / "training01" / "masks"
    (pre / "training01_02_pd_pp.nii").unlink()
    with pytest.raises(MultiRaterCaseError, match=r"case training01_02: file training01_02_pd_pp.nii: missing"):
        convert_isbi2015(src, tmp_path / "raw", progress=False)
    make_fake_isbi(tmp_path / "isbi2", subjects=1, timepoints=1, shape=(8, 8, 8))
    bad = tmp_path / "isbi2" / "training01" / "masks" / "training01_01_mask2.nii"
    ref = sitk.ReadImage(str(bad))
    two = sitk.GetImageFromArray(np.full((8, 8, 8), 2, np.uint8))
    two.CopyInformation(ref)
    sitk.WriteImage(two, str(bad))
    with pytest.raises(MultiRaterCaseError, match=r"training01_01_mask2.nii: a rater mask must be binary"):
        convert_isbi2015(tmp_path / "isbi2", tmp_path / "raw", progress=False)
    img = sitk.GetImageFromArray(np.zeros((8, 8, 9), np.uint8))
    img.SetSpacing(ref.GetSpacing())
    sitk.WriteImage(img, str(bad))
    with pytest.raises(MultiRaterCaseError, match=r"training01_01_mask2.nii: size \(9, 8, 8\) differs"):
        convert_isbi2015(tmp_path / "isbi2", tmp_path / "raw", progress=False)
    (masks / "training01_01_mask1.nii").unlink()
    with pytest.raises(MultiRaterCaseError, match="training01_01_mask1.nii: missing rater mask"):
        convert_isbi2015(src, tmp_path / "raw", progress=False)
    with pytest.raises(MultiRaterConversionError, match="no ISBI 2015 subject folders"):
        convert_isbi2015(tmp_path, tmp_path / "raw", progress=False)
    assert not list((tmp_path / "raw").glob("Dataset*"))  # nothing half-written


def test_isbi_existing_output_needs_overwrite(tmp_path):
    src = make_fake_isbi(tmp_path / "isbi", subjects=1, timepoints=1, shape=(8, 8, 8))
    convert_isbi2015(src, tmp_path / "raw", progress=False)
    with pytest.raises(MultiRaterConversionError, match="already exists; pass --overwrite"):
        convert_isbi2015(src, tmp_path / "raw", progress=False)
    convert_isbi2015(src, tmp_path / "raw", overwrite=True, progress=False)


def test_isbi_raw_folder_inside_the_source_is_refused(tmp_path):
    src = make_fake_isbi(tmp_path / "isbi", subjects=1, timepoints=1, shape=(8, 8, 8))
    with pytest.raises(MultiRaterConversionError, match="lies inside the source"):
        convert_isbi2015(src, src / "raw", progress=False)
    assert not (src / "raw").exists() or not list((src / "raw").glob("Dataset*"))


def _lidc_entries(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        masks = [_blob((16, 16), (8, 8), 2 + r) for r in range(4)]
        out[f"LIDC-IDRI-{i:04d}_slice_{i}"] = {"image": rng.random((16, 16)).astype(np.float32), "masks": masks,
                                               "series_uid": f"1.2.{i}"}
    return out


def test_lidc_pickle_conversion(tmp_path):
    entries = _lidc_entries()
    pkl = tmp_path / "data_lidc.pickle"
    pkl.write_bytes(pickle.dumps(entries))
    out = convert_lidc(pkl, tmp_path / "raw", dataset_id=521, progress=False)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["nndiff_raters"] == 4 and len(dj["labels"]) == 5 and dj["numTraining"] == 3
    for i, entry in enumerate(entries.values()):
        case = f"lidc_{i:05d}"
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz")))
        assert label.shape == (1, 16, 16) and np.array_equal(label[0], sum(entry["masks"]))
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz")))
        assert np.allclose(img[0], entry["image"])
        for r in range(4):
            m = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsRaters" / f"{case}_rater{r + 1}.nii.gz")))
            assert np.array_equal(m[0], entry["masks"][r])
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["cases"]["lidc_00001"].endswith("LIDC-IDRI-0001_slice_1")


def test_lidc_pickle_list_of_pairs_and_bad_entries(tmp_path):
    pairs = [(e["image"], e["masks"]) for e in _lidc_entries(2).values()]
    pkl = tmp_path / "pairs.pickle"
    pkl.write_bytes(pickle.dumps(pairs))
    out = convert_lidc(pkl, tmp_path / "raw", dataset_id=522, progress=False)
    assert len(list((out / "labelsTr").iterdir())) == 2
    pairs[1] = (pairs[1][0], pairs[1][1][:3])
    pkl.write_bytes(pickle.dumps(pairs))
    with pytest.raises(MultiRaterCaseError, match="case lidc_00001: .*3 rater masks; every crop needs 4"):
        convert_lidc(pkl, tmp_path / "raw", dataset_id=523, progress=False)
    pkl.write_bytes(b"not a pickle")
    with pytest.raises(MultiRaterConversionError, match="cannot be read as a pickle"):
        convert_lidc(pkl, tmp_path / "raw", dataset_id=523, progress=False)


def test_lidc_png_folders_with_test_split(tmp_path):
    from PIL import Image
    root = tmp_path / "lidc_crops"
    rng = np.random.default_rng(1)
    for split, patients in (("train", ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]), ("test", ["LIDC-IDRI-0003"])):
        for p in patients:
            (root / split / "images" / p).mkdir(parents=True)
            (root / split / "gt" / p).mkdir(parents=True)
            Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(
                root / split / "images" / p / "z-105.0_c0.png")
            for r in range(4):
                Image.fromarray(_blob((16, 16), (8, 8), 2 + r) * 255).save(root / split / "gt" / p /
                                                                         f"z-105.0_c0_l{r}.png")
    out = convert_lidc(root, tmp_path / "raw", dataset_id=524, progress=False)
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["LIDC_IDRI_0001_z_105_0_c0.nii.gz",
                                                                    "LIDC_IDRI_0002_z_105_0_c0.nii.gz"]
    test_label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / "LIDC_IDRI_0003_z_105_0_c0.nii.gz")))
    assert np.array_equal(test_label[0], sum(_blob((16, 16), (8, 8), 2 + r) for r in range(4)))
    assert len(list((out / "labelsTsRaters").iterdir())) == 4 and (out / "imagesTs").is_dir()
    (root / "train" / "gt" / "LIDC-IDRI-0002" / "z-105.0_c0_l3.png").unlink()
    with pytest.raises(MultiRaterCaseError, match="LIDC_IDRI_0002_z_105_0_c0: file .*_l3.png: missing rater mask"):
        convert_lidc(root, tmp_path / "raw", dataset_id=525, progress=False)
