"""Noise schedules, forward process, noise-prediction loss and the sampling loop (see core.py)."""
from .core import (PREDICTION_TYPES, SAMPLERS, NoiseSchedule, ScheduleConfig, inference_timesteps, masked_mse,
                   noise_prediction_loss, reverse_step, sample)

__all__ = ["PREDICTION_TYPES", "SAMPLERS", "NoiseSchedule", "ScheduleConfig", "inference_timesteps", "masked_mse",
           "noise_prediction_loss", "reverse_step", "sample"]
