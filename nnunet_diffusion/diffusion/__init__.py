"""Noise schedules, forward process, noise-prediction loss and the sampling loop (see core.py)."""
from .core import (SAMPLERS, NoiseSchedule, ScheduleConfig, inference_timesteps, noise_prediction_loss,
                   reverse_step, sample)

__all__ = ["SAMPLERS", "NoiseSchedule", "ScheduleConfig", "inference_timesteps", "noise_prediction_loss",
           "reverse_step", "sample"]
