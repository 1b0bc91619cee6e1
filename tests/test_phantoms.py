"""The semi-synthetic MNI152 phantom generator (dataset_conversion/phantoms.py, `nndiff make-phantoms`), pre-operative
and post-treatment (a resection cavity, BraTS 2024 layout).

Expected directions are textbook MRI appearance (T1: WM > GM > CSF; T2: CSF bright; FLAIR: CSF suppressed,
edema bright; T1ce: enhancing rim bright), not numbers taken from the generator's table.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import distance_transform_edt

from nnunet_diffusion.dataset_conversion.brats import BratsConversionError
from nnunet_diffusion.dataset_conversion.phantoms import make_grid, make_phantom_case, make_phantoms

NNDIFF = Path(sys.executable).parent / "nndiff"
MID = dict(spacing=2.0, crop="brain")          # ~75×92×80 voxels: enough detail to measure contrasts


@pytest.fixture(scope="module")
def cases():
    return [make_phantom_case([s, 0, 0], **MID) for s in range(4)]


def _sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_deterministic_per_seed():
    a = make_phantom_case([5, 0, 1], spacing=6, crop="brain")
    b = make_phantom_case([5, 0, 1], spacing=6, crop="brain")
    c = make_phantom_case([6, 0, 1], spacing=6, crop="brain")
    for k in a.images:
        np.testing.assert_array_equal(a.images[k], b.images[k])
    np.testing.assert_array_equal(a.label, b.label)
    assert _sha(a.images["T1"]) != _sha(c.images["T1"])
    assert a.params["centre_mm"] != c.params["centre_mm"]


def test_case_does_not_depend_on_how_many_are_made(tmp_path):
    one = make_phantoms(tmp_path / "a", "2021", n=1, seed=4, spacing=6, crop="brain", progress=False)
    three = make_phantoms(tmp_path / "b", "2021", n=3, seed=4, spacing=6, crop="brain", progress=False)
    for f in ("BraTS2021_00000_t1ce.nii.gz", "BraTS2021_00000_seg.nii.gz"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(one["training"] / "BraTS2021_00000" / f)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(three["training"] / "BraTS2021_00000" / f)))
        np.testing.assert_array_equal(a, b)
    s0, s1 = (sitk.GetArrayFromImage(sitk.ReadImage(str(three["training"] / c / f"{c}_seg.nii.gz")))
              for c in ("BraTS2021_00000", "BraTS2021_00001"))
    assert not np.array_equal(s0, s1)


def test_all_tumour_labels_present_and_plausible(cases):
    voxel_ml = 2.0 ** 3 / 1000
    for c in cases:
        counts = np.bincount(c.label.ravel(), minlength=4)
        assert (counts[1:] > 0).all(), counts                    # edema, necrosis, enhancing
        whole_ml = counts[1:].sum() * voxel_ml
        assert 5 < whole_ml < 400, whole_ml                      # BraTS whole tumours: a few to a few hundred ml
        assert (c.brain[c.label > 0] >= 0.5).all()               # tumour only inside the brain
        for img in c.images.values():
            assert img.dtype == np.int16 and img.min() >= 0
            assert (img[c.brain < 0.5] == 0).all()               # skull-stripped like BraTS


def _mean(img, mask):
    assert mask.sum() > 20
    return float(img[mask].mean())


def test_contrasts_differ_in_the_expected_directions(cases):
    for c in cases:
        im = {k: v.astype(float) for k, v in c.images.items()}
        wm = (c.wm > 0.9) & (c.label == 0)
        gm = (c.gm > 0.8) & (c.label == 0)
        csf = (c.csf > 0.9) & (c.label == 0)
        et, nec, ed = c.label == 3, c.label == 2, c.label == 1
        rel = {k: {n: _mean(v, m) / _mean(v, wm) for n, m in (("gm", gm), ("csf", csf), ("et", et), ("nec", nec),
                                                                ("ed", ed))} for k, v in im.items()}
        assert rel["T1"]["gm"] < 1 and rel["T1"]["csf"] < rel["T1"]["gm"]        # T1: WM > GM > CSF
        assert rel["T2"]["csf"] > 1.5 and rel["T2"]["gm"] > 1                      # T2: CSF bright, GM > WM
        assert rel["FLAIR"]["csf"] < 0.5 < rel["T2"]["csf"]                         # FLAIR: CSF suppressed
        assert rel["T1ce"]["et"] > 1.3 * rel["T1"]["et"]                            # enhancing rim on T1ce
        assert rel["T1ce"]["nec"] < 0.6 * rel["T1ce"]["et"]                         # dark necrotic centre
        assert rel["FLAIR"]["ed"] > 1.3 and rel["T2"]["ed"] > 1.3                  # edema bright on FLAIR/T2
        assert rel["T1"]["ed"] < 0.9                                                # ...and dark on T1


def test_edema_spreads_preferentially_along_white_matter(cases):
    """At the same distance from the tumour core, white matter is more often edematous than grey matter.
    A symmetric (distance-only) spread gives both the same probability, i.e. a ratio of 1."""
    ratios = []
    for c in cases:
        core = (c.label == 2) | (c.label == 3)
        edema = c.label == 1
        dist = distance_transform_edt(~core, sampling=c.spacing[::-1])
        wm = (c.wm > 0.7) & ~core & (c.brain >= 0.5)
        gm = (c.gm > 0.7) & ~core & (c.brain >= 0.5)
        gm_like_wm = gm_actual = 0.0
        for lo in range(0, 60, 4):                       # 4 mm distance bins
            b = (dist > lo) & (dist <= lo + 4)
            if (wm & b).sum() < 10 or (gm & b).sum() < 10:
                continue
            gm_like_wm += (gm & b).sum() * edema[wm & b].mean()
            gm_actual += (gm & b).sum() * edema[gm & b].mean()
        ratios.append(gm_like_wm / max(gm_actual, 1.0))
    assert min(ratios) > 1.2 and np.median(ratios) > 1.3, ratios


def test_mass_effect_pushes_tissue_away():
    """Compared with the undeformed anatomy, tissue near the tumour is displaced outwards, far tissue not."""
    from nnunet_diffusion.dataset_conversion import phantoms
    c = make_phantom_case([1, 0, 0], **MID)
    grid = make_grid(**MID)
    gx, gy, gz = grid.axes()
    zz, yy, xx = np.meshgrid(gz, gy, gx, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1)
    undeformed = {k: v.reshape(c.brain.shape) for k, v in phantoms._sample(phantoms._reference_at(2), 2, pts).items()}
    np.testing.assert_allclose(c.brain.sum(), undeformed["brain"].sum(), rtol=0.05)  # brain volume about the same
    centre = np.asarray(c.params["centre_mm"])
    r = np.sqrt(((pts - centre) ** 2).sum(1)).reshape(c.brain.shape)
    rho = c.params["mass_effect_radius_mm"]
    ring = (r > rho * 0.2) & (r < rho * 0.9)
    assert np.abs(c.wm[ring] - undeformed["wm"][ring]).mean() > 0.02        # tissue moved near the tumour
    far = r > rho + 10
    np.testing.assert_allclose(c.wm[far], undeformed["wm"][far], atol=1e-5)    # nothing moves far away
    # outward push: near the tumour, the anatomy at x best matches the undeformed anatomy at a point closer to
    # the centre, centre + s (x - centre) with s < 1 (s = 1: no displacement; s > 1: pulled inwards)
    from scipy.ndimage import map_coordinates
    wm_ref = phantoms._reference_at(2)["wm"]

    def undeformed_wm_at(scale):
        p = centre + (pts[ring.ravel()] - centre) * scale
        return map_coordinates(wm_ref, ((p[:, ::-1] + 0.5) / 2 - 0.5).T, order=1)
    scales = np.linspace(0.5, 1.3, 17)
    errors = [np.abs(c.wm[ring] - undeformed_wm_at(s)).mean() for s in scales]
    assert scales[int(np.argmin(errors))] < 0.96, dict(zip(scales.round(2), np.round(errors, 4)))


EDITION_LAYOUT = {
    "2020": ("MICCAI_BraTS2020_TrainingData", "MICCAI_BraTS2020_ValidationData", "BraTS20_Training_001",
             "BraTS20_Validation_001", ("t1", "t1ce", "t2", "flair"), "_", ".nii", {1, 2, 4}),
    "2021": ("RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021", "RSNA_ASNR_MICCAI_BraTS2021_ValidationData",
             "BraTS2021_00000", "BraTS2021_00002", ("t1", "t1ce", "t2", "flair"), "_", ".nii.gz", {1, 2, 4}),
    "2023-gli": ("ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
                 "ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData", "BraTS-GLI-00000-000", "BraTS-GLI-00002-000",
                 ("t1n", "t1c", "t2w", "t2f"), "-", ".nii.gz", {1, 2, 3}),
    # post-treatment glioma 2024: NETC 1, SNFH 2, ET 3, resection cavity 4; the training zip holds training_data1_v2
    "2024-gli": ("BraTS2024-BraTS-GLI-TrainingData/training_data1_v2",
                 "BraTS2024-BraTS-GLI-ValidationData/validation_data", "BraTS-GLI-00000-100", "BraTS-GLI-00002-100",
                 ("t1n", "t1c", "t2w", "t2f"), "-", ".nii.gz", {1, 2, 3, 4}),
}


@pytest.mark.parametrize("edition", list(EDITION_LAYOUT))
def test_brats_layout_and_naming(tmp_path, edition):
    train_dir, val_dir, first, first_val, mods, sep, ext, labels = EDITION_LAYOUT[edition]
    out = make_phantoms(tmp_path, edition, n=2, n_val=1, seed=1, spacing=5, crop="brain", progress=False)
    assert out["training"] == tmp_path / train_dir and out["validation"] == tmp_path / val_dir
    case = out["training"] / first
    assert sorted(p.name for p in case.iterdir()) == sorted(f"{first}{sep}{m}{ext}" for m in (*mods, "seg"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{first}{sep}seg{ext}")))
    assert set(np.unique(seg)) == {0} | labels
    assert sorted(p.name for p in (out["validation"] / first_val).iterdir()) == sorted(
        f"{first_val}{sep}{m}{ext}" for m in mods)
    assert "semi-synthetic" in (out["training"] / "README_PHANTOMS.txt").read_text()
    if edition == "2020":
        assert (out["training"] / "name_mapping.csv").is_file() and (out["training"] / "survival_info.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporary folders left


@pytest.fixture(scope="module")
def post_treatment():
    """Post-treatment cases at 3 mm and their pre-operative twins (same seed, no cavity)."""
    return [(make_phantom_case([s, 0, 0], spacing=3.0, crop="brain", cavity=True),
             make_phantom_case([s, 0, 0], spacing=3.0, crop="brain")) for s in range(3)]


def test_post_treatment_cases_have_a_fluid_cavity_with_an_enhancing_rim(post_treatment):
    """Labels (phantom convention: 1 edema/SNFH, 2 necrosis/NETC, 3 enhancing, 4 cavity) all present; the cavity
    carved out of the pre-operative twin's tumour, disjoint from the tumour labels, with residual NETC/ET next
    to it and SNFH around; CSF-like contrasts inside (dark T1/T1ce, bright T2, dark FLAIR) and a thin rim that
    enhances on T1ce and is labelled SNFH, not enhancing tumour, where it is not residual tumour."""
    from scipy.ndimage import binary_dilation
    for post, pre in post_treatment:
        counts = np.bincount(post.label.ravel(), minlength=5)
        assert (counts[1:] > 0).all(), counts
        cavity = post.label == 4
        assert (pre.label[cavity] > 0).mean() > 0.9                 # carved out of the tumour (and its edema)
        assert (post.brain[cavity] >= 0.5).all()
        assert post.params["centre_mm"] == pre.params["centre_mm"]  # the same tumour as the twin
        outside = ~binary_dilation(pre.label > 0, iterations=3)
        np.testing.assert_array_equal(post.label[outside], pre.label[outside])
        shell = binary_dilation(cavity, iterations=1) & ~cavity & (post.brain >= 0.5)
        near = binary_dilation(cavity, iterations=2) & ~cavity
        assert np.isin(post.label[near], (2, 3)).any()                # residual NETC / ET next to the cavity
        assert (post.label[shell] > 0).mean() > 0.9                   # the rim: SNFH or residual tumour, no gap
        assert not (post.label[shell] == 4).any()
        im = {k: v.astype(float) for k, v in post.images.items()}
        wm = (post.wm > 0.9) & (post.label == 0)
        rim = shell & (post.label == 1)
        assert _mean(im["T1"], cavity) < 0.6 * _mean(im["T1"], wm)
        assert _mean(im["T1ce"], cavity) < 0.6 * _mean(im["T1ce"], wm)
        assert _mean(im["T2"], cavity) > 1.5 * _mean(im["T2"], wm)
        assert _mean(im["FLAIR"], cavity) < 0.6 * _mean(im["FLAIR"], wm)
        assert _mean(im["T1ce"], rim) > 1.15 * max(_mean(im["T1ce"], cavity), _mean(im["T1ce"], wm))
        edema_far = (post.label == 1) & ~near
        assert _mean(im["T1ce"], rim) > _mean(im["T1ce"], edema_far)  # the rim enhances, the edema does not


def test_post_treatment_phantoms_convert_as_2024_gli(tmp_path, monkeypatch):
    from nnunet_diffusion.dataset_conversion.brats import convert_brats
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    out = make_phantoms(tmp_path / "src", "2024-gli", n=2, n_val=1, seed=2, spacing=6, crop="brain", progress=False)
    res = convert_brats([out["training"], out["validation"]], "2024-gli", raw_root=tmp_path / "raw",
                        progress=False)
    assert (res.num_training, res.num_test) == (2, 1)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(res.dataset_dir / "labelsTr" / "BraTS-GLI-00000-100.nii.gz")))
    assert set(np.unique(seg)) == {0, 1, 2, 3, 4}
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    verify_dataset_integrity(str(res.dataset_dir), num_processes=1)


def test_layouts_without_phantoms_are_refused(tmp_path):
    with pytest.raises(BratsConversionError, match="no phantoms in the BraTS 2024 paediatric tumours .*2024-gli"):
        make_phantoms(tmp_path, "2024-ped", n=1, spacing=8, crop="brain", progress=False)


def test_2020_case_355_label_quirk(tmp_path):
    out = make_phantoms(tmp_path, "2020", n=2, seed=0, first_case=354, spacing=8, crop="brain", progress=False)
    assert sorted(p.name for p in (out["training"] / "BraTS20_Training_355").iterdir()) == sorted(
        ["BraTS20_Training_355_t1.nii", "BraTS20_Training_355_t1ce.nii", "BraTS20_Training_355_t2.nii",
         "BraTS20_Training_355_flair.nii", "W39_1998.09.19_Segm.nii"])
    assert (out["training"] / "BraTS20_Training_354" / "BraTS20_Training_354_seg.nii").is_file()


def test_size_options():
    g = make_grid()
    assert g.shape == (240, 240, 155) and g.spacing == (1.0, 1.0, 1.0)      # the BraTS grid by default
    np.testing.assert_allclose(g.origin, (0.0, -239.0, 0.0))
    g = make_grid(spacing=3)
    assert g.shape == (80, 80, 52)
    g = make_grid(shape=(48, 56, 48), crop="brain")
    assert g.shape == (48, 56, 48) and all(s > 2.5 for s in g.spacing)
    g = make_grid(spacing=(2, 3, 4), shape=(10, 10, 10))
    assert g.spacing == (2.0, 3.0, 4.0) and g.shape == (10, 10, 10)
    c = make_phantom_case(0, shape=(24, 28, 20), crop="brain")
    assert c.label.shape == (20, 28, 24) and c.images["FLAIR"].shape == (20, 28, 24)
    with pytest.raises(BratsConversionError):
        make_grid(spacing=0)
    with pytest.raises(BratsConversionError):
        make_grid(crop="skull")


def test_full_size_case_on_the_brats_grid(tmp_path):
    out = make_phantoms(tmp_path, "2021", n=1, seed=2, progress=False)
    img = sitk.ReadImage(str(out["training"] / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz"))
    assert img.GetSize() == (240, 240, 155) and img.GetSpacing() == (1.0, 1.0, 1.0)
    seg = sitk.ReadImage(str(out["training"] / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"))
    assert (seg.GetOrigin(), seg.GetDirection()) == (img.GetOrigin(), img.GetDirection())
    brain_ml = (sitk.GetArrayViewFromImage(img) > 0).sum() / 1000
    assert 1000 < brain_ml < 2000                  # an adult brain (the MNI152 template is ~1.5-1.9 l)


def test_cli_parallel_output_equals_in_process_output_and_existing_output(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [str(NNDIFF), "make-phantoms", str(tmp_path / "cli"), "--edition", "2023-gli", "-n", "2", "--n-val", "1",
           "--shape", "24", "28", "20", "--crop", "brain", "--seed", "9", "-np", "2", "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    api = make_phantoms(tmp_path / "api", "2023-gli", n=2, n_val=1, seed=9, shape=(24, 28, 20), crop="brain",
                        progress=False)
    files = sorted(f.relative_to(tmp_path / "api") for f in (tmp_path / "api").rglob("*.nii.gz"))
    assert len(files) == 2 * 5 + 4
    for f in files:
        a = sitk.ReadImage(str(tmp_path / "cli" / f))
        b = sitk.ReadImage(str(tmp_path / "api" / f))
        assert a.GetSize() == (24, 28, 20)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    # an existing output folder is refused (clean message, no traceback), and replaced with --overwrite
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "already exists" in p.stderr and "Traceback" not in p.stderr
    marker = api["training"] / "marker.txt"
    marker.write_text("old")
    with pytest.raises(BratsConversionError, match="already exists"):
        make_phantoms(tmp_path / "api", "2023-gli", n=1, shape=(24, 28, 20), crop="brain", progress=False)
    make_phantoms(tmp_path / "api", "2023-gli", n=1, shape=(24, 28, 20), crop="brain", overwrite=True, progress=False)
    assert not marker.exists() and len([d for d in api["training"].iterdir() if d.is_dir()]) == 1
