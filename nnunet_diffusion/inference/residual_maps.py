"""ReCoSeg residual maps for whole cases: once after stage 1 for the training data, and as NIfTI beside a
prediction (``nndiff predict --residuals``).

nnU-Net's predictor returns segmentation logits only and has no hook for extra per-case outputs, so the residual
map of a whole case is computed here with the same tiling nnU-Net uses (``compute_steps_for_sliding_window``,
Gaussian weights from ``compute_gaussian``, step 0.5, the planned patch) and put back into the input image's
geometry the way nnU-Net exports a prediction (resample → revert crop → revert transpose).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from tqdm import tqdm

from ..errors import NNDiffConfigError

RESIDUAL_DTYPE = np.float16


@torch.no_grad()
def sliding_window(fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, patch_size: Sequence[int],
                   out_channels: int = 1, step_size: float = 0.5) -> torch.Tensor:
    """``fn`` (a (1, C, *patch) window → (1, out_channels, *patch)) over a whole case ``data`` (C, *spatial),
    blended with nnU-Net's Gaussian weights. A 2D patch on 3D data tiles every slice of the first axis, as
    nnU-Net's 2d configuration does. Returns (out_channels, *spatial) float32 on ``data``'s device."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    patch = tuple(int(p) for p in patch_size)
    two_d = len(patch) == data.ndim - 2
    tile = (1, *patch) if two_d else patch
    padded, slicer = pad_nd_image(data, tile, "constant", {"value": 0}, True, None)
    spatial = padded.shape[1:]
    steps = compute_steps_for_sliding_window(spatial, tile, step_size)
    gaussian = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=data.device)
    out = torch.zeros((out_channels, *spatial), dtype=torch.float32, device=data.device)
    weight = torch.zeros(spatial, dtype=torch.float32, device=data.device)
    for corner in np.stack(np.meshgrid(*steps, indexing="ij"), -1).reshape(-1, len(tile)):
        sl = tuple(slice(int(c), int(c) + t) for c, t in zip(corner, tile))
        window = padded[(slice(None), *sl)][None]
        if two_d:
            result = fn(window[:, :, 0])[0].float()[:, None]
            g = gaussian[None]
        else:
            result = fn(window)[0].float()
            g = gaussian
        out[(slice(None), *sl)] += result * g
        weight[sl] += g
    out /= weight
    return out[(slice(None), *slicer[1:])]


