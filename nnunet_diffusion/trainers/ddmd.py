"""nnUNetTrainerDDMD: DDMD (Fan, Cai, Niranjan, arXiv 2405.04974) on nnU-Net's plans, data pipeline and
predictor (3d_fullres or 2d, regions or labels; the paper: 2D middle slices, binary masks).

Stages by epoch (trainer_configs/ddmd.toml):
  1. ``ae_epochs``: the 2L autoencoders — AE-1 on every image (eq. 9; with ``ae1_balanced`` the batch's normal
     and abnormal images weigh half each, the paper's balanced set, §4.1), AE-2 on the normal ones (eq. 10) —
     with one Adam optimiser at the paper's fixed 1e-4. An image is the patch, or with ``ae_input = "slices"``
     each slice of the patch along its first axis (2D autoencoders, the paper's axial slices, on a 3D plan).
     The image-level label comes from the image's own ground truth inside ``train_step`` (no extra files); see
     ``ae2_normal`` in the config for what "normal" means. AE-2's step is skipped for a batch without a normal
     image, and the log counts those batches.
  2. ``diffusion_epochs``: the diffusion segmenter (Algorithm 1, eqs. 14–16), Adam at the paper's fixed 1e-4,
     with X and Y (eqs. 11–13) computed per batch from the frozen autoencoders.
``--c`` resumes in either stage (stage epochs, the autoencoders' optimiser and their update counts are in the
checkpoint). With ``NNDIFF_DDMD_AES`` (a DDMD checkpoint, model folder or trainer name of the same plans,
configuration and fold) stage 1 is skipped and the autoencoders start from that checkpoint, e.g. to train
DDMD and DDMD-light on the same autoencoders. DDMD-mini (no X, Y) has no autoencoders and no stage 1.

The network is :class:`~nnunet_diffusion.inference.ddmd_network.DDMDNetwork`; nnUNetv2_predict samples with it
(Algorithm 2, five masks averaged, §5.1).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.utilities.helpers import dummy_context

from .. import nnunet_compat
from ..errors import NNDiffCheckpointError, NNDiffConfigError, NNDiffTrainingError
from ..heads import ddmd
from ..heads.common import target_channels
from ..inference.ddmd_network import DDMDNetwork
from ..nets import TimeConditionedUNet
from ..nets.ddmd import AutoencoderEnsemble, encoder_strides
from .base import checkpoint_origin_problems, make_variants, resolve_checkpoint
from .diffusion_base import DiffusionTrainer
from ..variables import DDMD_AES as AES_ENV

STAGE_NAMES = {1: "autoencoders", 2: "diffusion"}


class StagedConstantLR:
    """The paper's fixed learning rates (§4.3), per stage: stage 1 the autoencoders' Adam at ``ae_lr`` (the
    denoiser's at 0), stage 2 the denoiser's Adam at ``lr`` (the autoencoders' at 0). ``step(epoch)`` is called
    by nnU-Net's on_train_epoch_start."""

    def __init__(self, trainer: "nnUNetTrainerDDMD"):
        self.trainer = trainer

    def step(self, epoch: int) -> None:
        tr, hp = self.trainer, self.trainer.hparams()
        stage = tr.stage_of(epoch)
        for g in tr.optimizer.param_groups:
            g["lr"] = float(hp.lr) if stage == 2 else 0.0
        if tr.ae_optimizer is not None:
            for g in tr.ae_optimizer.param_groups:
                g["lr"] = float(hp.ae_lr) if stage == 1 else 0.0


class nnUNetTrainerDDMD(DiffusionTrainer):
    """DDMD with the paper's hyper-parameters (trainer_configs/ddmd.toml [defaults])."""
    head = "ddmd"
    compiled_parts = ("denoiser",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        hp = self.hparams()
        self.enable_deep_supervision = False  # a diffusion model over the mask has one full-resolution output
        self.initial_lr = float(hp.lr)
        self.uses_autoencoders = bool(hp.inter_discrepancy) or bool(hp.intra_discrepancy)
        self.ae_checkpoint = self._resolve_ae_source(os.environ.get(AES_ENV)) if self.uses_autoencoders else None
        ae_epochs = int(hp.ae_epochs) if self.uses_autoencoders and not self.ae_checkpoint else 0
        if self.uses_autoencoders and not self.ae_checkpoint and ae_epochs < 1:
            raise NNDiffConfigError(f"{self.__class__.__name__}: the discrepancy features need trained "
                                    f"autoencoders, but ae_epochs = {hp.ae_epochs} and {AES_ENV} is not set")
        self.stage_epochs = [ae_epochs, int(hp.diffusion_epochs)]
        if self.stage_epochs[1] < 1:
            raise NNDiffConfigError(f"{self.__class__.__name__}: diffusion_epochs must be >= 1; "
                                    f"got {self.stage_epochs[1]}")
        self.num_epochs = sum(self.stage_epochs)
        self.ae_optimizer = None
        self._resumed = False
        for key in ("ddmd_stage", "ddmd_ae1_losses", "ddmd_ae2_losses", "ddmd_normal_fraction"):
            nnunet_compat.register_log_key(self, key)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> DDMDNetwork:
        """AE-1, AE-2 (L autoencoders each, sized from the planned patch and strides) and the denoiser
        ε_θ(b ⊕ X ⊕ Y ⊕ x_t, t); also what nnUNetv2_predict builds."""
        hp = cls.hparams()
        patch = [int(p) for p in configuration_manager.patch_size]
        dim = len(patch)
        pools = [tuple(int(v) for v in s) for s in configuration_manager.pool_op_kernel_sizes]
        use_inter, use_intra = bool(hp.inter_discrepancy), bool(hp.intra_discrepancy)
        if hp.ae_input == "slices" and dim == 3:  # 2D autoencoders on the patch's slices: in-plane size and strides
            ae_args = (2, num_input_channels, patch[1:], encoder_strides([p[1:] for p in pools[1:]], 2))
        else:
            ae_args = (dim, num_input_channels, patch, encoder_strides(pools[1:], dim))
        ae_kwargs = {"channels": hp.ae_channels, "fc": hp.ae_fc}
        size = int(hp.ensemble_size)
        ae1 = AutoencoderEnsemble(size, *ae_args, **ae_kwargs) if use_inter else None
        ae2 = AutoencoderEnsemble(size, *ae_args, **ae_kwargs) if use_inter or use_intra else None
        levels = int(hp.denoiser_levels)
        n = min(len(pools), levels)
        features = configuration_manager.network_arch_init_kwargs["features_per_stage"][:n]
        channels = [max(8, int(round(f * float(hp.denoiser_width)))) for f in features]
        in_channels = num_input_channels + int(use_inter) + int(use_intra) + num_output_channels  # eq. 15
        denoiser = TimeConditionedUNet(dim, in_channels, num_output_channels, channels, pools[1:n],
                                       int(hp.denoiser_res_blocks))
        schedule = cls.schedule()
        return DDMDNetwork(ae1, ae2, denoiser, schedule, cls.predict_sampling(schedule.num_train_timesteps),
                           num_output_channels, use_inter, use_intra, prediction_type=hp.prediction_type)

    def stage_batches(self, batch: dict) -> list[tuple[str, int, dict]]:
        (_, _, b), = super().stage_batches(batch)  # one full-resolution target for both stages
        return [("stage 1 (autoencoders)", 0, b), ("stage 2 (diffusion)", self.stage_epochs[0], b)]

    def stage_of(self, epoch: int) -> int:
        return 1 if epoch < self.stage_epochs[0] else 2

    def stop_history_start(self) -> int:
        """The stop rules (issue 33) read the pseudo Dice of the diffusion stage: the autoencoders segment nothing."""
        return self.stage_epochs[0]

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # no deep supervision: nothing to switch

    # ------------------------------------------------------------------ autoencoders from another run
    def _resolve_ae_source(self, value):
        """NNDIFF_DDMD_AES: a checkpoint file, a model folder or a DDMD trainer's name (see ``resolve_checkpoint``)."""
        return resolve_checkpoint(value, self, AES_ENV, "DDMD")

    def _load_autoencoders(self) -> None:
        path = self.ae_checkpoint
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        problems = checkpoint_origin_problems(
            ckpt, self, "autoencoders trained on another fold have seen this fold's validation cases")
        net = self.unwrapped_network()
        own = {k: v for k, v in net.state_dict().items() if k.startswith(("ae1.", "ae2."))}
        weights = ckpt.get("network_weights", {})
        if any(k not in weights or tuple(weights[k].shape) != tuple(v.shape) for k, v in own.items()):
            problems.append(f"its autoencoders (trainer {ckpt.get('trainer_name')!r}) do not match this variant's "
                            f"(ensemble size, widths, ae_input, or DDMD-light/-mini without AE-1/AE-2)")
        elif any(int(weights[k]) == 0 for k in own if k.endswith(".updates")):
            problems.append("its autoencoders were never trained")
        if problems:
            raise NNDiffCheckpointError(f"{AES_ENV}: {path} cannot give DDMD its autoencoders: " + "; ".join(problems))
        net.load_state_dict({**net.state_dict(), **{k: weights[k] for k in own}})
        self.print_to_log_file(f"DDMD: autoencoders loaded from {path} (trainer {ckpt.get('trainer_name')}); "
                               f"stage 1 skipped")

    # ------------------------------------------------------------------ nnU-Net hooks
    def configure_optimizers(self):
        net = self.network  # not yet wrapped in DDP/compile when nnU-Net calls this
        hp = self.hparams()
        optimizer = torch.optim.Adam(net.denoiser.parameters(), lr=float(hp.lr))
        aes = [p for m in net.autoencoders for p in m.parameters()]
        self.ae_optimizer = torch.optim.Adam(aes, lr=float(hp.ae_lr)) if aes else None
        return optimizer, StagedConstantLR(self)

    def on_train_start(self):
        super().on_train_start()
        if self.ae_checkpoint and not self._resumed and self.current_epoch == 0:
            self._load_autoencoders()
        elif os.environ.get(AES_ENV) and self._resumed:
            self.print_to_log_file(f"{AES_ENV} ignored: resuming from a checkpoint")
        hp = self.hparams()
        feats = " + ".join(["b"] + ["X"] * bool(hp.inter_discrepancy) + ["Y"] * bool(hp.intra_discrepancy))
        self.print_to_log_file(f"DDMD stages (epochs): autoencoders {self.stage_epochs[0]}, diffusion "
                               f"{self.stage_epochs[1]}; conditioning {feats}; AE-2 normal: {hp.ae2_normal}; "
                               f"autoencoders' images: {self._image_name(plural=True)}")
        if hp.ae2_normal == "voxel" and self.stage_epochs[0] > 0:
            self.print_to_log_file("DDMD: ae2_normal = 'voxel' (ours, not the paper's): AE-2 sees tumour voxels as "
                                   "input and is only left out of the loss there; the paper's regime is "
                                   "ae2_normal = 'patch' on axial slices: ae_input = 'slices' on 3d_fullres, or the "
                                   "2d configuration (see trainer_configs/ddmd.toml)")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        stage = self.stage_of(self.current_epoch)
        if stage == 2 and self.current_epoch == self.stage_epochs[0]:
            self._enter_diffusion_stage()
        lr = self.ae_optimizer.param_groups[0]["lr"] if stage == 1 else self.optimizer.param_groups[0]["lr"]
        self.print_to_log_file(f"DDMD stage {stage} ({STAGE_NAMES[stage]}), learning rate {lr:.2e}")
        self.logger.log("ddmd_stage", stage, self.current_epoch)

    def _enter_diffusion_stage(self):
        net = self.unwrapped_network()
        untrained = [name for name, m in (("AE-1", net.ae1), ("AE-2", net.ae2))
                     if m is not None and int(m.updates) == 0]
        if untrained:
            hint = (f"no {self._image_name()} of the training data was normal (free of tumour) under ae2_normal = "
                    f"'patch'; on 3d_fullres BraTS patches nearly always hold tumour: use ae_input = 'slices' (the "
                    f"paper's axial slices inside the 3D patches: the variant _slices), the 2d configuration, a "
                    f"positive normal_max_tumour_fraction, or the variant _voxel") \
                if untrained == ["AE-2"] else "stage 1 made no optimiser step"
            raise NNDiffTrainingError(f"DDMD: {' and '.join(untrained)} never trained in stage 1 ({hint}). The "
                                      f"discrepancy features would be meaningless, so the diffusion stage does not "
                                      f"start.")
        # checkpoint_best is chosen by the pseudo Dice of the segmenter, which stage 1 does not train
        nnunet_compat.set_best_ema(self, None)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (target[0] if isinstance(target, list) else target).to(self.device, non_blocking=True)
        y, mask = target_channels(target, self.label_manager.num_segmentation_heads, self.label_manager.has_regions,
                                  self.label_manager.ignore_label)
        if self.stage_of(self.current_epoch) == 1:
            return self._autoencoder_step(*self.autoencoder_images(data, y, mask))
        return self._diffusion_step(data, y, mask)

    def _image_name(self, plural: bool = False) -> str:
        sliced = self.hparams().ae_input == "slices" and len(self.configuration_manager.patch_size) == 3
        return ("slices" if plural else "slice") if sliced else ("patches" if plural else "patch")

    def autoencoder_images(self, data, y, mask):
        """Stage 1's images with their targets: the patches, or with 2D autoencoders on 3D patches (``ae_input =
        "slices"``) every slice of them along the first axis (``heads.ddmd.to_slices``), the all-zero ones left out
        (``has_image``: padding or air, no brain; all of them kept in the odd batch with none other)."""
        net = self.unwrapped_network()
        if not net.sliced(data):
            return data, y, mask
        data, y = ddmd.to_slices(data), ddmd.to_slices(y)
        mask = None if mask is None else ddmd.to_slices(mask)
        keep = ddmd.has_image(data)
        if bool(keep.any()) and not bool(keep.all()):
            data, y, mask = data[keep], y[keep], (None if mask is None else mask[keep])
        return data, y, mask

    def _autoencoder_step(self, data, y, mask) -> dict:
        hp = self.hparams()
        regions = self.label_manager.has_regions
        normal, voxels, weights = None, None, None
        abnormal = ddmd.image_labels(y, regions, mask, float(hp.normal_max_tumour_fraction))
        if hp.ae2_normal == "voxel":
            voxels = ~ddmd.tumour_voxels(y, regions, mask)
            if mask is not None:
                voxels = voxels & (mask > 0.5)
        else:
            normal = ~abnormal
            if hp.ae1_balanced:  # §4.1: AE-1's mixture is half normal, half abnormal
                weights = ddmd.balanced_weights(abnormal)
        net = self.unwrapped_network()
        self.ae_optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            l1, l2, (mse1, mse2), zero = self.network(data, mode="ae", normal=normal, ae2_voxels=voxels,
                                                      tie_frozen=self.is_ddp, ae1_weights=weights)
        terms = [v for v in (l1, l2) if v is not None]
        if any(not torch.isfinite(v) for v in terms):
            self.stop_on_non_finite("DDMD stage 1", {"L_AE-1 (eq. 9)": l1, "L_AE-2 (eq. 10)": l2},
                                    "e.g. lower ae_lr in trainer_configs/ddmd.toml, check the data")
        loss = sum(terms, zero)
        ae2_trained = l2 is not None
        if self.is_ddp:  # all ranks step AE-2 together (its gradients are averaged across them)
            flag = torch.tensor([int(ae2_trained)], device=self.device)
            dist.all_reduce(flag)
            ae2_trained = bool(flag.item())
        if loss.requires_grad:
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
            if net.ae2 is not None and not ae2_trained:
                for p in net.ae2.parameters():
                    p.grad = None  # Adam skips parameters without gradient: no step, moments unchanged
            if self.grad_scaler is not None:
                self.grad_scaler.step(self.ae_optimizer)
                self.grad_scaler.update()
            else:
                self.ae_optimizer.step()
        if net.ae1 is not None:
            net.ae1.updates += 1
        if ae2_trained:
            net.ae2.updates += 1
        nan = np.float32(np.nan)
        return {"loss": loss.detach().float().cpu().numpy(),
                "ae1_loss": nan if mse1 is None else mse1.mean().cpu().numpy(),
                "ae2_loss": nan if mse2 is None else mse2.mean().cpu().numpy(),
                "normal": np.float32((~abnormal).float().mean().item()),
                "ae2_skipped": nan if hp.ae2_normal == "voxel" else np.float32(l2 is None)}

    def _diffusion_step(self, data, y, mask) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss, zero = self.network(data, y=y, mask=mask, mode="diffusion", tie_frozen=self.is_ddp)
        if not torch.isfinite(loss):
            self.stop_on_non_finite("DDMD stage 2", {"L_simple (eq. 16)": loss},
                                    "e.g. lower lr in trainer_configs/ddmd.toml, check the data")
        total = loss + zero
        net = self.unwrapped_network()
        self.backward_and_step(total, self.optimizer, net.denoiser.parameters(), float(self.hparams().grad_clip))
        net.denoiser_updates += 1
        nan = np.float32(np.nan)
        return {"loss": loss.detach().float().cpu().numpy(), "ae1_loss": nan, "ae2_loss": nan, "normal": nan,
                "ae2_skipped": nan}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.stage_of(self.current_epoch) != 1:
            return
        values = {}
        for key, name in (("ae1_loss", "ddmd_ae1_losses"), ("ae2_loss", "ddmd_ae2_losses"),
                          ("normal", "ddmd_normal_fraction")):
            v = np.array([float(o[key]) for o in train_outputs])
            values[key] = float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
            self.logger.log(name, values[key], self.current_epoch)
        hp = self.hparams()
        images = self._image_name(plural=True)
        if hp.ae2_normal == "voxel":
            normal = f"non-tumour voxels of every {self._image_name()}"
        else:
            skipped = int(np.nansum([float(o["ae2_skipped"]) for o in train_outputs]))
            normal = (f"normal {images} only: {values['normal']:.0%} of this epoch's {images} on this rank; "
                      f"{skipped} of its {len(train_outputs)} batches had none, AE-2 skipped them")
        self.print_to_log_file(f"DDMD L_AE-1 (eq. 9) {values['ae1_loss']:.4f}, L_AE-2 (eq. 10) "
                               f"{values['ae2_loss']:.4f} (mean MSE per autoencoder; AE-2 learns from the {normal})")
        if hp.ae2_normal == "patch" and self.unwrapped_network().ae2 is not None \
                and int(self.unwrapped_network().ae2.updates) == 0:
            self.print_to_log_file(f"DDMD WARNING: AE-2 has not seen a single normal {self._image_name()} yet (see "
                                   f"ae2_normal in trainer_configs/ddmd.toml); the diffusion stage will not start "
                                   f"without it")

    def validation_step(self, batch: dict) -> dict:
        if self.stage_of(self.current_epoch) == 2:
            return super().validation_step(batch)
        # stage 1: the segmenter is not trained yet, so no sampling; the validation loss is AE-1's (or AE-2's)
        # reconstruction error and the pseudo Dice 0 (checkpoint_best is chosen again from stage 2 on)
        data = batch["data"].to(self.device, non_blocking=True)
        net = self.unwrapped_network()
        ae = net.ae1 if net.ae1 is not None else net.ae2
        loss, _ = ddmd.ae_loss(ae, net.ae_images(data))
        n = self.label_manager.num_segmentation_heads - (0 if self.label_manager.has_regions else 1)
        zeros = np.zeros(n)
        return {"loss": (loss / len(ae)).detach().float().cpu().numpy(), "tp_hard": zeros, "fp_hard": zeros,
                "fn_hard": np.ones(n)}

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        return {"ddmd_stage_epochs": list(self.stage_epochs), "ddmd_ae_checkpoint": self.ae_checkpoint,
                "ae_optimizer_state": None if self.ae_optimizer is None else self.ae_optimizer.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        if "ddmd_stage_epochs" not in state:
            raise NNDiffCheckpointError("checkpoint has no DDMD state (stage epochs, autoencoders' optimiser)")
        if self.ae_optimizer is not None and state.get("ae_optimizer_state") is not None:
            self.ae_optimizer.load_state_dict(state["ae_optimizer_state"])
        self.stage_epochs = list(state["ddmd_stage_epochs"])
        self.num_epochs = sum(self.stage_epochs)
        self.ae_checkpoint = state.get("ddmd_ae_checkpoint")
        self._resumed = True


VARIANTS = make_variants(nnUNetTrainerDDMD)
globals().update(VARIANTS)
__all__ = ["nnUNetTrainerDDMD", *sorted(VARIANTS)]
