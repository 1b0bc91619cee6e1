"""Semi-synthetic BraTS-like phantoms on real brain anatomy (MNI152), written in the organisers' folder layouts.

**Semi-synthetic, not patient data.** The anatomy is real but averaged over a population: the brain mask and the
grey/white-matter probability maps of the MNI152 template (ICBM 2009a nonlinear symmetric, 1 mm), which nilearn
ships inside its wheel (``load_mni152_template/_gm_/_wm_/_brain_mask``; no download).
Everything else is simulated:

* **Four contrasts from tissue maps** (partial-volume mixing): a voxel's intensity is
  ``I_c(x) = sum_t p_t(x) * I_c,t`` over CSF, GM, WM, edema, enhancing tumour and necrosis, with relative tissue
  intensities of each contrast (``TISSUE_INTENSITY``): T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR as T2 with CSF
  suppressed; T1ce as T1 plus a strongly enhancing tumour rim. Tumour appearance follows the textbook pattern of
  glioblastoma: ring enhancement on T1ce around a T1-hypointense necrotic core, peritumoural edema hyperintense
  on T2/FLAIR and hypointense on T1.
* **Tumour**: 1–3 randomly rotated, irregular ellipsoidal lobes (boundary perturbed by a smooth random field) at
  a random white-matter position above the cerebellum; a necrotic core, an enhancing rim of irregular
  thickness, and edema.
* **Edema spreads preferentially along white matter**: its extent is a travel time from the tumour core through
  tissue, the Eikonal (front-propagation) approximation of the Fisher–Kolmogorov reaction–diffusion model of
  glioma invasion (Konukoglu et al., IEEE TMI 2010), with a front speed proportional to sqrt(D) and a diffusion
  coefficient five times higher in white than in grey matter (Swanson et al., Cell Prolif. 2000); CSF almost
  blocks it. The travel time is computed exactly on a 3 mm graph with Dijkstra's algorithm (26-neighbourhood).
* **Mass effect** (our simple model, not from a paper): the anatomy is pushed radially away from the tumour
  centre by a smooth, compactly supported displacement, ``x_src = c + (x - c) * (1 - k * (1 - r²/ρ²)²)`` for
  r < ρ, which is monotone (no folding) for k < 1.
* **Bias field**: multiplicative ``exp(P(x))`` with ``P`` a random polynomial of degree 3 in the coordinates,
  as TorchIO's RandomBiasField (Pérez-García et al., CMPB 2021), one per contrast.
* **Rician noise**: ``|S + n_1 + i n_2|`` with ``n_1, n_2 ~ N(0, σ²)`` (Gudbjartsson & Patz, MRM 1995).
* Smooth random fields are random Fourier features of a Gaussian-covariance field (Rahimi & Recht, NIPS 2007),
  evaluated in millimetres, so a seed gives the same tumour at any output resolution.
* **Post-treatment** (``cavity=True``; ``nndiff make-phantoms --edition 2024-gli``): the same tumour, then a
  resection cavity carved out of it, as the BraTS 2024 post-treatment annotation describes it (resection cavity
  RC, label 4, disjoint from the tumour labels): an irregular ellipsoid of 0.6–0.85 tumour radii, its centre
  0.3–0.5 radii off the tumour centre, so that residual tumour (enhancing tissue and non-enhancing core) stays on
  one side of it and the edema (SNFH) around both. The cavity holds fluid: CSF's intensities in every contrast,
  dark on T1 and T1ce, bright on T2, suppressed on FLAIR. Around it a thin rim (1.5–2.5 mm, at least one voxel)
  enhances on T1ce; thin linear enhancement along a cavity is not enhancing tumour in the 2024 protocol, so the
  rim is labelled SNFH where it is not residual tumour. The cavity's parameters come from a stream of their own
  (``Generator.spawn``): the tumour, anatomy and noise of a case are those of its pre-operative twin.

Images are skull-stripped (zero outside the brain) like BraTS, on the BraTS 240×240×155 1 mm grid by default
(SimpleITK origin (0, -239, 0), identity direction); ``spacing``/``shape``/``crop`` give small test sizes.
Case ``i`` of seed ``s`` is identical on every machine and run, whatever the number of cases or processes.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .brats import PHANTOM_EDITIONS, BratsConversionError, Edition, _run_tasks, atomic_folder, get_edition
from .conventions import CHANNELS, TISSUE_INTENSITY, TISSUES  # noqa: F401 (TISSUES: part of this API)

CONTRASTS = CHANNELS  # nnU-Net channel order
# nnU-Net's label convention (Dataset137): 1 edema, 2 necrosis / non-enhancing core, 3 enhancing; 4 cavity
EDEMA, NECROSIS, ENHANCING, CAVITY = 1, 2, 3, 4
TISSUE_OF_LABEL = {EDEMA: "edema", NECROSIS: "necrosis", ENHANCING: "enhancing", CAVITY: "cavity"}
"""A phantom label's tissue, the key of an edition's ``phantom_labels`` (its label value for that tissue)."""

BRATS_SHAPE = (240, 240, 155)            # x, y, z voxels (SimpleITK order)
BRATS_ORIGIN = (0.0, -239.0, 0.0)        # LPS mm, identity direction, 1 mm spacing
AUX_SPACING = 3.0                        # mm, the graph on which edema travel times are computed
D_WHITE_OVER_GREY = 5.0                  # Swanson et al. 2000
SEMI_SYNTHETIC_NOTE = ("semi-synthetic phantom (nnunet_diffusion): real MNI152 anatomy, simulated tumour, "
                       "contrasts, bias field and noise; not patient data")


# ----------------------------------------------------------------------------------------------------------
# Reference anatomy on the BraTS grid
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def reference_anatomy() -> dict:
    """MNI152 brain mask and GM/WM/CSF fractions placed on the BraTS 1 mm grid, arrays in (z, y, x) order.

    Axis-aligned placement (no registration to SRI24): the template's voxel axes are RAS, the BraTS grid's
    are LPS, so x and y are flipped; the brain's bounding box is centred in the 240×240×155 field of view.
    """
    from nilearn.datasets import (load_mni152_brain_mask, load_mni152_gm_template, load_mni152_template,
                                  load_mni152_wm_template)
    from scipy.ndimage import binary_fill_holes
    t1_img = load_mni152_template(resolution=1)
    aff = np.asarray(t1_img.affine)
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise BratsConversionError(f"unexpected MNI152 template grid in this nilearn version (affine {aff.tolist()})")
    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    mask = binary_fill_holes(mask)
    gm = np.asarray(load_mni152_gm_template(resolution=1).dataobj, np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=1).dataobj, np.float32)
    ni, nj, nk = mask.shape
    ii, jj, kk = np.nonzero(mask)
    ci, cj, ck = (ii.min() + ii.max()) / 2, (jj.min() + jj.max()) / 2, (kk.min() + kk.max()) / 2
    nx, ny, nz = BRATS_SHAPE
    ox, oy = int(round((nx - 1) / 2 + ci)), int(round((ny - 1) / 2 + cj))   # x = ox - i, y = oy - j
    oz = int(round(ck - (nz - 1) / 2))                                       # z = k - oz
    xs, ys, zs = np.arange(nx), np.arange(ny), np.arange(nz)
    i_of, j_of, k_of = ox - xs, oy - ys, zs + oz
    vx, vy, vz = (i_of >= 0) & (i_of < ni), (j_of >= 0) & (j_of < nj), (k_of >= 0) & (k_of < nk)

    def place(a):
        out = np.zeros((nz, ny, nx), np.float32)
        src = a[np.ix_(i_of[vx], j_of[vy], k_of[vz])].transpose(2, 1, 0)
        out[np.ix_(zs[vz], ys[vy], xs[vx])] = src
        return out
    brain = place(mask.astype(np.float32))
    gm, wm = place(gm) * brain, place(wm) * brain
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(brain - gm - wm, 0, 1)
    # tumour centres: white matter above the cerebellum / brain stem
    z_lo, z_hi = int(0.40 * nz), int(0.85 * nz)
    cand = np.argwhere((wm[z_lo:z_hi] > 0.7)) + [z_lo, 0, 0]
    bb = np.argwhere(brain > 0.5)[:, ::-1]
    return {"brain": brain, "gm": gm, "wm": wm, "csf": csf, "centres": cand.astype(np.int16),
            "brain_lo": bb.min(0).astype(float), "brain_hi": bb.max(0).astype(float)}


@functools.lru_cache(maxsize=4)
def _reference_at(factor: int) -> dict:
    """Block-averaged (``factor``³ voxels) reference maps: anti-aliasing before sampling a coarse grid."""
    ref = reference_anatomy()
    if factor <= 1:
        return ref
    out = {}
    for k in ("brain", "gm", "wm", "csf"):
        a = ref[k]
        pad = [(0, (-s) % factor) for s in a.shape]
        a = np.pad(a, pad)
        z, y, x = (s // factor for s in a.shape)
        out[k] = a.reshape(z, factor, y, factor, x, factor).mean(axis=(1, 3, 5))
    return out


def _sample(maps: dict, factor: int, pts_xyz: np.ndarray) -> dict:
    """Trilinear samples of the reference maps at points given in BraTS-grid millimetres (x, y, z)."""
    from scipy.ndimage import map_coordinates
    # (z, y, x) index coordinates in the (possibly block-averaged) arrays
    coords = pts_xyz[:, ::-1].T.astype(np.float32)
    if factor > 1:
        coords = (coords + 0.5) / factor - 0.5
    return {k: map_coordinates(maps[k], coords, order=1, mode="constant", cval=0.0).astype(np.float32)
            for k in ("brain", "gm", "wm", "csf")}


# ----------------------------------------------------------------------------------------------------------
# Random fields
# ----------------------------------------------------------------------------------------------------------
class SmoothField:
    """A zero-mean, unit-variance smooth random field in millimetres: random Fourier features of a Gaussian
    covariance with correlation length ``length`` (Rahimi & Recht 2007): ``f(x) = sqrt(2/M) Σ cos(ω_m·x + φ_m)``,
    ``ω_m ~ N(0, I/length²)``, ``φ_m ~ U(0, 2π)``."""

    def __init__(self, rng: np.random.Generator, length: float, features: int = 24):
        self.w = rng.normal(0.0, 1.0 / length, (features, 3))
        self.phi = rng.uniform(0, 2 * np.pi, features)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        out = np.zeros(len(pts), np.float64)
        for start in range(0, len(pts), 1 << 16):
            p = pts[start:start + (1 << 16)]
            out[start:start + len(p)] = np.cos(p @ self.w.T + self.phi).sum(1)
        return (out * np.sqrt(2.0 / len(self.phi))).astype(np.float32)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _logistic(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


# ----------------------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """Output grid: ``shape`` and ``spacing`` in (x, y, z); ``first`` = BraTS-grid mm of voxel (0, 0, 0)."""
    shape: tuple
    spacing: tuple
    first: np.ndarray

    @property
    def origin(self) -> tuple:
        return tuple(float(o + f) for o, f in zip(BRATS_ORIGIN, self.first))

    def axes(self):
        return [self.first[a] + np.arange(self.shape[a]) * self.spacing[a] for a in range(3)]


def make_grid(spacing=None, shape=None, crop: str = "brats") -> Grid:
    """The output grid. ``crop="brats"``: the BraTS 240×240×155 mm field of view; ``"brain"``: the brain's
    bounding box plus 4 mm. ``spacing`` (mm, one value or x,y,z) and/or ``shape`` (x,y,z voxels): with only one
    given, the other fills the field of view; with both, the grid is centred on it (cropping or padding)."""
    if crop == "brats":
        lo, hi = np.zeros(3), np.array(BRATS_SHAPE, float) - 1
    elif crop == "brain":
        brain = reference_anatomy()["brain"] > 0.5
        idx = np.argwhere(brain)[:, ::-1]
        lo, hi = idx.min(0) - 4.0, idx.max(0) + 4.0
    else:
        raise BratsConversionError(f"crop must be 'brats' or 'brain'; got {crop!r}")
    fov = hi - lo + 1
    centre = (lo + hi) / 2
    if spacing is not None:
        spacing = np.broadcast_to(np.asarray(spacing, float), (3,)).copy()
        if (spacing <= 0).any():
            raise BratsConversionError(f"spacing must be positive; got {tuple(spacing)}")
    if shape is not None:
        shape = np.broadcast_to(np.asarray(shape, int), (3,)).copy()
        if (shape < 4).any():
            raise BratsConversionError(f"shape must be at least 4 voxels per axis; got {tuple(shape)}")
    if spacing is None and shape is None:
        spacing = np.ones(3)
    if shape is None:
        shape = np.maximum(np.round(fov / spacing).astype(int), 4)
    if spacing is None:
        spacing = fov / shape
    first = centre - (shape - 1) / 2 * spacing
    return Grid(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), first)


@dataclass
class PhantomCase:
    """Arrays in SimpleITK (z, y, x) order. ``label`` uses nnU-Net's convention (1 edema, 2 necrosis, 3 enh.)
    and 4 for a resection cavity.
    ``gm``/``wm``/``csf``/``brain`` are the (mass-effect-deformed) tissue fractions the contrasts were made from."""
    images: dict
    label: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    spacing: tuple
    origin: tuple
    params: dict = field(default_factory=dict)


def make_phantom_case(seed: int | Sequence[int] | np.random.Generator = 0, spacing=None, shape=None,
                      crop: str = "brats", cavity: bool = False) -> PhantomCase:
    """One BraTS-like case (see the module docstring for the model). Deterministic per ``seed``. ``cavity``: the
    post-treatment case, the same tumour with a resection cavity (label 4) carved out of it."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra
    from scipy.ndimage import map_coordinates

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    grid = make_grid(spacing, shape, crop)
    ref = reference_anatomy()

    # ---- tumour parameters (mm in the BraTS grid, x, y, z) ----
    centre = ref["centres"][rng.integers(len(ref["centres"]))][::-1].astype(float) + rng.uniform(-0.5, 0.5, 3)
    radius = rng.uniform(11.0, 24.0)
    lobes = []
    for b in range(int(rng.integers(1, 4))):
        rot = _rotation(rng)
        axes = radius * (rng.uniform(0.75, 1.2, 3) if b == 0 else rng.uniform(0.45, 0.75, 3))
        offset = np.zeros(3) if b == 0 else rot[:, 0] * radius * rng.uniform(0.5, 0.9)
        lobes.append((centre + offset, rot, axes))
    rho_nec = rng.uniform(0.5, 0.8)
    reach = rng.uniform(6.0, 15.0)                  # edema reach in grey-matter millimetres
    k_mass = rng.uniform(0.25, 0.6)
    rho_mass = radius * rng.uniform(2.0, 2.8)
    f_core, f_nec, f_enh, f_edema = (SmoothField(rng, rng.uniform(5, 9)), SmoothField(rng, rng.uniform(4, 8)),
                                     SmoothField(rng, 4.0), SmoothField(rng, rng.uniform(6, 12)))
    extent = 1.9 * radius + np.sqrt(D_WHITE_OVER_GREY) * reach * 1.5 + 6.0
    half = max(extent, rho_mass) + AUX_SPACING

    def core_distance(p):
        d = np.full(len(p), np.inf, np.float32)
        for c, rot, axes in lobes:
            local = (p - c) @ rot / axes
            d = np.minimum(d, np.sqrt((local ** 2).sum(1)).astype(np.float32))
        return d

    def warp(p):
        """Mass effect: where to fetch anatomy for output point p (monotone radial push, see module doc)."""
        v = p - centre
        r2 = (v ** 2).sum(1, keepdims=True)
        w = np.clip(1 - r2 / rho_mass ** 2, 0, None) ** 2
        return centre + v * (1 - k_mass * w)

    # ---- edema travel time on a 3 mm graph around the tumour ----
    # a cube of ±half around the centre, clipped to the brain's bounding box
    lo = np.maximum(centre - half, ref["brain_lo"] - AUX_SPACING)
    hi = np.minimum(centre + half, ref["brain_hi"] + AUX_SPACING)
    aux_n = [int(np.ceil((hi[a] - lo[a]) / AUX_SPACING)) + 1 for a in range(3)]      # x, y, z
    aux_first = lo
    aux_axes = [aux_first[a] + np.arange(aux_n[a]) * AUX_SPACING for a in range(3)]
    aux_shape = (aux_n[2], aux_n[1], aux_n[0])
    az, ay, ax = np.meshgrid(aux_axes[2], aux_axes[1], aux_axes[0], indexing="ij")
    aux_pts = np.stack([ax.ravel(), ay.ravel(), az.ravel()], 1)
    tis = _sample(_reference_at(3), 3, warp(aux_pts))
    # front speed ∝ sqrt(D): 1 in grey matter, sqrt(5) in white matter, nearly blocked in CSF and outside
    speed = (tis["gm"] + np.sqrt(D_WHITE_OVER_GREY) * tis["wm"] + 0.1 * tis["csf"]).astype(np.float64)
    speed = np.where(tis["brain"] > 0.5, np.maximum(speed, 0.05), 1e-4).reshape(aux_shape)
    idx = np.arange(speed.size).reshape(aux_shape)
    rows, cols, wts = [], [], []
    for o in [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) > (0, 0, 0)]:
        s_from = tuple(slice(max(-x, 0), n - max(x, 0)) for x, n in zip(o, aux_shape))
        s_to = tuple(slice(max(x, 0), n - max(-x, 0)) for x, n in zip(o, aux_shape))
        length = AUX_SPACING * float(np.sqrt(sum(x * x for x in o)))
        rows.append(idx[s_from].ravel())
        cols.append(idx[s_to].ravel())
        wts.append((2 * length / (speed[s_from] + speed[s_to])).ravel())
    graph = coo_matrix((np.concatenate(wts), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(speed.size, speed.size)).tocsr()
    d_aux = core_distance(aux_pts)
    sources = np.flatnonzero(d_aux < 1.0)
    if len(sources) == 0:
        sources = np.array([np.argmin(d_aux)])
    travel = dijkstra(graph, directed=False, indices=sources, min_only=True)
    travel = np.minimum(travel, 1e4).astype(np.float32)

    # ---- tumour fields on the 3 mm graph (smooth; interpolated to the output grid below) ----
    # the random fields are evaluated only where they can change a label or an intensity
    near_core = d_aux < 1.6
    near_edema = travel < 2.0 * reach
    d_core_aux, d_nec_aux, t_edema_aux = d_aux.copy(), d_aux.copy(), travel.copy()
    enh_tex_aux = np.zeros_like(d_aux)
    d_core_aux[near_core] += 0.12 * np.clip(f_core(aux_pts[near_core]), -3, 3)      # |change| < 0.6
    d_nec_aux[near_core] += 0.10 * np.clip(f_nec(aux_pts[near_core]), -3, 3)
    enh_tex_aux[near_core] = 0.12 * np.clip(f_enh(aux_pts[near_core]), -3, 3)
    t_edema_aux[near_edema] *= 1 + 0.25 * np.clip(f_edema(aux_pts[near_edema]), -1.6, 1.6)  # x [0.6, 1.4]
    d_core_aux, d_nec_aux, t_edema_aux, enh_tex_aux = (a.reshape(aux_shape) for a in
                                                       (d_core_aux, d_nec_aux, t_edema_aux, enh_tex_aux))
    # where anything happens: the tumour and its edema (with a margin) and the mass-effect support
    busy = ((t_edema_aux < 1.3 * reach + 2 * AUX_SPACING) | (d_core_aux < 1.3)
            | (np.linalg.norm(aux_pts - centre, axis=1) < rho_mass).reshape(aux_shape))
    busy_idx = np.argwhere(busy)                                                  # (z, y, x) aux indices
    busy_lo = aux_first + busy_idx.min(0)[::-1] * AUX_SPACING - AUX_SPACING       # mm, x y z
    busy_hi = aux_first + busy_idx.max(0)[::-1] * AUX_SPACING + AUX_SPACING

    # ---- anatomy on the output grid ----
    gx, gy, gz = grid.axes()
    factor = max(1, int(np.floor(min(grid.spacing) + 1e-6)))
    identity = (grid.shape == BRATS_SHAPE and np.allclose(grid.spacing, 1) and np.allclose(grid.first, 0))
    nx, ny, nz = grid.shape
    if identity:
        tissue = {k: ref[k].copy() for k in ("brain", "gm", "wm", "csf")}
    else:
        zz, yy, xx = np.meshgrid(gz, gy, gx, indexing="ij")
        pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1)
        tissue = {k: v.reshape(nz, ny, nx) for k, v in _sample(_reference_at(factor), factor, pts).items()}

    # the block around the tumour where the anatomy is deformed and the tumour drawn
    sl = []
    for a, ax_ in enumerate((gx, gy, gz)):
        inside = np.flatnonzero((ax_ >= busy_lo[a]) & (ax_ <= busy_hi[a]))
        sl.append(slice(int(inside[0]), int(inside[-1]) + 1) if len(inside) else slice(0, 0))
    block = (sl[2], sl[1], sl[0])
    bz, by, bx = np.meshgrid(gz[sl[2]], gy[sl[1]], gx[sl[0]], indexing="ij")
    bshape = bz.shape
    bpts = np.stack([bx.ravel(), by.ravel(), bz.ravel()], 1)
    for k, v in _sample(_reference_at(factor), factor, warp(bpts)).items():
        tissue[k][block] = v.reshape(bshape)

    # ---- tumour memberships and labels in the block ----
    tau = 0.7  # mm: width of the partial-volume transition at tumour boundaries
    aux_coords = ((bpts - aux_first) / AUX_SPACING)[:, ::-1].T.astype(np.float32)
    del bx, by, bz

    def at_block(a):
        return map_coordinates(a, aux_coords, order=1, mode="nearest")
    d_core, d_nec, t_edema = at_block(d_core_aux), at_block(d_nec_aux), at_block(t_edema_aux)
    brain_b = tissue["brain"][block].ravel()
    csf_b = tissue["csf"][block].ravel()
    inside_brain = brain_b > 0.5
    m_core = _logistic((1 - d_core) * radius / tau) * inside_brain
    m_nec = _logistic((rho_nec - d_nec) * radius / tau)
    m_edema = _logistic((reach - t_edema) / 1.5) * inside_brain
    core = (d_core < 1) & inside_brain
    necrosis = core & (d_nec < rho_nec)
    edema = ~core & (t_edema < reach) & inside_brain & (csf_b < 0.5)
    label = np.zeros((nz, ny, nx), np.uint8)
    lab_b = np.zeros(len(bpts), np.uint8)
    lab_b[edema] = EDEMA
    lab_b[core] = ENHANCING
    lab_b[necrosis] = NECROSIS
    if cavity:
        m_cav, m_rim, in_cav, in_rim, cav_params = _resection_cavity(rng.spawn(1)[0], bpts, centre, radius, grid,
                                                                     tau, inside_brain)
        lab_b[in_rim & ~core] = EDEMA        # thin enhancement along the cavity: SNFH, not enhancing tumour
        lab_b[in_cav] = CAVITY
    label[block] = lab_b.reshape(bshape)

    # ---- contrasts (partial-volume mixing, see module doc), computed on brain voxels only ----
    gm, wm, csf, brain = tissue["gm"], tissue["wm"], tissue["csf"], tissue["brain"]
    brain_mask = brain >= 0.5
    frac_core = np.zeros((nz, ny, nx), np.float32)
    frac_nec = np.zeros_like(frac_core)
    frac_edema = np.zeros_like(frac_core)
    enh_tex = np.zeros_like(frac_core)
    frac_core[block] = m_core.reshape(bshape)
    frac_nec[block] = m_nec.reshape(bshape)
    strength = 0.75 + 0.25 * np.clip(1 - t_edema / reach, 0, 1)
    frac_edema[block] = (m_edema * strength).reshape(bshape)
    enh_tex[block] = at_block(enh_tex_aux).reshape(bshape)
    frac_cav = np.zeros_like(frac_core)
    frac_rim = np.zeros_like(frac_core)
    if cavity:
        frac_cav[block] = m_cav.reshape(bshape)
        frac_rim[block] = m_rim.reshape(bshape)
    v_gm, v_wm, v_csf, v_brain = gm[brain_mask], wm[brain_mask], csf[brain_mask], brain[brain_mask]
    v_core, v_nec, v_ed, v_tex = (frac_core[brain_mask], frac_nec[brain_mask], frac_edema[brain_mask],
                                  enh_tex[brain_mask])
    v_cav, v_rim = frac_cav[brain_mask], frac_rim[brain_mask]
    coords_norm = [(a - c) / 120.0 for a, c in zip((gx, gy, gz), (119.5, 119.5, 77.0))]
    images = {}
    scan_noise = rng.uniform(0.015, 0.035)
    for name in CONTRASTS:
        i_csf, i_gm, i_wm, i_ed, i_enh, i_nec = TISSUE_INTENSITY[name]
        parenchyma = v_gm * i_gm + v_wm * i_wm
        normal = v_csf * i_csf + (1 - v_ed) * parenchyma + v_ed * (v_gm + v_wm) * i_ed
        tumour = v_nec * i_nec + (1 - v_nec) * i_enh * (1 + v_tex)
        img = (1 - v_core) * normal + v_core * tumour
        if cavity:
            img = (1 - v_cav) * img + v_cav * i_csf                          # fluid: CSF-like in every contrast
            if name == "T1ce":
                img = (1 - v_rim) * img + v_rim * i_enh                      # the thin enhancing rim
        img = img / np.maximum(v_brain, 1e-3)                               # skull-stripped: no edge fall-off
        img *= _bias_field(rng, coords_norm)[brain_mask]
        sigma = scan_noise * 0.86
        n1 = rng.standard_normal(img.shape, np.float32)
        n2 = rng.standard_normal(img.shape, np.float32)
        img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)         # Rician magnitude
        img *= rng.uniform(600, 1400)
        full = np.zeros((nz, ny, nx), np.int16)
        full[brain_mask] = np.round(img).astype(np.int16)
        images[name] = full
    label[~brain_mask] = 0
    params = {"centre_mm": centre.tolist(), "radius_mm": float(radius), "lobes": len(lobes),
              "necrosis_fraction": float(rho_nec), "edema_reach_grey_mm": float(reach),
              "mass_effect_k": float(k_mass), "mass_effect_radius_mm": float(rho_mass)}
    if cavity:
        params.update(cav_params)
    return PhantomCase(images, label, gm, wm, csf, brain, grid.spacing, grid.origin, params)


