"""nnUNetTrainerMedSegDiff: MedSegDiff (Wu et al.) on nnU-Net's plans, data pipeline and predictor.

The network is a diffusion model over the segmentation mask (no nnU-Net segmentation network): MedSegDiff's
two-encoder denoiser (eqs. 2–6) trained with eq. 7 on nnU-Net's augmented patches, AdamW at 1e-4 (paper
§III-B) with nnU-Net's poly decay. The size variant (S/B/L/++: 4/5/6/6 downsamplings) is capped by the
number of stages nnU-Net planned for the patch; widths are the plans' features per stage × ``width``; residual
blocks per stage from :func:`default_blocks` unless ``blocks`` is set. The FF-Parsers filter the x_t encoder's
features before they are fused with the image's (``ff_parser_on = "mask"``, as the authors' code; see
nets/medsegdiff.py); ``_ffSkip`` filters the fused decoder skips instead. By default the denoiser also has the
authors' ``cal`` output, trained with their ×10 MSE term and blended with the sample at inference (heads/medsegdiff.py);
``_paperText`` trains and samples as the paper's text alone.
"""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.helpers import dummy_context

from ..errors import NNDiffConfigError
from ..heads.common import target_channels
from ..inference.medsegdiff_network import MedSegDiffNetwork
from ..heads.medsegdiff import DOWNSAMPLINGS
from ..nets.medsegdiff import MedSegDiffUNet
from .base import make_variants
from .diffusion_base import DiffusionTrainer

RESNET34_BLOCKS = (3, 4, 6, 3)  # §II-C: residual blocks per stage "following that of ResNet34"


def default_blocks(n: int) -> list[int]:
    """Residual blocks per stage for n stages (n − 1 separate encoder stages, then the shared last one).

    §II-C gives ResNet34's counts for a four-stage encoder (three separate stages, 3/4/6, then the last, 3), while
    §III-B's sizes have 4/5/6 downsamplings, i.e. 5/6/7 stages here (one per planned stride). The paper does not
    say how the extra stages are filled; ours: they repeat ResNet34's third-stage count, as deeper ResNets grow
    their third stage. So S/B/L on plans deep enough: 3/4/6/6 + 3, 3/4/6/6/6 + 3, 3/4/6/6/6/6 + 3."""
    return [RESNET34_BLOCKS[min(i, 2)] for i in range(n - 1)] + [RESNET34_BLOCKS[3]]


class nnUNetTrainerMedSegDiff(DiffusionTrainer):
    """MedSegDiff-B with the paper's settings (trainer_configs/medsegdiff.toml [defaults])."""
    head = "medsegdiff"
    compiled_parts = ("denoiser",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # a diffusion model over the mask has one full-resolution output
        self.initial_lr = float(self.hparams().lr)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> MedSegDiffNetwork:
        hp = cls.hparams()
        pools = [tuple(s) for s in configuration_manager.pool_op_kernel_sizes]
        n = min(len(pools), DOWNSAMPLINGS[hp.size] + 1)
        if n < 3:
            raise NNDiffConfigError(f"MedSegDiff needs at least 2 downsamplings; the plans of this configuration "
                                    f"have {len(pools) - 1}")
        features = configuration_manager.network_arch_init_kwargs["features_per_stage"][:n]
        channels = [max(8, int(round(f * float(hp.width)))) for f in features]
        blocks = list(hp.blocks) if hp.blocks else default_blocks(n)
        if len(blocks) < n:
            blocks = blocks + [blocks[-1]] * (n - len(blocks))
        denoiser = MedSegDiffUNet(len(configuration_manager.patch_size), num_input_channels, num_output_channels,
                                  channels, pools[1:n], blocks[:n], configuration_manager.patch_size,
                                  bool(hp.dynamic_conditioning), bool(hp.ff_parser),
                                  ff_parser_on=str(hp.ff_parser_on), cal_head=hp.cal_head)
        schedule = cls.schedule()
        return MedSegDiffNetwork(denoiser, schedule, cls.predict_sampling(schedule.num_train_timesteps),
                                 num_output_channels, prediction_type=hp.prediction_type, output=hp.output,
                                 cal_weight=hp.cal_weight)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # no deep supervision: nothing to switch

    def configure_optimizers(self):
        hp = self.hparams()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr,
                                      weight_decay=float(hp.weight_decay))
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        y, mask = target_channels(target, self.label_manager.num_segmentation_heads, self.label_manager.has_regions,
                                  self.label_manager.ignore_label)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            # under DDP the loss must come through the wrapper's forward (gradient sync); the terms are named only
            # for the non-finite message
            terms = None if self.is_ddp else self.unwrapped_network().losses(data, y, mask)
            loss = self.network(data, y=y, mask=mask) if terms is None else terms["total"]
        if not torch.isfinite(loss):
            shown = {"L (eq. 7)": terms["diffusion"], "L_cal (authors' code)": terms.get("cal")} if terms else {}
            self.stop_on_non_finite("MedSegDiff", {**shown, "L total": loss}, "e.g. lower lr in trainer_configs/"
                                                                               "medsegdiff.toml, check the data")
        self.backward_and_step(loss, self.optimizer, self.network.parameters(), float(self.hparams().grad_clip))
        return {"loss": loss.detach().cpu().numpy()}


VARIANTS = make_variants(nnUNetTrainerMedSegDiff)
globals().update(VARIANTS)
__all__ = ["nnUNetTrainerMedSegDiff", *sorted(VARIANTS)]
