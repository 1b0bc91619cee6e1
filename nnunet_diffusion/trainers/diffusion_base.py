"""What the diffusion heads' trainers share on top of :class:`ConfiguredTrainer`.

- the noise schedule and the sampling options from the head's typed spec; the network records the prediction
  settings in the checkpoint, and NNDIFF_* (or ``nndiff predict``'s flags) override them at prediction time;
- online validation with the config's cheap ``val_sampler``/``val_sampling_steps``, the final validation
  exactly as ``nnUNetv2_predict`` would sample;
- the network learns whether its outputs are regions (a persistent buffer ``region_based``), because
  ``build_network_architecture`` is not told;
- torch.compile applied in place to the convolutional parts (``compiled_parts``), never to the whole
  module, whose forward holds the sampling loop;
- a non-finite loss stops training before the optimiser step, naming the last good checkpoint.
"""
from __future__ import annotations

from os.path import isfile, join

import torch

from .. import nnunet_compat
from ..diffusion import NoiseSchedule, ScheduleConfig
from ..errors import NNDiffTrainingError
from ..inference.options import SamplingOptions
from .base import ConfiguredTrainer


class DiffusionTrainer(ConfiguredTrainer):
    compiled_parts: tuple = ()

    @classmethod
    def schedule(cls) -> NoiseSchedule:
        hp = cls.hparams()
        return NoiseSchedule(ScheduleConfig(int(hp.num_train_timesteps), hp.beta_schedule,
                                            float(hp.beta_start), float(hp.beta_end)))

    @classmethod
    def sampling_defaults(cls, validation: bool = False) -> SamplingOptions:
        """The trainer config's prediction settings (``validation``: its cheap online-validation sampler, one
        sample). The network records the prediction settings in its state dict, so a checkpoint keeps them."""
        hp = cls.hparams()
        if validation:
            return SamplingOptions(steps=hp.val_sampling_steps, sampler=hp.val_sampler, samples=1,
                                   tta_refine=hp.tta_refine, fusion=hp.fusion)
        return SamplingOptions(steps=hp.sampling_steps, sampler=hp.sampler, samples=hp.num_samples,
                               tta_refine=hp.tta_refine, fusion=hp.fusion)

    @classmethod
    def predict_sampling(cls, num_train_timesteps: int) -> SamplingOptions:
        """The settings a network built now records (the trainer config's; the user's NNDIFF_* / ``nndiff predict``
        overrides are the network's own, laid over the recorded settings)."""
        return cls.sampling_defaults().validate(num_train_timesteps)

    def validation_sampling(self) -> SamplingOptions:
        """Online validation (pseudo Dice, checkpoint_best): the config's cheap settings, no NNDIFF_*."""
        return self.sampling_defaults(validation=True).validate(
            self.unwrapped_network().schedule.num_train_timesteps)

    # ------------------------------------------------------------------ nnU-Net hooks
    def initialize(self):
        super().initialize()
        net = self.unwrapped_network()
        net.region_based.fill_(int(self.label_manager.has_regions))
        if nnunet_compat.nnunet_would_compile(self) and self.compiled_parts:
            self.print_to_log_file(f"Using torch.compile on {', '.join(self.compiled_parts)} (in place)")
            self.compile_parts()

    def compile_parts(self, **options) -> None:
        """torch.compile each of ``compiled_parts`` in place (``nn.Module.compile``, so the state-dict keys stay
        plain); ``options`` go to torch.compile. ``initialize()`` calls it where nnU-Net would compile (CUDA,
        nnUNet_compile not off); ``benchmarks.compile_check`` also calls it on the CPU."""
        net = self.unwrapped_network()
        for part in self.compiled_parts:
            getattr(net, part).compile(**options)

    def _do_i_compile(self):
        # the network's forward holds Python control flow (stages, the sampling loop); compiling it whole would
        # unroll the sampler. initialize() compiles the convolutional parts in place instead (same state_dict
        # keys, so checkpoints stay loadable without torch.compile).
        return False

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.unwrapped_network().set_sampling(self.validation_sampling())

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        self._set_predict_sampling()

    def _set_predict_sampling(self):
        self.unwrapped_network().set_sampling(None)  # the recorded settings with the user's NNDIFF_* overrides

    def perform_actual_validation(self, save_probabilities: bool = False):
        # the final validation predicts exactly as nnUNetv2_predict would (config + NNDIFF_* variables)
        self._set_predict_sampling()
        super().perform_actual_validation(save_probabilities)

    def backward_and_step(self, loss: torch.Tensor, optimizer, parameters, grad_clip: float,
                          before_step=None) -> None:
        """Backward, gradient-norm clipping of ``parameters`` and one step of ``optimizer``, through nnU-Net's
        grad scaler when AMP is on (CUDA). ``before_step`` (no arguments) runs between clipping and the step."""
        parameters = list(parameters)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            if before_step is not None:
                before_step()
            self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            if before_step is not None:
                before_step()
            optimizer.step()

    def stop_on_non_finite(self, where: str, losses: dict, hint: str):
        """Raise NNDiffTrainingError naming the non-finite loss and the last good checkpoint(s)."""
        bad = [k for k, v in losses.items() if v is not None and not torch.isfinite(v)]
        shown = ", ".join(f"{k}={'-' if v is None else f'{float(v.detach()):.4g}'}" for k, v in losses.items())
        good = []
        for f in ("checkpoint_latest.pth", "checkpoint_best.pth"):
            path = join(self.output_folder, f) if self.output_folder else None
            if path and isfile(path):
                epoch = torch.load(path, map_location="cpu", weights_only=False)["current_epoch"]
                good.append(f"{f} (epoch {epoch})")
        raise NNDiffTrainingError(
            f"{where}, epoch {self.current_epoch}: the {' and '.join(bad) or 'total'} loss is not finite ({shown}). "
            f"Training stopped before the optimiser step, so no weights were changed. Last good checkpoint(s) in "
            f"{self.output_folder}: {', '.join(good) if good else 'none written yet'}. Resume with --c after "
            f"fixing the cause ({hint}).")
