"""DDMD's discrepancy maps and scores for new cases, next to nnU-Net's predictions (a post-step, like the
uncertainty maps: ``nnUNetv2_predict`` has no hook for extra outputs).

For every case of ``input_folder`` (nnU-Net's raw layout, ``<case>_XXXX<ending>``):
1. nnU-Net's own preprocessing of the trained configuration (``preprocessor_class(...).run_case``): transpose,
   crop to the non-zero bounding box, resample, normalise — exactly what the predictor does;
2. the autoencoders of each fold slide over it in nnU-Net's windows (``compute_steps_for_sliding_window``, step
   0.5, Gaussian weighting ``compute_gaussian``; 2d configurations slice by slice, and so do 2D autoencoders inside
   each 3D window, ``ae_input = "slices"``): the inter-discrepancy X (DDMD eq. 12) and intra-discrepancy Y
   (eq. 13), per modality and over all of them; folds are averaged;
3. the scores (§3.2: "the mean values of X and Y ... the inter-discrepancy score and intra-discrepancy
   score"), over the preprocessed crop — the brain's bounding box, so air outside the head does not dilute
   them — per case, and per modality ("considering the c-th modality in Eq. (12) and (13)");
4. X (and, with ``intra_maps``, Y) back in the input image's geometry: resampled to the cropped shape, pasted
   into the uncropped shape (0 outside nnU-Net's crop), transposed back, spacing/origin/direction of the input.

Written: ``<output>/discrepancy/<case>_X<ending>`` (``_Y`` too with ``intra_maps``) and
``<output>/discrepancy/scores.csv`` (case, inter, intra, inter_<channel>, intra_<channel>…). Every file is written
to a temporary name and renamed, so an interrupted run leaves no half-written file.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_path
from ..errors import NNDiffCheckpointError, NNDiffError
from .whole_case import revert_to_original_geometry, sliding_window, write_like_input


def _load_networks(model_folder: Path, folds: Sequence, checkpoint_name: str, device: torch.device,
                   trainers: Mapping[str, type]):
    """(plans manager, configuration manager, dataset.json, the DDMD network of each fold in eval mode on
    ``device``); each network is built by the class that wrote its checkpoint (looked up by name in ``trainers``)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from .ddmd_network import DDMDNetwork

    dataset_json = load_json(str(model_folder / "dataset.json"))
    plans_manager = PlansManager(load_json(str(model_folder / "plans.json")))
    networks, configuration, trainer_name = [], None, None
    for fold in folds:
        f = str(fold) if str(fold) == "all" else int(fold)
        path = model_folder / f"fold_{f}" / checkpoint_name
        if not path.is_file():
            raise NNDiffError(f"{path} does not exist (train fold {f} first, or pick another -f / -chk)")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        trainer_name = ckpt["trainer_name"]
        configuration = ckpt["init_args"]["configuration"]
        cls = trainers.get(trainer_name)
        if cls is None or getattr(cls, "head", None) != "ddmd":
            raise NNDiffCheckpointError(f"{path} was written by {trainer_name!r}, not by a DDMD trainer: only DDMD "
                                        f"has discrepancy maps")
        cm = plans_manager.get_configuration(configuration)
        num_in = determine_num_input_channels(plans_manager, cm, dataset_json)
        num_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        net: DDMDNetwork = cls.build_network_architecture(plans_manager, cm, num_in, num_out, False)
        net.load_state_dict(ckpt["network_weights"])
        if net.ae1 is None or net.ae2 is None:
            raise NNDiffError(f"{trainer_name} has no {'autoencoders (DDMD-mini)' if net.ae2 is None else 'AE-1'}; "
                              f"discrepancy maps need AE-1 and AE-2")
        untrained = [n for n, m in (("AE-1", net.ae1), ("AE-2", net.ae2)) if m is not None and int(m.updates) == 0]
        if untrained:
            raise NNDiffError(f"{path}: {' and '.join(untrained)} never trained; its discrepancy maps would mean "
                              f"nothing")
        networks.append(net.to(device).eval())
    return plans_manager, plans_manager.get_configuration(configuration), dataset_json, networks


@torch.no_grad()
def discrepancy_in_preprocessed_space(networks, data: torch.Tensor, patch_size: Sequence[int],
                                      tile_step_size: float = 0.5) -> torch.Tensor:
    """Sliding-window DDMD eqs. 12–13 on one preprocessed case ``data`` (C, *spatial): returns (2 + 2C, *spatial)
    float32 = [X, Y, X_1..X_C, Y_1..Y_C] (X_c, Y_c: per modality), Gaussian-weighted over nnU-Net's windows,
    averaged over the networks (folds)."""
    device = next(networks[0].parameters()).device

    def window_maps(window: torch.Tensor) -> torch.Tensor:
        acc = 0.0
        for net in networks:
            xc, yc = net.discrepancy(window.to(device, torch.float32), per_channel=True)
            # eq. 12: X = mean over modalities of X_c; eq. 13: Y = sqrt(mean over modalities of Y_c²)
            x, y = xc.mean(1, keepdim=True), (yc ** 2).mean(1, keepdim=True).sqrt()
            acc = acc + torch.cat([x, y, xc, yc], 1).float().cpu()
        return acc / len(networks)

    return sliding_window(window_maps, data.cpu().float(), patch_size, 2 + 2 * data.shape[0], tile_step_size)


