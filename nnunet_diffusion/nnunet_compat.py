"""Every private or version-specific internal of nnU-Net (nnunetv2, written against 2.8.1) that this package
touches, behind one small named function each. Nothing else in the package reaches into nnU-Net's private names:
when a release renames one, this module is the one place to change, and ``tests/test_nnunet_compat.py`` (one
test per name) says which name, which function of this module uses it and what for.

What is here, and why nnU-Net gives no public way to do it:

- the trainer's logger (``register_log_key``, ``overwrite_logged_value``): nnU-Net's ``LocalLogger`` logs only
  keys its dict ``my_fantastic_logging`` already holds, and has no method to add one or to correct a value;
- the best-checkpoint tracker ``_best_ema`` (``best_ema``, ``set_best_ema``): nnU-Net's ``on_epoch_end`` writes
  checkpoint_best.pth whenever the EMA pseudo Dice beats it; a head whose first stage cannot segment resets it;
- the checkpoint dict of nnU-Net's ``save_checkpoint`` (``checkpoint_dict``; our trainers add their own keys to
  it, and ``nnUNetv2_predict`` and ``--c`` read nnU-Net's) and a checkpoint written after ``on_epoch_end`` has
  already counted the epoch (``save_checkpoint_after_epoch_end``);
- shutting down a multi-threaded data loader (``finish_dataloader``: batchgenerators' ``_finish``, as nnU-Net's
  ``on_train_end`` does);
- whether nnU-Net would torch.compile (``nnunet_would_compile``: ``nnUNetTrainer._do_i_compile``);
- the network inside nnU-Net's DDP / torch.compile wrappers (``unwrap_network``);
- a case preprocessed and stored as nnU-Net's preprocessor stores it (``save_preprocessed_case``);
- the predictor hook that lets a network replace the whole case before nnU-Net's sliding window tiles it
  (``install_case_input_hook``; ReCoSeg's residual map of the whole case);
- the trainer-class search of one ``nnUNet_extTrainer`` folder (``ext_trainer_folders``,
  ``find_class_in_folder``).

Checkpoint keys that other modules read (``"network_weights"``, ``"init_args"``, ``"trainer_name"``,
``"current_epoch"``, ``"logging"``) are the keys of :data:`NNUNET_CHECKPOINT_KEYS`, checked by the tests too.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import nn

# the keys of nnU-Net 2.8.1's checkpoint dict (nnUNetTrainer.save_checkpoint), in its order
NNUNET_CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                          "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes")

# the method a network defines to replace the case nnU-Net's predictor is about to tile (install_case_input_hook)
CASE_INPUT_METHOD = "nnunet_predictor_case_input"
_HOOK_MARK = "_nndiff_case_input_hook"


def nnunet_version() -> str:
    """The installed nnunetv2's version (for messages)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        return "(unknown version)"


# ---------------------------------------------------------------------------------------------- logger
def _logged_lists(trainer) -> dict:
    return trainer.logger.local_logger.my_fantastic_logging


def logged_values(trainer, key: str) -> list:
    """The values nnU-Net's logger holds for ``key``, one per epoch logged so far (a copy)."""
    return list(_logged_lists(trainer).get(key, []))


def register_log_key(trainer, key: str) -> None:
    """Let ``trainer.logger.log(key, value, epoch)`` accept ``key`` (one value per epoch, saved in the checkpoint's
    ``logging`` and restored on ``--c``): nnU-Net's logger asserts that a key is already in its dict."""
    _logged_lists(trainer)[key] = []


def overwrite_logged_value(trainer, key: str, epoch: int, value) -> None:
    """Replace the value of ``key`` logged for ``epoch`` (nnU-Net's ``log`` would print a warning and do the same)."""
    _logged_lists(trainer)[key][epoch] = value


# ---------------------------------------------------------------------------------------------- best checkpoint
def best_ema(trainer) -> Optional[float]:
    """The EMA pseudo Dice of the trainer's checkpoint_best.pth (None before the first epoch's)."""
    return trainer._best_ema


def set_best_ema(trainer, value: Optional[float]) -> None:
    """Set what nnU-Net's ``on_epoch_end`` compares the EMA pseudo Dice with before writing checkpoint_best.pth:
    None makes the next epoch's the best, ``float("inf")`` writes none."""
    trainer._best_ema = value


