"""nnUNetTrainerReCoSeg: ReCoSeg (Yavari et al., MIDL 2025) on nnU-Net's plans, data pipeline and predictor.

Stages by epoch (trainer_configs/recoseg.toml):
  1. the T1ce synthesis DDPM (noise on T1ce, the other channels as condition; Adam 2e-4, paper §2.1). It needs
     no labels (the paper's "unsupervised generative phase"): it trains on the images of the fold's training
     cases and, when ``unlabelled_folder`` / NNDIFF_UNLABELLED names a folder, on those unlabelled images too
     (preprocessed once with the plans' own preprocessor, as nnU-Net's predictor does for images without a
     segmentation, into ``<fold folder>/unlabelled/``); ``synthesis_cases = "unlabelled"`` trains it on those
     only, so the residuals stage 2 learns from come from a synthesiser that never saw the case, as at prediction;
     ``synthesis_cases = "cross"`` (the default, issue 32) trains ``synthesis_splits`` synthesisers instead, each
     blind to one chunk of the fold's training cases (``heads.recoseg.cross_synthesis_chunks``), which share the
     stage's optimiser steps (``heads.recoseg.choose_synthesiser``), so the budget stays the same;
  then, once: the residual map r = |synthetic − real T1ce| of every labelled case, computed with the frozen
     synthesiser by ``recoseg_residuals.case_residual`` over the whole preprocessed case and stored in
     ``<fold folder>/residuals/<case>.npy`` ("cross": by the synthesiser blind to the case's chunk; validation cases
     and prediction by synthesiser 0), drawn with ``residual_sampler`` ("inference", the default: the sampler
     prediction uses, so training and prediction maps come from the same distribution);
  2. the segmenter on the modalities ⊕ r with nnU-Net's loss, SGD and poly learning rate, on a ``label_fraction``
     of the fold's training cases (1 = all; the paper's "reduced reliance on dense labels" as a knob). nnU-Net's
     data loader reads r as one more image channel, so cropping and augmentation move image and residual
     together, and no sampling loop runs inside a training step.
``nnUNetv2_predict`` (and the final validation) computes r of the whole case with the same
``recoseg_residuals.case_residual`` before nnU-Net's sliding window runs the segmenter
(``ReCoSegNetwork.nnunet_predictor_case_input``).
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import zlib
from dataclasses import replace
from os.path import isdir, join
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import distributed as dist

from .. import nnunet_compat
from ..errors import NNDiffCheckpointError, NNDiffConfigError
from ..heads import recoseg
from ..heads.recoseg import INFERENCE
from ..inference import recoseg_residuals
from ..inference.options import SamplingOptions
from ..inference.recoseg_network import ReCoSegNetwork
from ..nets import TimeConditionedUNet
from .base import make_variants
from .diffusion_base import DiffusionTrainer
from .lr_schedules import poly_lr
from ..variables import UNLABELLED as UNLABELLED_ENV

UNLABELLED_PREFIX = "unlabelled__"  # identifiers of unlabelled cases, never equal to a labelled case's


def labelled_subset(identifiers, fraction: float, seed: int) -> list[str]:
    """The training cases whose labels stage 2 uses: ceil(fraction · n) of them (at least 1), drawn without
    replacement by a generator seeded with ``seed`` (the fold), so a run and its resume pick the same cases."""
    ids = sorted(identifiers)
    if not 0 < fraction <= 1:
        raise NNDiffConfigError(f"recoseg label_fraction must be in (0, 1]; got {fraction}")
    if fraction == 1:
        return ids
    n = max(1, math.ceil(fraction * len(ids)))
    order = np.random.RandomState(int(seed)).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])


def unlabelled_cases(folder: str, file_ending: str, num_channels: int, exclude=()) -> list[tuple[str, list[str]]]:
    """(case, its channel files) of every case in ``folder`` (nnU-Net's ``{case}_{XXXX}<file_ending>`` layout)
    that is not in ``exclude``; a one-line NNDiffConfigError for a missing folder, no case, or a case whose
    channel files are not exactly 0 .. num_channels − 1."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    if not isdir(folder):
        raise NNDiffConfigError(f"ReCoSeg unlabelled images ({UNLABELLED_ENV} / unlabelled_folder): folder "
                                f"{folder} does not exist")
    ids = [i for i in get_identifiers_from_splitted_dataset_folder(folder, file_ending) if i not in set(exclude)]
    if not ids:
        raise NNDiffConfigError(f"ReCoSeg unlabelled images: no cases named {{case}}_{{XXXX}}{file_ending} in "
                                f"{folder}" + (" that are not already labelled training cases" if exclude else ""))
    names = set(os.listdir(folder))
    cases = []
    for case in ids:
        have = sorted(n for n in names if n.startswith(case + "_") and n.endswith(file_ending)
                      and len(n) == len(case) + 5 + len(file_ending) and n[len(case) + 1:len(case) + 5].isdigit())
        want = [f"{case}_{c:04d}{file_ending}" for c in range(num_channels)]
        if have != want:
            raise NNDiffConfigError(f"ReCoSeg unlabelled images: case {case} in {folder} has channel files "
                                    f"{[h[len(case) + 1:len(case) + 5] for h in have]}, this dataset has "
                                    f"{num_channels} channels (_0000 .. _{num_channels - 1:04d})")
        cases.append((case, [join(folder, w) for w in want]))
    return cases


def with_extra_cases(base: type, extra_folder: str, extra_ids) -> type:
    """A subclass of nnU-Net's dataset class ``base`` that also serves the cases ``extra_ids`` stored (by the same
    class) in ``extra_folder``: stage 1 trains on labelled and unlabelled images through nnU-Net's data loader."""
    extra_ids = sorted(extra_ids)

    def __init__(self, folder, identifiers=None, folder_with_segs_from_previous_stage=None):
        base.__init__(self, folder, identifiers, folder_with_segs_from_previous_stage)
        self.extra = base(extra_folder, list(extra_ids))
        self.identifiers = sorted(self.identifiers + extra_ids)

    def load_case(self, identifier):
        if identifier.startswith(UNLABELLED_PREFIX):
            return self.extra.load_case(identifier)
        return base.load_case(self, identifier)

    return type(f"{base.__name__}WithUnlabelled", (base,),
                {"__init__": __init__, "load_case": load_case, "__module__": __name__})


def drop_zero_gradients(modules) -> None:
    """Set the gradients of every module whose gradients are all exactly zero to None, so Adam skips it. Under DDP
    a cross synthesiser that no rank trained this step gets zeros (tied into the graph by ``_zero``), and Adam would
    still move it by its momentum; alone, it has no gradient and Adam skips it anyway."""
    for m in modules:
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        if grads and all(not torch.any(g) for g in grads):
            for p in m.parameters():
                p.grad = None


class StagedLR:
    """Stage 1: the synthesiser's Adam at ``synthesis_lr`` (constant, paper §2.1), the segmenter's SGD at 0.
    Stage 2: SGD with nnU-Net's poly decay from ``initial_lr`` over stage 2, the synthesiser frozen."""

    def __init__(self, trainer: "nnUNetTrainerReCoSeg"):
        self.trainer = trainer

    def step(self, epoch: int) -> None:
        tr = self.trainer
        s1, s2 = tr.stage_epochs
        stage = tr.stage_of(epoch)
        for g in tr.optimizer.param_groups:
            g["lr"] = 0.0 if stage == 1 else poly_lr(tr.initial_lr, epoch - s1, s2)
        for g in tr.synthesis_optimizer.param_groups:
            g["lr"] = float(tr.hparams().synthesis_lr) if stage == 1 else 0.0


class nnUNetTrainerReCoSeg(DiffusionTrainer):
    """ReCoSeg with the paper's training settings where it gives them (trainer_configs/recoseg.toml [defaults]),
    except the segmenter: nnU-Net's planned network with one more input channel, not the paper's lightweight
    2D U-Net (``_light`` is a narrow planned U-Net), so that it compares with nnU-Net on the same plans."""
    head = "recoseg"
    compiled_parts = ("synthesizer", "segmenter")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        hp = self.hparams()
        try:
            self.target_channel = recoseg.find_target_channel(dataset_json.get("channel_names", {}),
                                                              hp.target_channel)
        except ValueError as e:
            raise NNDiffConfigError(f"{self.__class__.__name__} on {self.plans_manager.dataset_name}: {e}") from None
        self.stage_epochs = [int(hp.stage1_epochs), int(hp.stage2_epochs)]
        if min(self.stage_epochs) < 1:
            raise NNDiffConfigError(f"{self.__class__.__name__}: both stages need at least one epoch (synthesis, "
                                    f"segmentation); trainer config gives {self.stage_epochs}")
        self.num_epochs = sum(self.stage_epochs)
        self.label_fraction = hp.label_fraction
        self.unlabelled_folder = os.environ.get(UNLABELLED_ENV) or str(hp.unlabelled_folder or "")
        self.synthesis_cases = hp.synthesis_cases
        if self.synthesis_cases == "unlabelled" and not self.unlabelled_folder:
            raise NNDiffConfigError(f"{self.__class__.__name__}: synthesis_cases = 'unlabelled' trains the "
                                    f"synthesiser on unlabelled images only; name their folder with "
                                    f"{UNLABELLED_ENV} or unlabelled_folder")
        self.residual_sampling()  # a bad residual_sampler / residual_sampling_steps stops here, not after stage 1
        self.synthesis_splits = hp.synthesizer_count
        self.cross_steps = [0] * self.synthesis_splits  # stage-1 optimiser steps of each synthesiser
        self._chunks: dict[str, int] | None = None
        self.synthesis_optimizer = None
        self._loader_stage = None
        nnunet_compat.register_log_key(self, "recoseg_stage")

    # ------------------------------------------------------------------ configuration
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> ReCoSegNetwork:
        """Synthesiser (noisy T1ce ⊕ the other C − 1 channels → 1 channel) + the segmenter (planned network, or
        its light variant, with C + 1 input channels); also what nnUNetv2_predict builds."""
        hp = cls.hparams()
        seg_manager = configuration_manager
        if hp.segmenter == "light":
            conf = copy.deepcopy(configuration_manager.configuration)
            kwargs = conf["architecture"]["arch_kwargs"]
            kwargs["features_per_stage"] = [max(4, int(round(f * float(hp.light_width))))
                                            for f in kwargs["features_per_stage"]]
            seg_manager = ConfigurationManager(conf)
        segmenter = nnUNetTrainer.build_network_architecture(plans_manager, seg_manager, num_input_channels + 1,
                                                             num_output_channels, enable_deep_supervision)
        dim = len(configuration_manager.patch_size)
        strides = [tuple(s) for s in configuration_manager.pool_op_kernel_sizes[1:]]
        channels = list(hp.synthesis_channels)[:len(strides) + 1]
        synthesizer, *cross = [TimeConditionedUNet(dim, num_input_channels, 1, channels, strides[:len(channels) - 1],
                                                   int(hp.synthesis_res_blocks)) for _ in range(hp.synthesizer_count)]
        schedule = cls.schedule()
        clip = float(hp.synthesis_clip) or None
        return ReCoSegNetwork(synthesizer, segmenter, schedule, cls.predict_sampling(schedule.num_train_timesteps),
                              num_input_channels, prediction_type=hp.prediction_type, clip=clip,
                              cross_synthesizers=cross)

    def recorded_config(self) -> dict:
        return dict(super().recorded_config(), unlabelled_folder=self.unlabelled_folder)  # NNDIFF_UNLABELLED included

    @classmethod
    def residual_sampling(cls) -> SamplingOptions:
        """How the training residual maps are drawn: one synthesis per case. ``residual_sampler = "inference"``
        (the default, issue 32): with the shipped inference sampler and steps (``sampler``, ``sampling_steps``), so
        the maps stage 2 trains on and those it sees at prediction are drawn alike; then those keys shape the
        trained weights (``predict_only``). Otherwise with ``residual_sampler`` and ``residual_sampling_steps``,
        kept apart from the inference sampler, so that choosing the inference default never changes what stage 2
        trains on (trainer_configs/recoseg.toml)."""
        hp = cls.hparams()
        opts = replace(cls.sampling_defaults(), samples=1, fusion="mean")
        if hp.residual_sampler != INFERENCE:
            opts = replace(opts, sampler=hp.residual_sampler, steps=int(hp.residual_sampling_steps))
        return opts.validate(int(hp.num_train_timesteps), source=f"{cls.__name__} residual_sampler/_steps")

    @classmethod
    def predict_only(cls) -> frozenset:
        """With ``residual_sampler = "inference"`` the inference sampler and its steps draw the training maps: a
        resumed training (--c) must keep them."""
        keys = super().predict_only()
        return keys - {"sampler", "sampling_steps"} if cls.hparams().residual_sampler == INFERENCE else keys

    def cross_chunks(self) -> dict[str, int]:
        """{training case: chunk} of ``synthesis_cases = "cross"`` (``heads.recoseg.cross_synthesis_chunks`` of the
        fold's training cases, seeded with the fold); {} otherwise."""
        if self._chunks is None:
            if self.synthesis_splits < 2:
                self._chunks = {}
            else:
                train_ids, _ = self.do_split()
                try:
                    self._chunks = recoseg.cross_synthesis_chunks(train_ids, self.synthesis_splits,
                                                                  zlib.crc32(f"cross {self.fold}".encode()))
                except ValueError as e:
                    raise NNDiffConfigError(f"{self.__class__.__name__} fold {self.fold}: synthesis_cases = "
                                            f"'cross': {e}; lower synthesis_splits") from None
        return self._chunks

    def stage_batches(self, batch: dict) -> list[tuple[str, int, dict]]:
        """Stage 2's batch carries the residual map as one more channel (a stand-in of the right shape)."""
        with_residual = {"data": torch.cat([batch["data"], batch["data"][:, :1].abs()], 1), "target": batch["target"]}
        return [("stage 1 (synthesis)", 0, batch), ("stage 2 (segmentation)", self.stage_epochs[0], with_residual)]

    def stage_of(self, epoch: int) -> int:
        return 1 if epoch < self.stage_epochs[0] else 2

    @property
    def residual_folder(self) -> str:
        return join(self.output_folder, "residuals")

    def initialize(self):
        super().initialize()
        self.unwrapped_network().target_channel.fill_(self.target_channel)
        names = self.dataset_json.get("channel_names", {})
        self.print_to_log_file(f"ReCoSeg: synthesising channel {self.target_channel} "
                               f"({names.get(str(self.target_channel))}) from the others")

    def configure_optimizers(self):
        net = self.network  # not yet wrapped in DDP/compile when nnU-Net calls this
        optimizer = self.nnunet_sgd(net.segmenter.parameters())
        self.synthesis_optimizer = torch.optim.Adam([p for m in net.synthesizers() for p in m.parameters()],
                                                    lr=float(self.hparams().synthesis_lr))
        return optimizer, StagedLR(self)

    # ------------------------------------------------------------------ data: residual maps as a channel
    @property
    def unlabelled_preprocessed_folder(self) -> str:
        return join(self.output_folder, "unlabelled")

    def resolve_unlabelled_folder(self) -> str:
        """The unlabelled-images folder; a relative one (e.g. "imagesTr") is a folder of the raw dataset."""
        folder = self.unlabelled_folder
        if not os.path.isabs(folder):
            from nnunetv2.paths import nnUNet_raw
            folder = join(nnUNet_raw or "", self.plans_manager.dataset_name, folder)
        return folder

    def ensure_unlabelled(self, labelled) -> list[str]:
        """Identifiers of the unlabelled cases stage 1 also trains on ([] when no folder is named), each
        preprocessed once with the plans' preprocessor without a segmentation (as nnU-Net's predictor does) and
        saved by nnU-Net's dataset class in ``unlabelled_preprocessed_folder``; cases of the folder that are
        labelled cases of this dataset are skipped."""
        if not self.unlabelled_folder:
            return []
        cases = unlabelled_cases(self.resolve_unlabelled_folder(), self.dataset_json["file_ending"],
                                 len(self.dataset_json["channel_names"]), exclude=labelled)
        out = Path(self.unlabelled_preprocessed_folder)
        out.mkdir(parents=True, exist_ok=True)
        have = set(self.dataset_class.get_identifiers(str(out)))
        ids = [UNLABELLED_PREFIX + case for case, _ in cases]
        todo = [(i, files) for i, (_, files) in zip(ids, cases) if i not in have]
        if todo and self.local_rank == 0:
            preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
            for identifier, files in todo:
                data, seg, properties = preprocessor.run_case(files, None, self.plans_manager,
                                                              self.configuration_manager, self.dataset_json)
                properties["class_locations"] = {}  # no labels: nnU-Net's loader falls back to random crops
                self._save_preprocessed(data, seg, properties, str(out / identifier))
            self.print_to_log_file(f"ReCoSeg: {len(todo)} unlabelled case(s) of {self.resolve_unlabelled_folder()} "
                                   f"preprocessed into {out}")
        if self.is_ddp:
            dist.barrier()
        return ids

    def _save_preprocessed(self, data, seg, properties, path: str) -> None:
        """As nnU-Net's ``DefaultPreprocessor.run_case_save`` stores a case (float32 data, int16 seg, blosc2 chunks
        for the planned patch), with whichever dataset class this dataset uses."""
        nnunet_compat.save_preprocessed_case(self.dataset_class, self.configuration_manager, data, seg, properties,
                                             path)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._loader_stage = self.stage_of(self.current_epoch)
        kw = {"folder_with_segs_from_previous_stage": self.folder_with_segs_from_previous_stage}
        if self._loader_stage == 1:
            chunks = self.cross_chunks()
            if chunks:
                self.print_to_log_file(f"ReCoSeg stage 1: {self.synthesis_splits} synthesisers, synthesiser k blind to "
                                       f"chunk k of the training cases: " + "; ".join(
                                           f"chunk {k}: {sorted(c for c, j in chunks.items() if j == k)}"
                                           for k in range(self.synthesis_splits)))
            extra = self.ensure_unlabelled(dataset_tr.identifiers + dataset_val.identifiers)
            if not extra:
                return dataset_tr, dataset_val
            labelled = [] if self.synthesis_cases == "unlabelled" else list(dataset_tr.identifiers)
            self.print_to_log_file(f"ReCoSeg stage 1 trains on {len(labelled)} labelled and {len(extra)} "
                                   f"unlabelled case(s)")
            cls = with_extra_cases(self.dataset_class, self.unlabelled_preprocessed_folder, extra)
            return cls(self.preprocessed_dataset_folder, labelled, **kw), dataset_val
        train_ids = labelled_subset(dataset_tr.identifiers, self.label_fraction, zlib.crc32(str(self.fold).encode()))
        if len(train_ids) < len(dataset_tr.identifiers):
            self.print_to_log_file(f"ReCoSeg stage 2 uses the labels of {len(train_ids)} of "
                                   f"{len(dataset_tr.identifiers)} training cases (label_fraction "
                                   f"{self.label_fraction}): {train_ids}")
        self.ensure_residuals(train_ids + dataset_val.identifiers)
        wrapped = recoseg_residuals.wrap_dataset_class(self.dataset_class, self.residual_folder)
        return (wrapped(self.preprocessed_dataset_folder, train_ids, **kw),
                wrapped(self.preprocessed_dataset_folder, dataset_val.identifiers, **kw))

    def ensure_residuals(self, identifiers) -> None:
        """The residual map of every case (each DDP rank computes its share), drawn with :meth:`residual_sampling`,
        by the synthesiser blind to the case ("cross": chunk k's cases by synthesiser k, every other case, the
        validation cases included, by synthesiser 0; otherwise all by the one synthesiser)."""
        net = self.unwrapped_network()
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.is_ddp else (0, 1)
        mine = sorted(identifiers)[rank::world]
        opts = self.residual_sampling()
        chunks = self.cross_chunks()
        if self.local_rank == 0:
            stale = recoseg_residuals.discard_other_residuals(
                self.residual_folder, recoseg_residuals.synthesis_fingerprint(net.synthesizers(), opts))
            if stale:
                self.print_to_log_file(f"ReCoSeg: {stale} residual map(s) of another synthesiser or sampler deleted")
        if self.is_ddp:
            dist.barrier()
        saved_sampling, was_training = net.pinned, net.training
        net.set_sampling(opts)
        net.eval()
        reader = self.dataset_class(self.preprocessed_dataset_folder, list(mine))

        def autocast():
            return torch.autocast(self.device.type) if self.device.type == "cuda" else dummy_context()
        try:
            done = []
            for k in range(self.synthesis_splits):
                cases = [i for i in mine if chunks.get(i, 0) == k]
                with autocast(), net.using(k):  # as nnU-Net's predictor does on CUDA; the sampler stays float32
                    done += recoseg_residuals.precompute_residuals(
                        net, lambda i: reader.load_case(i)[0][:], cases, self.residual_folder,
                        self.configuration_manager.patch_size, self.device, progress=self.local_rank == 0)
        finally:
            net.set_sampling(saved_sampling)
            net.train(was_training)
        if done:
            self.print_to_log_file(f"ReCoSeg: residual maps of {len(done)} case(s) written to {self.residual_folder} "
                                   f"({opts.sampler}, {opts.steps} steps)")
        if self.is_ddp:
            dist.barrier()

    def _finish_dataloaders(self):
        for dl in (self.dataloader_train, self.dataloader_val):
            nnunet_compat.finish_dataloader(dl)

    # ------------------------------------------------------------------ nnU-Net hooks
    def on_train_start(self):
        if self.current_epoch == 0 and self.local_rank == 0 and self.output_folder:
            for stale in (self.residual_folder, self.unlabelled_preprocessed_folder):
                if isdir(stale):  # an earlier run's residual maps / unlabelled cases (maybe of another folder)
                    shutil.rmtree(stale)
        super().on_train_start()
        self.print_to_log_file(f"ReCoSeg stages (epochs): synthesis {self.stage_epochs[0]}, segmentation "
                               f"{self.stage_epochs[1]}; target channel {self.target_channel}")

    def on_train_epoch_start(self):
        stage = self.stage_of(self.current_epoch)
        if stage != self._loader_stage:  # stage 1 just ended: residual maps, then loaders that read them
            self._finish_dataloaders()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        if stage == 2 and (self.current_epoch == self.stage_epochs[0] or
                           nnunet_compat.best_ema(self) == float("inf")):
            nnunet_compat.set_best_ema(self, None)  # pseudo Dice (and checkpoint_best) starts with the segmenter
        super().on_train_epoch_start()
        self.print_to_log_file(f"ReCoSeg stage {stage} ({'synthesis' if stage == 1 else 'segmentation'})")
        self.logger.log("recoseg_stage", stage, self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        stage = self.stage_of(self.current_epoch)
        data = batch["data"].to(self.device, non_blocking=True)
        net = self.unwrapped_network()
        k = 0
        if stage == 1:
            if self.synthesis_splits > 1:  # "cross": the synthesiser with the fewest steps among those allowed
                keys = batch.get("keys")  # nnU-Net's loader names each sample's case
                keys = [""] * data.shape[0] if keys is None else list(keys)
                k, keep = recoseg.choose_synthesiser(keys, self.cross_chunks(), self.synthesis_splits, self.cross_steps)
                if len(keep) < data.shape[0]:
                    data = data[keep]
                self.cross_steps[k] += 1
            # every synthesiser's parameters: under DDP the others carry the other ranks' (averaged) gradients, and
            # every rank must clip the same set so the replicas stay equal; alone, the others have no gradient
            optimizer, params, clip = self.synthesis_optimizer, [p for m in net.synthesizers() for p in m.parameters()], \
                float(self.hparams().synthesis_grad_clip)
            before_step = (lambda: drop_zero_gradients(net.synthesizers())) if self.synthesis_splits > 1 else None
        else:
            optimizer, params, clip, before_step = self.optimizer, net.segmenter.parameters(), 12.0, None
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            if stage == 1:
                loss = self.network(data, mode="synthesis_loss", tie_frozen=self.is_ddp, synthesizer=k)
            else:
                target = batch["target"]
                target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                    else target.to(self.device, non_blocking=True)
                out, zero = self.network(data, mode="segment", tie_frozen=self.is_ddp)
                loss = self.loss(out, target) + zero
        if not torch.isfinite(loss):
            self.stop_on_non_finite(f"ReCoSeg stage {stage}", {"synthesis" if stage == 1 else "segmentation": loss},
                                    "e.g. lower synthesis_lr in trainer_configs/recoseg.toml, check the data")
        self.backward_and_step(loss, optimizer, params, clip, before_step)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        if self.stage_of(self.current_epoch) == 2:
            return super().validation_step(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss = self.network(data, mode="synthesis_loss")
        zeros = np.zeros(self.label_manager.num_segmentation_heads - (0 if self.label_manager.has_regions else 1))
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": zeros, "fp_hard": zeros, "fn_hard": zeros}

    def on_validation_epoch_end(self, val_outputs):
        epoch = self.current_epoch
        if self.stage_of(epoch) == 2:
            super().on_validation_epoch_end(val_outputs)
            if epoch == self.stage_epochs[0]:  # the moving average starts with the segmenter
                nnunet_compat.overwrite_logged_value(self, "ema_fg_dice", epoch,
                                                     self.logger.get_value("mean_fg_dice", -1))
            return
        # stage 1 has no segmentation: pseudo Dice is 0 by definition, val loss is the synthesis loss
        loss = float(np.mean([o["loss"] for o in val_outputs]))
        n = len(val_outputs[0]["tp_hard"])
        self.logger.log("mean_fg_dice", 0.0, epoch)
        self.logger.log("dice_per_class_or_region", [0.0] * n, epoch)
        self.logger.log("val_losses", loss, epoch)
        self._set_predict_sampling()

    def on_epoch_end(self):
        if self.stage_of(self.current_epoch) == 1:
            nnunet_compat.set_best_ema(self, float("inf"))  # no checkpoint_best of a model that cannot segment yet
        # the last synthesis epoch gets a checkpoint even between save_every's: a training interrupted while the
        # residual maps are computed resumes with this synthesiser and keeps the maps already written
        boundary = self.current_epoch + 1 == self.stage_epochs[0] and (self.current_epoch + 1) % self.save_every != 0
        super().on_epoch_end()  # nnU-Net's: logs, its own checkpoints, then current_epoch += 1
        if boundary and self.current_epoch < self.num_epochs:
            nnunet_compat.save_checkpoint_after_epoch_end(self, join(self.output_folder, "checkpoint_latest.pth"))

    # ------------------------------------------------------------------ checkpoints
    def snapshot_due(self, epochs_done: int) -> bool:
        return super().snapshot_due(epochs_done) or epochs_done == self.stage_epochs[0]  # the synthesis stage's end

    def extra_checkpoint_state(self) -> dict:
        return {"recoseg_stage_epochs": list(self.stage_epochs), "recoseg_target_channel": self.target_channel,
                "synthesis_optimizer_state": self.synthesis_optimizer.state_dict(),
                "recoseg_cross_steps": list(self.cross_steps)}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        if "synthesis_optimizer_state" not in state:
            raise NNDiffCheckpointError("checkpoint has no ReCoSeg state (synthesis optimiser, stage epochs)")
        if int(state["recoseg_target_channel"]) != self.target_channel:
            raise NNDiffCheckpointError(f"checkpoint synthesises channel {state['recoseg_target_channel']}, this "
                                        f"dataset's target channel is {self.target_channel}")
        self.synthesis_optimizer.load_state_dict(state["synthesis_optimizer_state"])
        self.cross_steps = list(state.get("recoseg_cross_steps", self.cross_steps))
        self.stage_epochs = list(state["recoseg_stage_epochs"])
        self.num_epochs = sum(self.stage_epochs)


VARIANTS = make_variants(nnUNetTrainerReCoSeg)
globals().update(VARIANTS)
__all__ = ["nnUNetTrainerReCoSeg", *sorted(VARIANTS)]