def _resection_cavity(rng: np.random.Generator, pts: np.ndarray, centre: np.ndarray, radius: float, grid: Grid,
                      tau: float, inside_brain: np.ndarray):
    """The resection cavity of a post-treatment case at points ``pts`` (mm, x y z): (cavity membership, rim
    membership, cavity mask, rim mask, parameters). Shape and placement: see the module docstring."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    cav_centre = centre + direction * radius * rng.uniform(0.3, 0.5)
    rot = _rotation(rng)
    axes = radius * rng.uniform(0.6, 0.85) * rng.uniform(0.85, 1.15, 3)
    rim_mm = max(rng.uniform(1.5, 2.5), max(grid.spacing))      # thin, but at least one voxel
    field = SmoothField(rng, rng.uniform(5, 9))
    d = np.sqrt((((pts - cav_centre) @ rot / axes) ** 2).sum(1)).astype(np.float32)
    near = d < 1.6
    d[near] += 0.08 * np.clip(field(pts[near]), -3, 3)             # irregular wall, |change| < 0.24
    outside_mm = (d - 1) * float(axes.mean())                      # ~ mm outside the cavity wall
    in_cav = (d < 1) & inside_brain
    in_rim = ~in_cav & (outside_mm < rim_mm) & inside_brain
    m_cav = _logistic(-outside_mm / tau) * inside_brain
    m_rim = _logistic(outside_mm / tau) * _logistic((rim_mm - outside_mm) / tau) * inside_brain
    params = {"cavity_centre_mm": cav_centre.tolist(), "cavity_axes_mm": axes.tolist(), "cavity_rim_mm": rim_mm}
    return m_cav, m_rim, in_cav, in_rim, params


def _bias_field(rng: np.random.Generator, coords) -> np.ndarray:
    """``exp(P(x, y, z))``, P a random polynomial of total degree 3 (TorchIO RandomBiasField's model).

    Evaluated separably: ``P = Σ_k z^k Σ_j y^j Σ_i c_ijk x^i`` (a few full-size operations only)."""
    gx, gy, gz = (np.asarray(c, np.float64) for c in coords)
    coef = np.zeros((4, 4, 4))
    for i in range(4):
        for j in range(4 - i):
            for k in range(4 - i - j):
                if i + j + k:
                    coef[i, j, k] = rng.normal(0, 0.12) / (i + j + k)
    xp = np.stack([gx ** i for i in range(4)])          # (4, nx)
    yp = np.stack([gy ** j for j in range(4)])          # (4, ny)
    log_bias = np.zeros((len(gz), len(gy), len(gx)), np.float32)
    for k in range(4):
        plane = np.einsum("ij,ix,jy->yx", coef[:, :, k], xp, yp)    # Σ_j y^j Σ_i c_ijk x^i
        log_bias += (gz[:, None, None] ** k * plane[None]).astype(np.float32)
    return np.exp(log_bias)


# ----------------------------------------------------------------------------------------------------------
# BraTS layouts
# ----------------------------------------------------------------------------------------------------------
def case_names(edition: str | Edition, n_train: int, n_val: int = 0, first_case: int | None = None
               ) -> tuple[list[str], list[str]]:
    """Organiser-style case names: 2020 ``BraTS20_Training_001`` / ``BraTS20_Validation_001``, else the edition's
    ``case_format`` (validation numbers continue after training): 2021 ``BraTS2021_00000``, 2023
    ``BraTS-GLI-00000-000``, 2024 post-treatment ``BraTS-GLI-00000-100``."""
    ed = get_edition(edition)
    if ed.key == "2020":
        first = 1 if first_case is None else first_case
        return ([f"BraTS20_Training_{first + i:03d}" for i in range(n_train)],
                [f"BraTS20_Validation_{1 + i:03d}" for i in range(n_val)])
    first = 0 if first_case is None else first_case
    fmt = ed.case_format
    return ([fmt.format(first + i) for i in range(n_train)],
            [fmt.format(first + n_train + i) for i in range(n_val)])


def write_case(case: PhantomCase, folder: Path, name: str, edition: str | Edition, with_seg: bool = True) -> None:
    """Write one case folder as the organisers ship it (file names, extension, label values, known quirks)."""
    import SimpleITK as sitk
    ed = get_edition(edition)
    folder.mkdir(parents=True, exist_ok=True)

    def write(arr, fname):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(case.spacing)
        img.SetOrigin(case.origin)
        sitk.WriteImage(img, str(folder / fname), useCompression=fname.endswith(".gz"))
    for contrast, suffix in zip(CONTRASTS, ed.modalities):
        write(case.images[contrast], ed.file_name(name, suffix))
    if with_seg:
        seg = np.zeros_like(case.label)
        for value in np.unique(case.label[case.label > 0]).tolist():
            tissue = TISSUE_OF_LABEL[value]
            if tissue not in ed.phantom_labels:
                raise BratsConversionError(f"the {ed.title} layout has no label for the phantom's {tissue}")
            seg[case.label == value] = ed.phantom_labels[tissue]
        write(seg, ed.seg_aliases.get(name, ed.file_name(name, ed.seg_suffix)))


def _phantom_task(task):
    folder, name, edition, with_seg, seed_seq, spacing, shape, crop = task
    cavity = "cavity" in get_edition(edition).phantom_labels
    case = make_phantom_case(np.random.default_rng(seed_seq), spacing, shape, crop, cavity=cavity)
    write_case(case, folder / name, name, edition, with_seg)
    return name


def _write_csvs(folder: Path, edition: Edition, names: list[str], training: bool, seed: int) -> None:
    """BraTS 2020 ships CSV files beside the case folders; write look-alikes (placeholder values)."""
    if edition.key != "2020":
        return
    rng = np.random.default_rng([seed, 7])
    if training:
        with open(folder / "name_mapping.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                        "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"])
            for n in names:
                w.writerow(["HGG", "NA", "NA", "NA", "NA", n])
        with open(folder / "survival_info.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Brats20ID", "Age", "Survival_days", "Extent_of_Resection"])
            for n in names:
                w.writerow([n, f"{rng.uniform(30, 80):.3f}", int(rng.integers(50, 1500)), "GTR"])
    else:
        with open(folder / "name_mapping_validation_data.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                        "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"])
            for n in names:
                w.writerow(["NA", "NA", "NA", "NA", n])
        with open(folder / "survival_evaluation.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["BraTS20ID", "Age", "ResectionStatus"])
            for n in names:
                w.writerow([n, f"{rng.uniform(30, 80):.3f}", "GTR"])


def make_phantoms(out_dir: str | os.PathLike, edition: str | Edition = "2021", n: int = 4, n_val: int = 0,
                  seed: int = 0, spacing=None, shape=None, crop: str = "brats", first_case: int | None = None,
                  num_processes: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``out_dir/<training folder>`` (``n`` cases with seg) and, if ``n_val``, ``out_dir/<validation
    folder>`` (cases without seg) in the edition's layout, e.g. RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021/
    BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz. Returns {"training": path, "validation": path}.
    Editions: :data:`.brats.PHANTOM_EDITIONS`; 2024-gli writes post-treatment cases (a resection cavity, label 4)
    in the 2024 layout, ``BraTS2024-BraTS-GLI-TrainingData/training_data1_v2/BraTS-GLI-00000-100/...``.

    Each folder is written to a temporary folder and renamed into place at the end (nothing half-written on
    interruption). A ``README_PHANTOMS.txt`` beside the cases says that the data are semi-synthetic.
    """
    ed = get_edition(edition)
    if not ed.phantom_labels:
        raise BratsConversionError(f"no phantoms in the {ed.title} layout; make-phantoms writes "
                                   f"{', '.join(PHANTOM_EDITIONS)}")
    if n < 0 or n_val < 0 or n + n_val == 0:
        raise BratsConversionError(f"ask for at least one case (n={n}, n_val={n_val})")
    out_dir = Path(out_dir)
    train_names, val_names = case_names(ed, n, n_val, first_case)
    jobs = [("training", ed.training_folder, train_names, True), ("validation", ed.validation_folder, val_names,
                                                                   False)]
    jobs = [j for j in jobs if j[2]]
    for _, folder, _, _ in jobs:
        if (out_dir / folder).exists() and not overwrite:
            raise BratsConversionError(f"{out_dir / folder} already exists; pass --overwrite to replace it")
    result = {}
    with contextlib.ExitStack() as stack:
        tasks = []
        for kind, folder, names, with_seg in jobs:
            tmp = stack.enter_context(atomic_folder(out_dir / folder, overwrite=True))
            result[kind] = out_dir / folder
            stream = 0 if with_seg else 1
            for i, name in enumerate(names):
                tasks.append((tmp, name, ed.key, with_seg, [seed, stream, i], spacing, shape, crop))
            _write_csvs(tmp, ed, names, with_seg, seed)
            (tmp / "README_PHANTOMS.txt").write_text(
                f"{SEMI_SYNTHETIC_NOTE}.\nLayout and naming of {ed.title} ({kind}); seed {seed}.\n"
                "Generated by nnunet_diffusion.dataset_conversion.phantoms (nndiff make-phantoms).\n")
        make_grid(spacing, shape, crop)   # fail early on bad size options
        with contextlib.closing(_run_tasks(_phantom_task, tasks, num_processes, f"phantoms {ed.title}",
                                           progress)) as results:
            for _ in results:
                pass
    return result
