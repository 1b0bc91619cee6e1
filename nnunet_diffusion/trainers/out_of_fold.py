"""Out-of-fold predictions of a trained nnU-Net baseline: for every training case of fold f, the prediction of the
fold model that did NOT train on it (the fold whose validation set holds the case), in nnU-Net's preprocessed space.

This is what nnU-Net's cascade gives its second stage (``3d_cascade_fullres`` trains on ``predicted_next_stage/``,
the first stage's predictions of each fold's validation cases), and what NNDM's refiner needs to learn the errors
nnU-Net makes on cases it has not seen (issue 32): a backbone that has fitted its own training cases makes almost no
error there, so a refiner trained on its in-sample residuals learns ê ≈ 0.

The predictions are written as nnU-Net writes ``predicted_next_stage`` (``export_prediction.resample_and_save``:
the segmentation of the case's preprocessed shape, in the dataset class's own format), into
``<baseline model folder>/predicted_out_of_fold/<configuration>/``, so that nnU-Net's own cascade loader
(``folder_with_segs_from_previous_stage``) crops and augments each with its patch, and its cascade transforms add it
to the data as one-hot channels (and, as an option, corrupt it at random).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from ..atomic import write_text_atomic
from ..errors import NNDiffConfigError

FOLDER = "predicted_out_of_fold"
SOURCE_FILE = "source.json"  # {case: the fingerprint of the fold checkpoint that predicted it}


def oof_folder(baseline_folder: str | os.PathLike, configuration: str) -> Path:
    """Where the out-of-fold predictions of the baseline in ``baseline_folder`` (its model folder,
    ``<trainer>__<plans>__<configuration>``) are kept."""
    return Path(baseline_folder) / FOLDER / configuration


def out_of_fold_sources(splits: list[dict], fold: int | str) -> dict[str, int]:
    """{case: the fold whose model did not train on it} for every case of ``fold`` in nnU-Net's ``splits``
    (splits_final.json): its training cases (what the refiner trains on, each predicted by another fold's model) and
    its validation cases (predicted by the baseline's own fold ``fold``, which held them out; nnU-Net's loader reads a
    map for every case it loads, online validation included). Fold "all" (nnU-Net's training on every case) takes
    every case, each predicted by the fold that held it out. A case that is in no fold's validation set, or that
    the fold meant to predict it trained on, is an error: its prediction would not be out of fold."""
    if fold != "all" and (not isinstance(fold, int) or not 0 <= fold < len(splits)):
        raise NNDiffConfigError(f"fold {fold} is not in splits_final.json (it has {len(splits)} folds)")
    held_out_by = {}
    for g, split in enumerate(splits):
        for case in split["val"]:
            if case in held_out_by:
                raise NNDiffConfigError(f"splits_final.json: case {case} is in the validation sets of folds "
                                        f"{held_out_by[case]} and {g}")
            held_out_by[case] = g
    if fold == "all":
        for case, g in held_out_by.items():
            if case in splits[g]["train"]:
                raise NNDiffConfigError(f"splits_final.json: case {case} is both trained on and held out by fold "
                                        f"{g}")
        return held_out_by
    out = {}
    for case in splits[fold]["train"]:
        g = held_out_by.get(case)
        if g is None:
            raise NNDiffConfigError(f"splits_final.json: training case {case} of fold {fold} is in no fold's "
                                    "validation set, so no baseline fold model predicts it out of fold")
        if case in splits[g]["train"] or g == fold:
            raise NNDiffConfigError(f"splits_final.json: case {case} is both trained on and held out by fold {g}")
        out[case] = g
    for case in splits[fold]["val"]:
        if case in splits[fold]["train"]:
            raise NNDiffConfigError(f"splits_final.json: case {case} is both trained on and held out by fold {fold}")
        out[case] = fold
    return out


def fold_checkpoint(baseline_folder: str | os.PathLike, fold: int, checkpoint: str = "checkpoint_final.pth") -> Path:
    return Path(baseline_folder) / f"fold_{fold}" / checkpoint


def missing_folds(baseline_folder: str | os.PathLike, folds) -> list[int]:
    return sorted({g for g in folds if not fold_checkpoint(baseline_folder, g).is_file()})


def require_folds(baseline_folder: str | os.PathLike, folds, dataset: str, configuration: str, plans: str) -> None:
    """A one-line error naming the first untrained fold of the baseline and the command that trains it."""
    missing = missing_folds(baseline_folder, folds)
    if missing:
        trainer = Path(baseline_folder).name.split("__")[0]
        g = missing[0]
        raise NNDiffConfigError(
            f"out-of-fold residuals need fold {g} of the baseline {trainer} (no {fold_checkpoint(baseline_folder, g)}"
            + (f"; folds {missing} are missing" if len(missing) > 1 else "") + f"): train it with `nnUNetv2_train "
            f"{dataset} {configuration} {g} -tr {trainer} -p {plans} --npz`")


def fingerprint(path: Path) -> str:
    """Which checkpoint predicted a map: its path, size and modification time (a retrained fold differs)."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime_ns)}"


def stale_cases(folder: Path, wanted: dict[str, str], exists: Callable[[str], bool]) -> list[str]:
    """The cases of ``wanted`` ({case: fingerprint of the checkpoint that must predict it}) whose map is missing or
    was made by another checkpoint, according to ``folder``'s source file."""
    recorded = json.loads((folder / SOURCE_FILE).read_text()) if (folder / SOURCE_FILE).is_file() else {}
    return sorted(c for c, fp in wanted.items() if recorded.get(c) != fp or not exists(c))


def ensure_oof_predictions(baseline_folder: str | os.PathLike, preprocessed_folder: str, splits: list[dict],
                           fold: int, plans_manager, configuration: str, dataset_json: dict, dataset_class,
                           device, log: Callable[[str], None] = print,
                           predictor_factory: Optional[Callable] = None) -> Path:
    """Write the out-of-fold prediction of every training case of ``fold`` that is missing or stale into
    :func:`oof_folder` and return that folder. Each fold model of the baseline predicts its own validation cases
    from nnU-Net's preprocessed data with nnU-Net's predictor (sliding window, Gaussian, mirroring, as its final
    validation does); each map is written under a temporary name and renamed, so an interruption leaves no
    half-written map."""
    import torch
    from nnunetv2.inference.export_prediction import resample_and_save

    sources = out_of_fold_sources(splits, fold)
    pm = plans_manager
    cm = pm.get_configuration(configuration)
    require_folds(baseline_folder, set(sources.values()), pm.dataset_name, configuration, pm.plans_name)
    folder = oof_folder(baseline_folder, configuration)
    folder.mkdir(parents=True, exist_ok=True)
    ext = seg_extension(dataset_class)
    wanted = {c: fingerprint(fold_checkpoint(baseline_folder, g)) for c, g in sources.items()}
    todo = stale_cases(folder, wanted, lambda c: (folder / f"{c}{ext}").is_file())
    if not todo:
        return folder
    log(f"out-of-fold predictions of {len(todo)} case(s) of fold {fold}, each by the baseline fold that held it out "
        f"-> {folder}")
    make = predictor_factory or _predictor
    recorded = json.loads((folder / SOURCE_FILE).read_text()) if (folder / SOURCE_FILE).is_file() else {}
    for g in sorted({sources[c] for c in todo}):
        predictor = make(baseline_folder, g, device)
        cases = [c for c in todo if sources[c] == g]
        reader = dataset_class(preprocessed_folder, cases)
        for case in cases:
            data, _, _, properties = reader.load_case(case)
            with torch.no_grad():
                logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data[:]))
            tmp = folder / f".partial_{case}"
            resample_and_save(logits, data.shape[1:], str(tmp), pm, cm, properties, dataset_json, 1, dataset_class)
            os.replace(folder / f".partial_{case}{ext}", folder / f"{case}{ext}")
            recorded[case] = wanted[case]
            write_text_atomic(folder / SOURCE_FILE, json.dumps(recorded, indent=1, sort_keys=True))
        log(f"  fold {g}: {len(cases)} case(s)")
    return folder


