"""Second passes over whole cases, for the maps and samples nnU-Net's predictor has no output for (ReCoSeg's
residual maps, DDMD's discrepancy maps, MoDiff's samples): load a trained model, list and preprocess the input
cases, slide a window function over a case, and write a preprocessed-space map in the input image's geometry.

nnU-Net's predictor returns segmentation logits only and has no hook for extra per-case outputs, so these passes
use the same tiling nnU-Net uses (``compute_steps_for_sliding_window``, Gaussian weights from ``compute_gaussian``,
step 0.5, the planned patch) and put a map back into the input image's geometry the way nnU-Net exports a
prediction (resample → revert crop → revert transpose).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from ..atomic import atomic_path
from ..errors import NNDiffConfigError


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
    ending = path.name[path.name.index("."):] if "." in path.name else ""
    with atomic_path(path, suffix=ending) as tmp:  # SimpleITK picks the format by the ending
        sitk.WriteImage(image, str(tmp), True)


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


def sitk_array(path) -> np.ndarray:
    """An image file as a float32 array in SimpleITK's axis order (the input images' array order)."""
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
