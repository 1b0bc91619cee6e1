"""nnUNetTrainerNNDM: NNDM (Mekanaboyina 2025) wired into nnU-Net's hooks.

Stages by epoch (trainer_configs/nndm.toml):
  1. nnU-Net alone, exactly nnUNetTrainer's training (same loss, deep supervision, SGD, poly LR).
  2. the refiner alone learns e = y − ŷ on the frozen backbone (L_diff, NNDM §4.2); ŷ is the backbone's output on
     the augmented training patch, or with ``residual_source = "dropout"`` that output under feature dropout
     (see ``inference/nndm_network.py``).
  3. joint fine-tuning, L_total = L_seg + λ L_diff (NNDM §4.3).
Optimisers (the paper gives one initial learning rate, 1e-4, and names no optimiser, §5.1): the backbone keeps
nnU-Net's SGD at 1e-2 (stage 1) and ``joint_backbone_lr`` (stage 3); the refiner has AdamW at ``refiner_lr``.
With ``NNDIFF_BASELINE`` set (a trained nnU-Net of the same plans, configuration and fold) stage 1 is
skipped and the backbone starts from that checkpoint's weights.

The network is :class:`~nnunet_diffusion.inference.nndm_network.NNDMNetwork` (backbone + refiner), so
checkpoints, DDP, ``nnUNetv2_predict`` and the final validation handle both parts with nnU-Net's own code.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from .. import nnunet_compat
from ..errors import NNDiffCheckpointError, NNDiffConfigError
from ..heads import nndm
from ..heads.nndm import NNDMSpec
from ..inference.nndm_network import NNDMNetwork
from ..inference.options import SamplingOptions
from ..nets import TimeConditionedUNet
from .base import checkpoint_origin_problems, make_variants, resolve_checkpoint
from .diffusion_base import DiffusionTrainer
from .lr_schedules import poly_lr
from ..variables import BASELINE as BASELINE_ENV


class StagedPolyLR:
    """Per-stage learning rates: stage 1 nnU-Net's poly schedule from ``initial_lr`` over stage 1; stage 2
    backbone frozen (lr 0); stage 3 poly from ``joint_backbone_lr``. The refiner (AdamW) decays from
    ``refiner_lr`` over stages 2 + 3. ``step(epoch)`` is called by nnU-Net's on_train_epoch_start."""

    def __init__(self, trainer: "nnUNetTrainerNNDM"):
        self.trainer = trainer

    def step(self, epoch: int) -> None:
        tr, hp = self.trainer, self.trainer.hparams()
        s1, s2, s3 = tr.stage_epochs
        stage = tr.stage_of(epoch)
        if stage == 1:
            lr = poly_lr(tr.initial_lr, epoch, s1)
        elif stage == 2:
            lr = 0.0
        else:
            lr = poly_lr(hp.joint_backbone_lr, epoch - s1 - s2, s3)
        for g in tr.optimizer.param_groups:
            g["lr"] = lr
        refiner_lr = 0.0 if stage == 1 else poly_lr(hp.refiner_lr, epoch - s1, s2 + s3)
        for g in tr.refiner_optimizer.param_groups:
            g["lr"] = refiner_lr