def seg_extension(dataset_class) -> str:
    """The file ending nnU-Net's cascade loader reads a previous-stage segmentation from, for ``dataset_class``."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    return ".b2nd" if issubclass(dataset_class, nnUNetDatasetBlosc2) else ".npz"


def _predictor(baseline_folder, fold: int, device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    p = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(baseline_folder), (fold,), "checkpoint_final.pth")
    return p


def y_hat_from_onehot(onehot, foreground_labels, regions, has_regions: bool):
    """ŷ in the layout of the network's outputs (what NNDM's refiner takes as ŷ_0) from nnU-Net's cascade channels
    (``MoveSegAsOneHotToDataTransform``: one channel per foreground label, in ``foreground_labels`` order): per region
    the union of its labels' channels; for label outputs, background first (1 where no label is set)."""
    import torch
    index = {int(label): i for i, label in enumerate(foreground_labels)}
    if has_regions:
        chans = []
        for region in regions:
            labels = [region] if isinstance(region, int) else list(region)
            chans.append(torch.clamp(sum(onehot[:, index[int(lb)]] for lb in labels), 0, 1))
        return torch.stack(chans, 1).float()
    background = torch.clamp(1 - onehot.sum(1, keepdim=True), 0, 1)
    return torch.cat([background, onehot], 1).float()
