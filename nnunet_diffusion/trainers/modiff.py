"""nnUNetTrainerMoDiff: MoDiff (Ahn et al.) on nnU-Net's plans, data pipeline and predictor.

The network is a diffusion model over the probability label map (no nnU-Net segmentation network): MCA + LDF build
the condition c_t (eqs. 1–6) for a time-conditioned U-Net on nnU-Net's planned strides, trained with eq. 8 on
nnU-Net's augmented patches; Adam at 1e-4 with ReduceLROnPlateau (factor 0.2, patience 10; paper §4.1).

Multi-rater data: a dataset.json with ``"nndiff_raters": R`` has vote-count labels 0..R (``nndiff convert-isbi2015``,
``nndiff convert-lidc``); nnU-Net crops, resamples and augments the counts like any label map and this trainer turns
k into P = k/R. Other datasets (BraTS regions, single-rater labels) train on their one-hot / region maps.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..errors import NNDiffConfigError
from ..heads import modiff
from ..heads.common import target_channels
from ..inference.modiff_network import MoDiffNetwork
from ..nets.modiff import MoDiffDenoiser
from .base import make_variants
from .diffusion_base import DiffusionTrainer

RATERS_KEY = "nndiff_raters"


def raters_of(dataset_json: dict) -> int:
    """R from dataset.json's ``nndiff_raters`` (0 when absent), checked against its labels: a vote-count dataset
    has the labels 0..R and no regions."""
    if RATERS_KEY not in dataset_json:
        return 0
    raw = dataset_json[RATERS_KEY]
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise NNDiffConfigError(f"dataset.json: {RATERS_KEY} must be an integer >= 1 (the number of raters); "
                                f"got {raw!r}")
    labels = dataset_json.get("labels", {})
    values = []
    for name, v in labels.items():
        if isinstance(v, (list, tuple)):
            raise NNDiffConfigError(f"dataset.json: {RATERS_KEY} = {raw} needs vote-count labels 0..{raw}, but label "
                                    f"{name!r} is a region {v}; multi-rater datasets are label-based")
        values.append(int(v))
    if sorted(values) != list(range(raw + 1)):
        raise NNDiffConfigError(f"dataset.json: {RATERS_KEY} = {raw} needs the labels 0..{raw} (k = number of raters "
                                f"who marked the voxel); found {sorted(values)}")
    return int(raw)


class PlateauScheduler(ReduceLROnPlateau):
    """ReduceLROnPlateau (paper §4.1) under nnU-Net, which calls ``lr_scheduler.step(epoch)`` at every epoch start:
    that call is ignored; the trainer calls :meth:`step_on` with the epoch's mean training loss."""

    def step(self, *args, **kwargs):  # nnU-Net's per-epoch call
        pass

    def step_on(self, value: float) -> None:
        ReduceLROnPlateau.step(self, value)


class nnUNetTrainerMoDiff(DiffusionTrainer):
    """MoDiff with the paper's settings (trainer_configs/modiff.toml [defaults])."""
    head = "modiff"
    compiled_parts = ("denoiser",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one full-resolution output
        self.initial_lr = float(self.hparams().lr)
        self.raters = raters_of(dataset_json)
        if self.raters and self.label_manager.ignore_label is not None:
            raise NNDiffConfigError("dataset.json: a multi-rater (nndiff_raters) dataset cannot have an ignore label")

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> MoDiffNetwork:
        hp = cls.hparams()
        pools = [tuple(s) for s in configuration_manager.pool_op_kernel_sizes]
        n = max(1, min(len(pools), int(hp.levels)))
        features = configuration_manager.network_arch_init_kwargs["features_per_stage"][:n]
        channels = [max(8, int(round(f * float(hp.width)))) for f in features]
        patch = [int(p) for p in configuration_manager.patch_size]
        denoiser = MoDiffDenoiser(len(patch), num_input_channels, num_output_channels, patch, channels,
                                  pools[1:n], int(hp.num_res_blocks), int(hp.embed_dim), int(hp.model_dim),
                                  int(hp.heads), int(hp.cond_channels), int(hp.max_tokens),
                                  bool(hp.use_mca), bool(hp.use_ldf), int(hp.ldf_width))
        schedule = cls.schedule()
        return MoDiffNetwork(denoiser, schedule, cls.predict_sampling(schedule.num_train_timesteps),
                             num_output_channels, prediction_type=hp.prediction_type,
                             lambda_ldf=float(hp.lambda_ldf), lambda_mca=float(hp.lambda_mca),
                             threshold=float(hp.binarize_threshold), reading=hp.sample_reading)

    def initialize(self):
        super().initialize()
        self.unwrapped_network().raters.fill_(self.raters)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # no deep supervision: nothing to switch

    def configure_optimizers(self):
        hp = self.hparams()
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr,
                                     weight_decay=float(hp.weight_decay))
        scheduler = PlateauScheduler(optimizer, mode="min", factor=float(hp.plateau_factor),
                                     patience=int(hp.plateau_patience))
        return optimizer, scheduler

    def targets(self, target: torch.Tensor):
        """(y, mask): the probability label map of the batch (P = k/R for vote counts, else one-hot/regions)."""
        lm = self.label_manager
        if self.raters:
            p = modiff.vote_counts_to_probability(target[:, :1], self.raters)
            return modiff.probability_label_map(p, lm.num_segmentation_heads), None
        return target_channels(target, lm.num_segmentation_heads, lm.has_regions, lm.ignore_label)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        y, mask = self.targets(target)
        self.optimizer.zero_grad(set_to_none=True)
        net = self.network
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            if net is self.unwrapped_network():
                losses = net.losses(data, y, mask)
            else:  # DDP / compiled wrapper: go through forward so gradients are synchronised
                losses = {"loss": net(data, y=y, mask=mask)}
        loss = losses["loss"]
        if not torch.isfinite(loss):
            self.stop_on_non_finite("MoDiff", {"L_total (eq. 8)": loss, "L_simple": losses.get("simple"),
                                               "L_LDF (eq. 7)": losses.get("ldf"), "L_MCA": losses.get("mca")},
                                    "e.g. lower lr in trainer_configs/modiff.toml, check the data")
        self.backward_and_step(loss, self.optimizer, self.network.parameters(), float(self.hparams().grad_clip))
        return {"loss": loss.detach().cpu().numpy()}

    def on_epoch_end(self):
        train_loss = self.logger.get_value("train_losses", step=-1)
        if np.isfinite(train_loss) and isinstance(self.lr_scheduler, PlateauScheduler):
            self.lr_scheduler.step_on(float(train_loss))
        super().on_epoch_end()

    def extra_checkpoint_state(self) -> dict:
        state = {"raters": self.raters}
        if isinstance(self.lr_scheduler, PlateauScheduler):
            state["plateau_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        if "plateau_scheduler" in state and isinstance(self.lr_scheduler, PlateauScheduler):
            self.lr_scheduler.load_state_dict(state["plateau_scheduler"])


VARIANTS = make_variants(nnUNetTrainerMoDiff)
globals().update(VARIANTS)
__all__ = ["nnUNetTrainerMoDiff", *sorted(VARIANTS)]