# ---------------------------------------------------------------------------------------------- checkpoints
def unwrap_network(network: nn.Module) -> nn.Module:
    """The network inside nnU-Net's wrappers: DDP (``.module``) and torch.compile (``OptimizedModule._orig_mod``),
    as nnU-Net's ``save_checkpoint`` and predictor unwrap it."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def checkpoint_dict(trainer) -> dict:
    """nnU-Net 2.8.1's checkpoint dict of ``trainer`` (the keys and values of ``nnUNetTrainer.save_checkpoint``,
    :data:`NNUNET_CHECKPOINT_KEYS`), so that ``nnUNetv2_predict``, ``--c`` and ``--val`` read a checkpoint written by
    our trainers; a trainer adds its own keys to the dict before saving it. ``current_epoch`` is the number of epochs
    done (nnU-Net's ``current_epoch + 1``)."""
    return {
        "network_weights": unwrap_network(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": best_ema(trainer),
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }


def save_checkpoint_after_epoch_end(trainer, filename: str) -> None:
    """``trainer.save_checkpoint(filename)`` after nnU-Net's ``on_epoch_end``, which has already counted the epoch
    (``current_epoch += 1``): the counter is stepped back around the save, as nnU-Net's own ``on_train_end`` does for
    checkpoint_final.pth, so that the checkpoint records the epochs done, not one more."""
    trainer.current_epoch -= 1
    try:
        trainer.save_checkpoint(filename)
    finally:
        trainer.current_epoch += 1


# ---------------------------------------------------------------------------------------------- data loading
def finish_dataloader(loader) -> None:
    """Stop the worker processes of one of nnU-Net's multi-threaded data loaders (batchgenerators'
    ``MultiThreadedAugmenter`` / ``NonDetMultiThreadedAugmenter``), as nnU-Net's ``on_train_end`` does; any other
    loader (a single-threaded one, None) is left alone."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    if isinstance(loader, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
        loader._finish()


def save_preprocessed_case(dataset_class: type, configuration_manager, data, seg, properties, path: str) -> None:
    """Store a preprocessed case as nnU-Net's ``DefaultPreprocessor.run_case_save`` does (float32 data, int16 seg;
    blosc2 chunks and blocks for the planned patch with the blosc2 dataset class), with ``dataset_class``'s
    ``save_case``."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    data, seg = data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False)
    if issubclass(dataset_class, nnUNetDatasetBlosc2):
        patch = tuple(configuration_manager.patch_size)
        blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        dataset_class.save_case(data, seg, properties, path, chunks=chunks, blocks=blocks,
                                chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    else:
        dataset_class.save_case(data, seg, properties, path)


# ---------------------------------------------------------------------------------------------- data
def without_cascade_corruption(compose):
    """nnU-Net's training transforms (a batchgeneratorsv2 ``ComposeTransforms``) without the cascade's corruption of
    the previous stage's one-hot channels (``RandomTransform`` around ``ApplyRandomBinaryOperatorTransform`` and
    ``RemoveRandomConnectedComponentFromOneHotEncodingTransform``); ``MoveSegAsOneHotToDataTransform`` stays."""
    from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
    from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
        RemoveRandomConnectedComponentFromOneHotEncodingTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    corrupting = (ApplyRandomBinaryOperatorTransform, RemoveRandomConnectedComponentFromOneHotEncodingTransform)
    return ComposeTransforms([t for t in compose.transforms
                              if not isinstance(getattr(t, "transform", None), corrupting)])


def dataset_class_of(preprocessed_folder: str) -> type:
    """The dataset class nnU-Net reads ``preprocessed_folder`` with (blosc2 or numpy files)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    return infer_dataset_class(preprocessed_folder)


# ---------------------------------------------------------------------------------------------- compilation
def nnunet_would_compile(trainer) -> bool:
    """nnU-Net's own decision whether to torch.compile the network (``nnUNetTrainer._do_i_compile``: CUDA and
    ``nnUNet_compile`` not off), for a trainer that overrides the method to compile parts itself."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return nnUNetTrainer._do_i_compile(trainer)


# ---------------------------------------------------------------------------------------------- prediction
def install_case_input_hook() -> None:
    """Let a network replace the whole case before nnU-Net's predictor tiles it.

    nnU-Net's ``nnUNetPredictor.predict_sliding_window_return_logits(input_image)`` tiles a whole preprocessed case
    and calls the network on each window, so a network never sees the case. After this call, when the predictor's
    network (inside DDP / torch.compile) has a method ``nnunet_predictor_case_input`` (:data:`CASE_INPUT_METHOD`),
    ``network.nnunet_predictor_case_input(input_image, device, patch_size, tile_step_size)`` (the predictor's device,
    planned patch and step) returns what is tiled instead; for every other network the predictor runs nnU-Net's own
    method with the same arguments, unchanged. Idempotent. Called by a network that needs it when it is built
    (``ReCoSegNetwork.__init__``), never when this package is imported, so that importing it leaves nnU-Net's
    predictor as it is for every other trainer."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    original = nnUNetPredictor.predict_sliding_window_return_logits
    if getattr(original, _HOOK_MARK, False):
        return

    @functools.wraps(original)
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        case_input = getattr(unwrap_network(self.network), CASE_INPUT_METHOD, None)
        if case_input is not None:
            input_image = case_input(input_image, torch.device(self.device), self.configuration_manager.patch_size,
                                     self.tile_step_size)
        return original(self, input_image)

    setattr(predict_sliding_window_return_logits, _HOOK_MARK, True)
    nnUNetPredictor.predict_sliding_window_return_logits = predict_sliding_window_return_logits


def case_input_hook_installed() -> bool:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    return bool(getattr(nnUNetPredictor.predict_sliding_window_return_logits, _HOOK_MARK, False))


# ---------------------------------------------------------------------------------------------- trainer lookup
def ext_trainer_folders() -> list[str]:
    """The folders of ``nnUNet_extTrainer``, in nnU-Net's search order (``recursive_find_trainer_class_by_name``
    searches them one after another and stops at the first that has the class)."""
    value = os.environ.get("nnUNet_extTrainer") or ""
    return [p for p in value.split(os.pathsep) if p.strip() and os.path.exists(p)]


def find_class_in_folder(folder: str, name: str):
    """The class ``name`` as nnU-Net's lookup would find it in one ``nnUNet_extTrainer`` folder (every module of
    the folder and its packages imported under its bare name, then evicted from ``sys.modules``), or None."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    return recursive_find_python_class(folder, name, None, base_folder=folder, verbose=False,
                                       cleanup_imports_from_base_folder=True)
