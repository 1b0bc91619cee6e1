"""Stopping a training at its own plateau (issue 33): the rule, as a pure function of nnU-Net's own validation signal.

nnU-Net's trainer computes, at the end of every epoch, a pseudo Dice on patches of the fold's validation cases and its
exponential moving average ``ema_fg_dice`` (the signal behind ``checkpoint_best.pth``). A diffusion head's online
validation samples with its cheap ``val_sampler`` (one sample), so the signal costs little and is nnU-Net's, not ours.
Two rules read it, both off unless the trainer config sets them (``stop_plateau_steps``, ``stop_chance_steps``):

- **plateau**: the EMA has not risen more than ``stop_min_delta`` above its best-so-far for ``stop_plateau_steps``
  optimiser steps: the model has stopped learning, more steps would only cost time;
- **chance**: after ``stop_chance_steps`` optimiser steps the best EMA is still below ``stop_chance_dice``: the model has
  not started to segment (the equal-budget table's ε heads sat at 1–8 Dice from 400 to 2000 steps), and the run says so
  rather than spending the rest of its cap.

The trainer (``ConfiguredTrainer``) ends the training after the epoch at which a rule fires, exactly as nnU-Net ends
one at ``num_epochs`` (``on_train_end``: checkpoint_final.pth, then nnU-Net's final validation), and records the reason
in the checkpoint (key ``early_stop``), so ``--c`` on a stopped training trains nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class StopRule:
    plateau_steps: int = 0      # 0: off
    min_delta: float = 0.01
    chance_steps: int = 0       # 0: off
    chance_dice: float = 0.1

    @property
    def active(self) -> bool:
        return self.plateau_steps > 0 or self.chance_steps > 0


def last_improvement(history: Sequence[float], min_delta: float) -> int:
    """Index of the last epoch whose value rose more than ``min_delta`` above the best of the epochs before it (the
    first epoch counts as an improvement); -1 for an empty history. NaN values (an epoch without a pseudo Dice)
    never improve."""
    best, at = None, -1
    for i, v in enumerate(history):
        if v != v:  # NaN
            continue
        if best is None or v > best + min_delta:
            best, at = v, i
        elif v > best:
            best = v  # a rise within min_delta raises the bar but is not an improvement
    return at


def stop_reason(history: Sequence[float], steps_per_epoch: int, rule: StopRule, first_epoch: int = 0) -> Optional[str]:
    """Why training should stop after the last epoch of ``history`` (nnU-Net's ``ema_fg_dice`` per epoch, in [0, 1]),
    or None. Steps are optimiser steps: epochs x ``steps_per_epoch``; ``history`` starts at epoch ``first_epoch`` of
    the training (a head's last stage), whose earlier steps count towards ``chance_steps``."""
    epochs = len(history)
    if not rule.active or epochs == 0:
        return None
    steps = (first_epoch + epochs) * steps_per_epoch
    values = [v for v in history if v == v]
    best = max(values) if values else float("nan")
    if rule.chance_steps and steps >= rule.chance_steps and not best >= rule.chance_dice:
        return (f"chance: after {steps} optimiser steps the best EMA pseudo Dice is {best:.3f}, below "
                f"stop_chance_dice {rule.chance_dice:g} (the model has not started to segment)")
    if rule.plateau_steps:
        since = (epochs - 1 - last_improvement(history, rule.min_delta)) * steps_per_epoch
        if since >= rule.plateau_steps:
            return (f"plateau: the EMA pseudo Dice has not risen more than stop_min_delta {rule.min_delta:g} above "
                    f"its best ({best:.3f}) for {since} optimiser steps (stop_plateau_steps {rule.plateau_steps})")
    return None


class StopTraining(Exception):
    """Raised by ``ConfiguredTrainer.on_epoch_end`` when a rule fires; caught by its ``run_training``."""
