"""ReCoSeg residual maps for whole cases: once after stage 1 for the training data, and as NIfTI beside a
prediction (``nndiff predict --residuals``).

The residual map r of a case is the synthesiser's T1ce, blended over the case with nnU-Net's tiling
(``whole_case.sliding_window``), against the real T1ce; for ``--residuals`` it is put back into the input image's
geometry (``whole_case.revert_to_original_geometry``) and written beside the prediction.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_path, write_text_atomic
from ..errors import NNDiffConfigError
from .whole_case import (input_cases, load_model, preprocess_case, revert_to_original_geometry, sitk_array,
                         sliding_window, write_like_input)

RESIDUAL_DTYPE = np.float16


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


def residual_file(folder: os.PathLike, identifier: str) -> Path:
    return Path(folder) / f"{identifier}.npy"


SOURCE_FILE = "source.txt"  # in the residuals folder: the fingerprint of the synthesiser and sampler behind the maps


def synthesis_fingerprint(synthesizers: torch.nn.Module | Sequence[torch.nn.Module], sampling) -> str:
    """SHA-1 of the synthesisers' weights (one module, or several in order: ReCoSeg's cross synthesisers) and the
    sampling options the residual maps are computed with: maps of the same fingerprint are interchangeable, maps of
    another are not."""
    h = hashlib.sha1(repr(sampling).encode())
    for synthesizer in [synthesizers] if isinstance(synthesizers, torch.nn.Module) else synthesizers:
        for name, tensor in sorted(synthesizer.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def discard_other_residuals(folder: os.PathLike, source: str) -> int:
    """Keep only residual maps of ``source`` (:func:`synthesis_fingerprint`) in ``folder``: when its
    ``source.txt`` names another source (or none, while maps are there), every ``<case>.npy`` is deleted and
    ``source`` written. An interrupted training resumed from a checkpoint before the end of the synthesis stage
    trains another synthesiser; its maps must not be mixed with the earlier one's. Returns the maps deleted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    named = folder / SOURCE_FILE
    if named.is_file() and named.read_text() == source:
        return 0
    stale = sorted(folder.glob("*.npy"))
    for f in stale:
        f.unlink()
    write_text_atomic(named, source)
    return len(stale)


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
        with atomic_path(residual_file(folder, identifier)) as tmp, open(tmp, "wb") as f:
            np.save(f, r.cpu().numpy().astype(RESIDUAL_DTYPE))
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


def write_residual_maps(model_folder: os.PathLike, input_folder: os.PathLike, output_folder: os.PathLike,
                        folds: Optional[Sequence] = None, checkpoint_name: str = "checkpoint_final.pth",
                        device: torch.device = torch.device("cpu"), progress: bool = True) -> list[Path]:
    """``<output_folder>/residuals/<case>.nii.gz`` for every case of ``input_folder`` (nnU-Net's
    ``{case}_{XXXX}`` layout): the residual map r of the trained ReCoSeg model(s) in ``model_folder``, averaged
    over the folds, in the input image's geometry. Uses the same NNDIFF_* sampling settings as the prediction."""
    # a ReCoSeg network is known by its class attribute, so that this module needs no import of recoseg_network
    # (which imports this one for case_residual)
    predictor = load_model(model_folder, folds, checkpoint_name, device, torch.nn.Module, "--residuals", "")
    network = predictor.network
    if not getattr(type(network), "whole_case_residual", False):
        raise NNDiffConfigError(f"--residuals: {model_folder} is not a ReCoSeg model (its network is "
                                f"{type(network).__name__}); residual maps exist only for nnUNetTrainerReCoSeg*")
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
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