def case_residual(network, data: torch.Tensor, patch_size: Sequence[int], step_size: float = 0.5,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """THE residual computation of ReCoSeg, used by stage 2's training data (``precompute_residuals``), by
    ``nnUNetv2_predict`` and the final validation (``ReCoSegNetwork.case_input``, before nnU-Net's sliding window
    over the segmenter) and by ``nndiff predict --residuals``: for a whole preprocessed case ``data``
    (C, *spatial), the synthetic T1ce ŝ_0 of every window (ReCoSeg §2 stage 1, ``network.synthesise_window``)
    blended over the case with nnU-Net's tiling and Gaussian weights (``sliding_window``), then
    r = |ŝ_0 − s_0| (ReCoSeg §2, ``heads.recoseg.residual_inputs``; missing channels as described there).
    Returns (x as the segmenter sees it (C, *spatial), r (1, *spatial) float32)."""
    from ..heads import recoseg

    target, missing = network.target, network.missing_channels()
    condition = recoseg.condition_input(data[None], target, missing)[0]
    synthetic = sliding_window(network.synthesise_window, condition, patch_size, step_size=step_size)
    return recoseg.residual_inputs(data, synthetic, target, missing)


def residual_of_case(network, data: torch.Tensor, patch_size: Sequence[int], step_size: float = 0.5
                     ) -> torch.Tensor:
    """r = |synthetic T1ce − T1ce| (ReCoSeg §2) for a whole preprocessed case (C, *spatial) → (1, *spatial)
    (``case_residual``'s r)."""
    return case_residual(network, data, patch_size, step_size)[1]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def residual_file(folder: os.PathLike, identifier: str) -> Path:
    return Path(folder) / f"{identifier}.npy"


def precompute_residuals(network, load_case: Callable[[str], np.ndarray], identifiers: Iterable[str],
                         folder: os.PathLike, patch_size: Sequence[int], device: torch.device,
                         progress: bool = True) -> list[str]:
    """Residual map of every case in ``identifiers`` that has none yet in ``folder`` (``<case>.npy``, float16,
    the preprocessed case's shape with one channel). Each file is written to a temporary name and renamed, so an
    interrupted run leaves only whole files and the next run computes the rest. Returns the cases computed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in identifiers if not residual_file(folder, i).is_file()]
    for identifier in tqdm(todo, desc="ReCoSeg residual maps", disable=not progress or not todo):
        data = torch.from_numpy(np.asarray(load_case(identifier), dtype=np.float32)).to(device)
        r = residual_of_case(network, data, patch_size)
        _atomic_save(residual_file(folder, identifier), r.cpu().numpy().astype(RESIDUAL_DTYPE))
    return todo


class ChannelStack:
    """The preprocessed image of a case with its residual map as one more channel, read lazily: slicing (what
    nnU-Net's data loader does to crop a patch) reads only that region of both arrays."""

    def __init__(self, data, residual: np.ndarray):
        if tuple(residual.shape[1:]) != tuple(data.shape[1:]):
            raise NNDiffConfigError(f"residual map of shape {tuple(residual.shape)} does not fit the preprocessed "
                                    f"case of shape {tuple(data.shape)}; delete the residuals folder so they are "
                                    f"recomputed")
        self.data, self.residual = data, residual
        self.shape = (data.shape[0] + residual.shape[0], *data.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, item):
        if not isinstance(item, tuple) or item[0] != slice(None):
            raise IndexError("ChannelStack supports slicing of all channels only (as nnU-Net's patch cropping does)")
        a = np.asarray(self.data[item], dtype=np.float32)
        b = np.asarray(self.residual[item], dtype=np.float32)
        return np.concatenate([a, b], 0)


def wrap_dataset_class(base: type, residual_folder: os.PathLike) -> type:
    """A subclass of nnU-Net's dataset class ``base`` whose ``load_case`` appends the case's residual map as
    the last image channel, so nnU-Net's crop, augmentation and batching move image and residual together."""
    folder = str(residual_folder)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = base.load_case(self, identifier)
        path = residual_file(folder, identifier)
        if not path.is_file():
            raise NNDiffConfigError(f"ReCoSeg: no residual map for case {identifier} ({path}); it is computed "
                                    f"after stage 1 (resume with --c to compute missing ones)")
        return ChannelStack(data, np.load(path, mmap_mode="r")), seg, seg_prev, properties

    return type(f"{base.__name__}WithResidual", (base,), {"load_case": load_case, "__module__": __name__})


# ---------------------------------------------------------------------------------------------- export
def revert_to_original_geometry(volume: np.ndarray, properties: dict, plans_manager, configuration_manager,
                                ) -> np.ndarray:
    """A preprocessed-space map (C, *spatial) back to the input image's voxel grid, as nnU-Net's
    ``convert_predicted_logits_to_segmentation_with_correct_shape`` does for probabilities: resample
    (its probability resampling), paste into the uncropped shape (0 outside the crop), undo the transpose."""
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape_cropped = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape_cropped) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(volume, shape_cropped, current_spacing,
                                                                  spacing_transposed)
    resampled = resampled.cpu().numpy() if isinstance(resampled, torch.Tensor) else np.asarray(resampled)
    full = np.zeros((volume.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    bbox = properties["bbox_used_for_cropping"]
    full[(slice(None), *[slice(lo, hi) for lo, hi in bbox])] = resampled
    return full.transpose([0, *[i + 1 for i in plans_manager.transpose_backward]])


def write_like_input(volume: np.ndarray, properties: dict, path: Path, dtype=np.float32, what: str = "maps") -> None:
    """``volume`` (in the input's array order) as an image with the input case's geometry, written atomically."""
    import SimpleITK as sitk

    stuff = properties.get("sitk_stuff")
    if stuff is None:
        raise NNDiffConfigError(f"{what} are written with SimpleITK's geometry; this dataset's images were read by "
                                f"another reader (plans 'image_reader_writer'), so no geometry is known")
    if len(stuff["spacing"]) == 2 and volume.ndim == 3:  # a 2D image was read as one slice
        volume = volume[0]
    image = sitk.GetImageFromArray(volume.astype(dtype))
    image.SetSpacing(stuff["spacing"])
    image.SetOrigin(stuff["origin"])
    image.SetDirection(stuff["direction"])
    name = path.name
    ending = name[name.index("."):] if "." in name else ""
    tmp = path.with_name(f".{name[:len(name) - len(ending)]}.tmp{os.getpid()}{ending}")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_model(model_folder: os.PathLike, folds: Optional[Sequence], checkpoint_name: str, device: torch.device,
               network_type: type, what: str, refusal: str):
    """nnU-Net's predictor holding the trained model(s) of ``model_folder`` (weights of each fold in
    ``list_of_parameters``), its network on ``device`` in eval mode; an NNDiffConfigError saying ``refusal`` when
    the network is not a ``network_type``. For second passes over whole cases (maps, samples)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), folds, checkpoint_name)
    network = predictor.network
    if not isinstance(network, network_type):
        kind = network_type.__name__.removesuffix("Network")
        raise NNDiffConfigError(f"{what}: {model_folder} is not a {kind} model (its network is "
                                f"{type(network).__name__}); {refusal}")
    network.to(device).eval()
    return predictor


def input_cases(predictor, input_folder: os.PathLike, what: str) -> list[tuple[str, list[str]]]:
    """(case, its channel files) for every case of ``input_folder`` in nnU-Net's ``{case}_{XXXX}`` layout."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    ending = predictor.dataset_json["file_ending"]
    files = create_lists_from_splitted_dataset_folder(str(input_folder), ending)
    if not files:
        raise NNDiffConfigError(f"{what}: no cases ending in {ending} in {input_folder}")
    return [(os.path.basename(f[0])[:-(len(ending) + 5)], f) for f in files]


def preprocess_case(predictor, case_files: list[str], device: torch.device) -> tuple[torch.Tensor, dict]:
    """One case through nnU-Net's preprocessing of the model's configuration: (data on ``device``, properties)."""
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    data, _, properties = cm.preprocessor_class(verbose=False).run_case(case_files, None, pm, cm,
                                                                        predictor.dataset_json)
    return torch.from_numpy(np.asarray(data, dtype=np.float32)).to(device), properties


def write_residual_maps(model_folder: os.PathLike, input_folder: os.PathLike, output_folder: os.PathLike,
                        folds: Optional[Sequence] = None, checkpoint_name: str = "checkpoint_final.pth",
                        device: torch.device = torch.device("cpu"), progress: bool = True) -> list[Path]:
    """``<output_folder>/residuals/<case>.nii.gz`` for every case of ``input_folder`` (nnU-Net's
    ``{case}_{XXXX}`` layout): the residual map r of the trained ReCoSeg model(s) in ``model_folder``, averaged
    over the folds, in the input image's geometry. Uses the same NNDIFF_* sampling settings as the prediction."""
    from .recoseg_network import ReCoSegNetwork

    predictor = load_model(model_folder, folds, checkpoint_name, device, ReCoSegNetwork, "--residuals",
                           "residual maps exist only for nnUNetTrainerReCoSeg*")
    network = predictor.network
    plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
    ending = predictor.dataset_json["file_ending"]
    cases = input_cases(predictor, input_folder, "--residuals")
    out_dir = Path(output_folder) / "residuals"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case, case_files in tqdm(cases, desc="residual maps", disable=not progress):
        data, properties = preprocess_case(predictor, case_files, device)
        total = None
        for params in predictor.list_of_parameters:
            network.load_state_dict(params)
            r = residual_of_case(network, data, configuration_manager.patch_size)
            total = r if total is None else total + r
        r = (total / len(predictor.list_of_parameters)).cpu().numpy()
        volume = revert_to_original_geometry(r, properties, plans_manager, configuration_manager)[0]
        path = out_dir / f"{case}{ending}"
        write_like_input(volume, properties, path, what="residual maps")
        t1ce = sitk_array(case_files[network.target])
        write_residual_png(t1ce, volume, out_dir / f"{case}.png", f"{case}: residual |synthetic T1ce - T1ce|")
        written.append(path)
    return written


def sitk_array(path) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def write_residual_png(t1ce: np.ndarray, residual: np.ndarray, path: Path, title: str) -> None:
    """Three panels through the axial slice with the largest residual: T1ce, r, and r over T1ce."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax(residual.reshape(residual.shape[0], -1).sum(1)))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    axes[0].imshow(t1ce[z], cmap="gray")
    axes[0].set_title(f"T1ce, axial {z}")
    im = axes[1].imshow(residual[z], cmap="magma")
    axes[1].set_title("residual r (z-score units)")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[2].imshow(t1ce[z], cmap="gray")
    axes[2].imshow(np.ma.masked_less(residual[z], np.percentile(residual, 95)), cmap="magma", alpha=0.7)
    axes[2].set_title("r above its 95th percentile")
    for a in axes:
        a.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
