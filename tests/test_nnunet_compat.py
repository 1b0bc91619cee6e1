"""One test per private or version-specific name of nnU-Net that ``nnunet_diffusion.nnunet_compat`` touches: each
fails with "nnU-Net <version> renamed/removed <name>, used by nnunet_compat.<function> for <what>" on an nnU-Net
that no longer has it, instead of a training that breaks later, or silently (issue 35). Also: importing this package
leaves nnU-Net's predictor as it is, and the predictor hook ReCoSeg installs leaves every other network to nnU-Net's
own method."""
import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import make_trainer
from nnunet_diffusion import nnunet_compat

VERSION = nnunet_compat.nnunet_version()


def fail_unless(ok, name: str, function: str, what: str) -> None:
    """Fail (pytest.fail) naming the nnU-Net internal, the compat function that uses it and what for, unless ``ok``."""
    if not ok:
        pytest.fail(f"nnU-Net {VERSION} renamed/removed {name}, used by nnunet_compat.{function} for {what}",
                    pytrace=False)


def source(fn) -> str:
    return inspect.getsource(fn)


@pytest.fixture(scope="module")
def trainer(planned):
    """An initialised nnUNetTrainer (CPU) on the tests' planned dataset, under a class name of its own so that its
    output folder is nobody else's."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_compatprobe(nnUNetTrainer):
        pass

    with pytest.MonkeyPatch.context() as mp:
        for k, v in planned.env.items():
            if k.startswith("nnUNet_"):
                mp.setenv(k, v)
        tr = make_trainer(planned, nnUNetTrainer_compatprobe, 0)
        tr.initialize()
        yield tr


# ---------------------------------------------------------------------------------------------- logger
def test_logger_dict_my_fantastic_logging(trainer):
    local = getattr(trainer.logger, "local_logger", None)
    fail_unless(local is not None, "nnUNetTrainer.logger.local_logger", "register_log_key",
            "adding our per-epoch log keys (stages, per-loss curves)")
    logged = getattr(local, "my_fantastic_logging", None)
    fail_unless(isinstance(logged, dict) and "ema_fg_dice" in logged, "LocalLogger.my_fantastic_logging",
            "register_log_key / overwrite_logged_value", "adding log keys and restarting ReCoSeg's EMA pseudo Dice")
    with pytest.raises(AssertionError):  # what register_log_key is for: nnU-Net logs registered keys only
        trainer.logger.log("nndiff_probe", 1.0, 0)
    nnunet_compat.register_log_key(trainer, "nndiff_probe")
    trainer.logger.log("nndiff_probe", 1.0, 0)
    nnunet_compat.overwrite_logged_value(trainer, "nndiff_probe", 0, 2.0)
    assert trainer.logger.get_value("nndiff_probe", 0) == 2.0
    assert "nndiff_probe" in trainer.logger.get_checkpoint()  # saved with the checkpoint, restored on --c


# ---------------------------------------------------------------------------------------------- best checkpoint
def test_best_ema(trainer):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    fail_unless(hasattr(trainer, "_best_ema") and "self._best_ema" in source(nnUNetTrainer.on_epoch_end),
            "nnUNetTrainer._best_ema", "best_ema / set_best_ema",
            "resetting checkpoint_best.pth's EMA pseudo Dice when a head's segmenter starts training")
    nnunet_compat.set_best_ema(trainer, float("inf"))
    assert nnunet_compat.best_ema(trainer) == float("inf")
    nnunet_compat.set_best_ema(trainer, None)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_dict_is_nnunets(trainer, tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    saved = {}
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: saved.update(obj))
    trainer.current_epoch = 4
    nnUNetTrainer.save_checkpoint(trainer, str(tmp_path / "c.pth"))
    theirs, ours = saved, nnunet_compat.checkpoint_dict(trainer)
    for key in nnunet_compat.NNUNET_CHECKPOINT_KEYS:
        fail_unless(key in theirs, f"the checkpoint key {key!r} of nnUNetTrainer.save_checkpoint", "checkpoint_dict",
                "checkpoints that nnUNetv2_predict, --c and --val read")
    added = [k for k in theirs if k not in nnunet_compat.NNUNET_CHECKPOINT_KEYS]
    assert not added, (f"nnU-Net {VERSION} added checkpoint key(s) {added} that nnunet_compat.checkpoint_dict does "
                       f"not write")
    assert list(ours) == list(theirs)
    for key in ("_best_ema", "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
                "grad_scaler_state"):
        assert ours[key] == theirs[key], key
    assert ours["current_epoch"] == 5  # epochs done: save_checkpoint_after_epoch_end relies on the + 1
    assert ours["network_weights"].keys() == theirs["network_weights"].keys()
    assert ours["logging"].keys() == theirs["logging"].keys()
    assert ours["optimizer_state"].keys() == theirs["optimizer_state"].keys()


def test_on_epoch_end_counts_the_epoch():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    fail_unless("self.current_epoch += 1" in source(nnUNetTrainer.on_epoch_end),
            "the epoch count (current_epoch += 1) at the end of nnUNetTrainer.on_epoch_end",
            "save_checkpoint_after_epoch_end", "ReCoSeg's checkpoint at the end of its synthesis stage")


def test_unwrap_network_orig_mod():
    from torch._dynamo import OptimizedModule
    net = torch.nn.Linear(2, 2)
    compiled = torch.compile(net)
    ok = isinstance(compiled, OptimizedModule) and getattr(compiled, "_orig_mod", None) is net
    if not ok:
        pytest.fail(f"torch {torch.__version__} renamed/removed OptimizedModule._orig_mod, used by "
                    f"nnunet_compat.unwrap_network for the network inside torch.compile", pytrace=False)
    assert nnunet_compat.unwrap_network(compiled) is net and nnunet_compat.unwrap_network(net) is net


# ---------------------------------------------------------------------------------------------- data loading
def test_dataloader_finish():
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    for cls in (MultiThreadedAugmenter, NonDetMultiThreadedAugmenter):
        fail_unless(callable(getattr(cls, "_finish", None)), f"batchgenerators' {cls.__name__}._finish",
                "finish_dataloader", "stopping ReCoSeg's stage-1 data loaders before stage 2's")
    nnunet_compat.finish_dataloader(None)  # any other loader is left alone


def test_preprocessed_case_storage_and_dataset_classes(tmp_path):
    """``save_preprocessed_case`` (ReCoSeg's unlabelled cases) and the dataset-class interface our subclasses
    rely on (``recoseg.with_extra_cases``, ``recoseg_residuals.wrap_dataset_class``): ``__init__(folder,
    identifiers, folder_with_segs_from_previous_stage)`` and ``load_case`` → (data, seg, seg_prev, properties)."""
    try:
        from nnunetv2.training.dataloading.nnunet_dataset import (comp_blosc2_params, nnUNetBaseDataset,
                                                                  nnUNetDatasetBlosc2, nnUNetDatasetNumpy)
    except ImportError as e:
        fail_unless(False, f"nnunetv2.training.dataloading.nnunet_dataset.{e.name or e}", "save_preprocessed_case",
                "storing ReCoSeg's unlabelled cases as nnU-Net's preprocessor does")
    fail_unless(callable(comp_blosc2_params), "nnunet_dataset.comp_blosc2_params", "save_preprocessed_case",
            "the blosc2 chunks and blocks of nnU-Net's preprocessor")
    params = inspect.signature(nnUNetDatasetBlosc2.save_case).parameters
    fail_unless(all(p in params for p in ("chunks", "blocks", "chunks_seg", "blocks_seg")),
            "nnUNetDatasetBlosc2.save_case(chunks, blocks, chunks_seg, blocks_seg)", "save_preprocessed_case",
            "storing ReCoSeg's unlabelled cases as nnU-Net's preprocessor does")
    fail_unless(list(inspect.signature(nnUNetBaseDataset.__init__).parameters)[1:] ==
            ["folder", "identifiers", "folder_with_segs_from_previous_stage"],
            "nnUNetBaseDataset.__init__(folder, identifiers, folder_with_segs_from_previous_stage)",
            "save_preprocessed_case", "ReCoSeg's dataset subclasses (unlabelled cases, residual-map channel)")
    data = np.random.RandomState(0).rand(2, 10, 12, 9).astype(np.float64)
    seg = np.zeros((1, 10, 12, 9), dtype=np.int64)
    cm = SimpleNamespace(patch_size=[8, 8, 8])
    for cls in (nnUNetDatasetBlosc2, nnUNetDatasetNumpy):
        folder = tmp_path / cls.__name__
        folder.mkdir()
        nnunet_compat.save_preprocessed_case(cls, cm, data, seg, {"spacing": [1, 1, 1]}, str(folder / "case"))
        loaded = cls(str(folder), ["case"], None).load_case("case")
        fail_unless(isinstance(loaded, tuple) and len(loaded) == 4, f"{cls.__name__}.load_case's (data, seg, "
                f"seg_prev, properties)", "save_preprocessed_case",
                "ReCoSeg's dataset subclasses (unlabelled cases, residual-map channel)")
        assert np.allclose(np.asarray(loaded[0][:]), data.astype(np.float32))
        assert np.asarray(loaded[1][:]).dtype == np.int16 and loaded[3]["spacing"] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------- compilation
def test_do_i_compile(trainer):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    fn = getattr(nnUNetTrainer, "_do_i_compile", None)
    fail_unless(callable(fn) and list(inspect.signature(fn).parameters) == ["self"], "nnUNetTrainer._do_i_compile(self)",
            "nnunet_would_compile", "compiling a diffusion trainer's parts where nnU-Net would compile its network "
            "(and overriding it so that nnU-Net never compiles the whole sampling loop)")
    assert nnunet_compat.nnunet_would_compile(trainer) is False  # nnU-Net never compiles on the CPU


# ---------------------------------------------------------------------------------------------- prediction
def test_predictor_sliding_window_method_and_attributes():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    fn = getattr(nnUNetPredictor, "predict_sliding_window_return_logits", None)
    fail_unless(callable(fn) and list(inspect.signature(fn).parameters) == ["self", "input_image"],
            "nnUNetPredictor.predict_sliding_window_return_logits(self, input_image)", "install_case_input_hook",
            "ReCoSeg's residual map of the whole case before nnU-Net's sliding window")
    p = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    for attr in ("network", "device", "tile_step_size", "configuration_manager"):
        fail_unless(hasattr(p, attr), f"nnUNetPredictor.{attr}", "install_case_input_hook",
                "ReCoSeg's residual map of the whole case (the predictor's network, device, patch and step)")


def test_importing_the_package_leaves_nnunets_predictor_alone():
    """Neither our trainers nor the module nnUNet_extTrainer points at change nnUNetPredictor when imported."""
    script = r"""
import importlib.util, json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
before = dict(vars(nnUNetPredictor))
import nnunet_diffusion.trainers, nnunet_diffusion.cli
from nnunet_diffusion.environment import ext_trainer_dir
spec = importlib.util.spec_from_file_location("nnunet_diffusion_trainers", ext_trainer_dir() + "/nnunet_diffusion_trainers.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
after = dict(vars(nnUNetPredictor))
changed = sorted(k for k in set(before) | set(after) if before.get(k) is not after.get(k))
print("RESULT " + json.dumps(changed))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if not k.startswith("NNDIFF_")})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(lines[-1][len("RESULT "):]) == []