class nnUNetTrainerNNDM(DiffusionTrainer):
    """NNDM with the paper's hyper-parameters (trainer_configs/nndm.toml [defaults])."""
    head = "nndm"
    compiled_parts = ("backbone", "refiner")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        hp = self.hparams()
        self.lambda_diff = float(hp.lambda_diff)
        self.baseline_checkpoint = self._resolve_baseline(os.environ.get(BASELINE_ENV))
        self._set_residual_source()
        self.stage_epochs = [0 if self.baseline_checkpoint else int(hp.stage1_epochs),
                             int(hp.stage2_epochs), int(hp.stage3_epochs)]
        self.num_epochs = sum(self.stage_epochs)
        if self.num_epochs < 1:
            raise NNDiffConfigError(f"{self.__class__.__name__}: the stages have 0 epochs in total "
                                    f"({self.stage_epochs}); nothing to train")
        self.refiner_optimizer = None
        self._resumed = False
        for key in ("nndm_stage", "nndm_train_seg_losses", "nndm_train_diff_losses"):
            nnunet_compat.register_log_key(self, key)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> NNDMNetwork:
        """nnU-Net's planned network (unchanged) + the refiner; also what nnUNetv2_predict builds."""
        backbone = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                            num_input_channels, num_output_channels,
                                                            enable_deep_supervision)
        hp = cls.hparams()
        dim = len(configuration_manager.patch_size)
        channels = list(hp.refiner_channels)
        strides = [tuple(s) for s in configuration_manager.pool_op_kernel_sizes[1:]]
        channels = channels[:len(strides) + 1]  # never more levels than the plans can downsample
        conditioning = cls._residual_options(hp)
        refiner = TimeConditionedUNet(dim, nndm.refiner_in_channels(num_output_channels, num_input_channels,
                                                                    conditioning["residual_conditioning"]),
                                      num_output_channels, channels, strides[:len(channels) - 1],
                                      int(hp.refiner_res_blocks))
        schedule = cls.schedule()
        return NNDMNetwork(backbone, refiner, schedule, cls.predict_sampling(schedule.num_train_timesteps),
                           prediction_type=hp.prediction_type, **conditioning)

    @staticmethod
    def _residual_options(hp: NNDMSpec) -> dict:
        """residual_conditioning / residual_source / residual_dropout of the spec (validated by NNDMSpec) for the
        network, which needs to know only whether the residual is taken under feature dropout (the out-of-fold and
        backbone sources are the trainer's business)."""
        return {"residual_conditioning": hp.residual_conditioning,
                "residual_source": "dropout" if hp.residual_source == "dropout" else "backbone",
                "residual_dropout": hp.residual_dropout}

    # ------------------------------------------------------------------ out-of-fold residuals (issue 32)
    def _baseline_model_folder(self):
        """The model folder of the NNDIFF_BASELINE checkpoint (``.../<trainer>__<plans>__<config>/fold_<f>/...``),
        or None when the checkpoint does not sit in nnU-Net's layout."""
        from pathlib import Path
        if not self.baseline_checkpoint:
            return None
        fold_dir = Path(self.baseline_checkpoint).parent
        return fold_dir.parent if fold_dir.name.startswith("fold_") else None

    def _splits(self):
        import json
        from pathlib import Path
        f = Path(self.preprocessed_dataset_folder_base) / "splits_final.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def _choose_residual_source(self) -> str:
        """The residual source this training uses: the spec's, with "auto" made "oof" when NNDIFF_BASELINE names an
        nnU-Net whose every fold (of splits_final.json) is trained, else "backbone"; "oof" without such a baseline
        is a one-line error."""
        from . import out_of_fold as oof
        source = self.hparams().residual_source
        if source not in ("auto", "oof"):
            return source
        folder, splits = self._baseline_model_folder(), self._splits()
        if source == "auto":
            complete = folder is not None and splits is not None and not oof.missing_folds(folder, range(len(splits)))
            return "oof" if complete else "backbone"
        if folder is None or splits is None:
            raise NNDiffConfigError(
                f"{self.__class__.__name__}: residual_source \"oof\" trains the refiner on a trained nnU-Net's "
                f"out-of-fold predictions; set {BASELINE_ENV} to that nnU-Net (a trainer name or model folder whose "
                "folds are all trained, e.g. nnUNetTrainer)")
        oof.require_folds(folder, range(len(splits)), self.plans_manager.dataset_name, self.configuration_name,
                          self.plans_manager.plans_name)
        return "oof"

    def _set_residual_source(self) -> None:
        self.residual_source = self._choose_residual_source()
        if self.residual_source == "oof":  # nnU-Net's cascade loader brings ŷ with every patch
            from .out_of_fold import oof_folder
            self.is_cascaded = True
            self.folder_with_segs_from_previous_stage = str(oof_folder(self._baseline_model_folder(),
                                                                       self.configuration_name))

    def _ensure_oof_predictions(self) -> None:
        from . import out_of_fold as oof
        from ..nnunet_compat import dataset_class_of
        if self.local_rank == 0:
            oof.ensure_oof_predictions(self._baseline_model_folder(), self.preprocessed_dataset_folder, self._splits(),
                                       self.fold, self.plans_manager, self.configuration_name, self.dataset_json,
                                       dataset_class_of(self.preprocessed_dataset_folder), self.device,
                                       log=self.print_to_log_file)
        if self.is_ddp:
            torch.distributed.barrier()

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training transforms; with out-of-fold residuals its cascade transforms (ŷ as one-hot channels of
        the data, and, with ``oof_corruption``, nnU-Net's random morphology and connected-component removal)."""
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        if self.residual_source == "oof" and not self.hparams().oof_corruption:
            transforms = nnunet_compat.without_cascade_corruption(transforms)
        return transforms

    def _split_oof_channels(self, data: torch.Tensor):
        """(image channels, ŷ) of a batch whose last channels are nnU-Net's cascade one-hot of the out-of-fold ŷ."""
        from .out_of_fold import y_hat_from_onehot
        lm = self.label_manager
        c = self.num_input_channels
        regions = lm.foreground_regions if lm.has_regions else None
        return data[:, :c], y_hat_from_onehot(data[:, c:], lm.foreground_labels, regions, lm.has_regions)

    def stage_batches(self, batch: dict) -> list[tuple[str, int, dict]]:
        s1, s2, _ = self.stage_epochs
        return [("stage 1 (nnU-Net)", 0, batch), ("stage 2 (refiner)", s1, batch), ("stage 3 (joint)", s1 + s2, batch)]

    def stage_of(self, epoch: int) -> int:
        s1, s2, _ = self.stage_epochs
        return 1 if epoch < s1 else 2 if epoch < s1 + s2 else 3

    # ------------------------------------------------------------------ start from a trained baseline
    def _resolve_baseline(self, value):
        """NNDIFF_BASELINE: a checkpoint file, a model folder or a trainer name (see ``resolve_checkpoint``)."""
        return resolve_checkpoint(value, self, BASELINE_ENV, "baseline")

    def _load_baseline(self) -> None:
        path = self.baseline_checkpoint
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        problems = checkpoint_origin_problems(
            ckpt, self, "a baseline trained on another fold has seen this fold's validation cases",
            same_configuration=True)
        backbone = self.unwrapped_network().backbone
        own = backbone.state_dict()
        weights = ckpt.get("network_weights", {})
        if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
            problems.append(f"its network (trainer {ckpt.get('trainer_name')!r}) is not the planned nnU-Net "
                            f"architecture of this configuration")
        if problems:
            raise NNDiffCheckpointError(f"{BASELINE_ENV}: {path} cannot start NNDM: " + "; ".join(problems))
        backbone.load_state_dict(weights)
        self.print_to_log_file(f"NNDM: backbone initialised from the trained baseline {path} "
                               f"(trainer {ckpt.get('trainer_name')}); stage 1 skipped")

    # ------------------------------------------------------------------ nnU-Net hooks
    def configure_optimizers(self):
        net = self.network  # not yet wrapped in DDP/compile when nnU-Net calls this
        optimizer = self.nnunet_sgd(net.backbone.parameters())
        hp = self.hparams()
        self.refiner_optimizer = torch.optim.AdamW(net.refiner.parameters(), lr=float(hp.refiner_lr),
                                                   weight_decay=float(hp.refiner_weight_decay))
        return optimizer, StagedPolyLR(self)

    def on_train_start(self):
        if self.residual_source == "oof":
            self._ensure_oof_predictions()  # before nnU-Net builds the data loaders that read them
        super().on_train_start()
        if self.baseline_checkpoint and not self._resumed and self.current_epoch == 0:
            self._load_baseline()
        elif os.environ.get(BASELINE_ENV) and self._resumed:
            self.print_to_log_file(f"{BASELINE_ENV} ignored: resuming from a checkpoint")
        self.print_to_log_file(f"NNDM refiner's training residual: {self.residual_source}"
                               + (f" (nnU-Net's cascade corruption {'on' if self.hparams().oof_corruption else 'off'})"
                                  if self.residual_source == "oof" else ""))
        self.print_to_log_file(f"NNDM stages (epochs): nnU-Net {self.stage_epochs[0]}, refiner "
                               f"{self.stage_epochs[1]}, joint {self.stage_epochs[2]}; "
                               f"lambda = {self.lambda_diff}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        stage = self.stage_of(self.current_epoch)
        self.print_to_log_file(f"NNDM stage {stage} ({['', 'nnU-Net', 'refiner', 'joint'][stage]}); refiner lr "
                               f"{self.refiner_optimizer.param_groups[0]['lr']:.2e}")
        self.logger.log("nndm_stage", stage, self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        stage = self.stage_of(self.current_epoch)
        hp = self.hparams()
        data = batch["data"].to(self.device, non_blocking=True)
        y_hat = None
        if self.residual_source == "oof":
            data, y_hat = self._split_oof_channels(data)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        full_res_target = target[0] if isinstance(target, list) else target
        y, mask = nndm.target_channels(full_res_target, self.label_manager.num_segmentation_heads,
                                       self.label_manager.has_regions, self.label_manager.ignore_label)

        train_backbone, train_refiner = stage != 2, stage != 1
        self.optimizer.zero_grad(set_to_none=True)
        self.refiner_optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out, l_diff, zero = self.network(data, y=y, mask=mask, train_backbone=train_backbone,
                                             train_refiner=train_refiner,
                                             detach_y_hat=not hp.joint_grad_through_residual,
                                             tie_frozen=self.is_ddp, y_hat=y_hat)
            l_seg = self.loss(out, target)
            if stage == 1:
                loss = l_seg + zero
            elif stage == 2:
                loss = l_diff + zero
            else:
                loss = nndm.total_loss(l_seg, l_diff, self.lambda_diff) + zero
        if not torch.isfinite(loss):
            self.stop_on_non_finite(f"NNDM stage {stage}", {"L_seg": l_seg, "L_diff": l_diff},
                                    "e.g. lower refiner_lr / lambda_diff in trainer_configs/nndm.toml, check the data")

        net = self.unwrapped_network()
        optimizers = ([self.optimizer] if train_backbone else []) + ([self.refiner_optimizer] if train_refiner else [])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for opt in optimizers:
                self.grad_scaler.unscale_(opt)
        else:
            loss.backward()
        if train_backbone:
            torch.nn.utils.clip_grad_norm_(net.backbone.parameters(), 12)
        if train_refiner:
            torch.nn.utils.clip_grad_norm_(net.refiner.parameters(), float(hp.refiner_grad_clip))
        for opt in optimizers:
            if self.grad_scaler is not None:
                self.grad_scaler.step(opt)
            else:
                opt.step()
        if self.grad_scaler is not None:
            self.grad_scaler.update()
        if train_refiner:
            net.refiner_updates += 1
        return {"loss": loss.detach().cpu().numpy(), "seg_loss": l_seg.detach().float().cpu().numpy(),
                "diff_loss": np.float32(np.nan) if l_diff is None else l_diff.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        for key, name in (("seg_loss", "nndm_train_seg_losses"), ("diff_loss", "nndm_train_diff_losses")):
            values = [float(o[key]) for o in train_outputs]
            self.logger.log(name, float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan"),
                            self.current_epoch)
        self.print_to_log_file(f"NNDM L_seg {self.logger.get_value('nndm_train_seg_losses', -1):.4f}, "
                               f"L_diff {self.logger.get_value('nndm_train_diff_losses', -1):.4f}")

    def validation_step(self, batch: dict) -> dict:
        if self.residual_source == "oof":  # the cascade loader appends ŷ to the validation patches too
            batch = dict(batch, data=batch["data"][:, :self.num_input_channels])
        return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        # the final validation predicts as nnUNetv2_predict does: the image alone (no previous-stage ŷ)
        cascaded, self.is_cascaded = self.is_cascaded, False
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.is_cascaded = cascaded

    def recorded_config(self) -> dict:
        """The trainer config, plus the residual source "auto" chose: a training resumed (--c) after the baseline's
        folds appeared (or went) would otherwise continue on other residuals."""
        return dict(super().recorded_config(), residual_source_used=self.residual_source)

    def validation_sampling(self) -> SamplingOptions:
        # no refinement in online validation before the refiner has trained (stage 1)
        return replace(super().validation_sampling(), refine=self.stage_of(self.current_epoch) != 1)

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        return {"nndm_stage_epochs": list(self.stage_epochs), "nndm_baseline": self.baseline_checkpoint,
                "refiner_optimizer_state": self.refiner_optimizer.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        if "refiner_optimizer_state" not in state:
            raise NNDiffCheckpointError("checkpoint has no NNDM state (refiner optimiser, stage epochs)")
        self.refiner_optimizer.load_state_dict(state["refiner_optimizer_state"])
        self.stage_epochs = list(state["nndm_stage_epochs"])
        self.num_epochs = sum(self.stage_epochs)
        self.baseline_checkpoint = state.get("nndm_baseline")
        self._resumed = True
        self._set_residual_source()  # the baseline the checkpoint names, NNDIFF_BASELINE unset or not


VARIANTS = make_variants(nnUNetTrainerNNDM)
globals().update(VARIANTS)
__all__ = ["nnUNetTrainerNNDM", *sorted(VARIANTS)]