def _write_image(arr: np.ndarray, properties: dict, path: Path) -> None:
    write_like_input(arr, properties, path, what="discrepancy maps")


def _write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_discrepancy_maps(model_folder, input_folder, output_folder, folds: Optional[Iterable] = None,
                           checkpoint_name: str = "checkpoint_final.pth", device: str | torch.device = "cpu",
                           intra_maps: bool = False, tile_step_size: float = 0.5, progress: bool = True,
                           cases: Optional[Sequence[str]] = None, *, trainers: Mapping[str, type]) -> list[Path]:
    """Write DDMD's X maps (and Y maps with ``intra_maps``) and ``scores.csv`` for the cases of ``input_folder``
    into ``<output_folder>/discrepancy/`` (see the module docstring); returns the files written. ``folds`` None:
    every fold_* of ``model_folder`` that has ``checkpoint_name`` (as nnUNetv2_predict without -f).

    ``trainers``: the trainer classes by name (``nnunet_diffusion.trainers.TRAINERS``), whose
    ``build_network_architecture`` builds the network of each checkpoint. The caller passes them: the trainers
    build this package's inference networks, so ``inference/`` never imports ``trainers/``
    (tests/test_architecture.py)."""
    from nnunetv2.utilities.utils import (
        create_lists_from_splitted_dataset_folder,
        get_identifiers_from_splitted_dataset_folder,
    )

    model_folder, input_folder, output_folder = Path(model_folder), Path(input_folder), Path(output_folder)
    if not input_folder.is_dir():
        raise NNDiffError(f"input folder {input_folder} does not exist")
    device = torch.device(device)
    if folds is None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        folds = nnUNetPredictor.auto_detect_available_folds(str(model_folder), checkpoint_name)
        if not folds:
            raise NNDiffError(f"{model_folder}: no fold_*/{checkpoint_name}")
    plans_manager, cm, dataset_json, networks = _load_networks(model_folder, list(folds), checkpoint_name, device,
                                                               trainers)
    ending = dataset_json["file_ending"]
    ids = sorted(get_identifiers_from_splitted_dataset_folder(str(input_folder), ending))
    if cases is not None:
        missing = sorted(set(cases) - set(ids))
        if missing:
            raise NNDiffError(f"{input_folder}: no images for case(s) {missing}")
        ids = [i for i in ids if i in set(cases)]
    if not ids:
        raise NNDiffError(f"{input_folder}: no images named <case>_XXXX{ending}")
    files = create_lists_from_splitted_dataset_folder(str(input_folder), ending, ids, num_processes=1)
    expected = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    channel_names = [re.sub(r"[^A-Za-z0-9]+", "_", str(dataset_json["channel_names"][k])) for k in
                     sorted(dataset_json["channel_names"], key=int)] if "channel_names" in dataset_json else \
        [str(i) for i in range(expected)]
    out_dir = output_folder / "discrepancy"
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocessor = cm.preprocessor_class(verbose=False)
    written, rows = [], []
    for case, case_files in tqdm(list(zip(ids, files)), desc="DDMD discrepancy maps", disable=not progress):
        if expected and len(case_files) != expected:
            raise NNDiffError(f"case {case}: {len(case_files)} channel file(s) in {input_folder}, the model "
                              f"expects {expected} ({', '.join(channel_names)})")
        data, _, properties = preprocessor.run_case(case_files, None, plans_manager, cm, dataset_json)
        maps = discrepancy_in_preprocessed_space(networks, torch.from_numpy(np.asarray(data, np.float32)),
                                                 cm.patch_size, tile_step_size)
        c = len(channel_names)
        row = {"case": case, "inter": float(maps[0].mean()), "intra": float(maps[1].mean())}
        row.update({f"inter_{n}": float(maps[2 + i].mean()) for i, n in enumerate(channel_names)})
        row.update({f"intra_{n}": float(maps[2 + c + i].mean()) for i, n in enumerate(channel_names)})
        rows.append(row)
        keep = maps[:2] if intra_maps else maps[:1]
        original = revert_to_original_geometry(keep.numpy(), properties, plans_manager, cm)
        for arr, suffix in zip(original, ("X", "Y")):
            path = out_dir / f"{case}_{suffix}{ending}"
            _write_image(arr, properties, path)
            written.append(path)
    scores = out_dir / "scores.csv"
    _write_csv(rows, scores)
    written.append(scores)
    return written