class _Recording(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 2, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.conv(x)


def test_the_hook_leaves_other_networks_to_nnunets_own_method():
    """Once a ReCoSeg network has installed the hook, the predictor of any other network gives what nnU-Net's own
    method gives, from the same windows."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
    from nnunet_diffusion.inference.options import SamplingOptions
    from nnunet_diffusion.inference.recoseg_network import ReCoSegNetwork
    from nnunet_diffusion.nets import TimeConditionedUNet

    ReCoSegNetwork(TimeConditionedUNet(3, 4, 1, (4, 8)), torch.nn.Conv3d(5, 2, 1),
                   NoiseSchedule(ScheduleConfig(10, "linear_beta", 1e-4, 2e-2)),
                   SamplingOptions(True, 2, "ddim", 1, 0, "window", "mean"), 4)
    assert nnunet_compat.case_input_hook_installed()
    hooked = nnUNetPredictor.predict_sliding_window_return_logits
    own = hooked.__wrapped__  # nnU-Net's own method (functools.wraps)
    assert own is not hooked and own.__module__ == "nnunetv2.inference.predict_from_raw_data"

    torch.manual_seed(0)
    case = torch.randn(4, 12, 10, 14)
    results = []
    for fn in (hooked, own):
        net = _Recording()
        torch.manual_seed(1)
        net.conv.reset_parameters()
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        p.network = net
        p.configuration_manager = SimpleNamespace(patch_size=[8, 8, 8])
        p.label_manager = SimpleNamespace(num_segmentation_heads=2)
        results.append((fn(p, case), net.seen))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert {s[1] for s in results[0][1]} == {4}  # the network saw the case's own 4 channels


# ---------------------------------------------------------------------------------------------- trainer lookup
def test_trainer_class_search_of_one_folder(tmp_path):
    from nnunetv2.utilities import find_class_by_name
    fn = getattr(find_class_by_name, "recursive_find_python_class", None)
    params = inspect.signature(fn).parameters if callable(fn) else {}
    fail_unless(all(p in params for p in ("folder", "class_name", "current_module", "base_folder", "verbose",
                                      "cleanup_imports_from_base_folder")),
            "nnunetv2.utilities.find_class_by_name.recursive_find_python_class(folder, class_name, current_module, "
            "base_folder, verbose, cleanup_imports_from_base_folder)", "find_class_in_folder",
            "telling a user's own trainer in another nnUNet_extTrainer folder from a misspelt variant of ours")
    (tmp_path / "nndiff_probe_trainers.py").write_text("class ProbeTrainer:\n    pass\n")
    found = nnunet_compat.find_class_in_folder(str(tmp_path), "ProbeTrainer")
    assert found is not None and found.__name__ == "ProbeTrainer"
    assert "nndiff_probe_trainers" not in sys.modules  # evicted, as nnU-Net's own search does
    assert nnunet_compat.find_class_in_folder(str(tmp_path), "NoSuchTrainer") is None


def test_ext_trainer_variable(monkeypatch, tmp_path):
    from nnunetv2 import paths
    env_name = getattr(getattr(paths, "nnUNet_extTrainer", None), "env_var_name", "nnUNet_extTrainer")
    fail_unless(env_name == "nnUNet_extTrainer", "the nnUNet_extTrainer variable", "ext_trainer_folders",
            "the folders nnU-Net searches for trainers")
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(tmp_path), str(tmp_path / "missing"), ""]))
    assert nnunet_compat.ext_trainer_folders() == [str(tmp_path)]
