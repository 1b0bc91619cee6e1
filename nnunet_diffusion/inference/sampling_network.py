"""What every module nnU-Net's predictor calls for a diffusion head shares: the sampling options, the
persistent ``region_based`` flag (``build_network_architecture`` is not told whether the dataset has regions;
the checkpoint is), and the :class:`MirrorCache` that is cleared whenever the result could change."""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Optional

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..errors import NNDiffCheckpointError, NNDiffConfigError
from .mirror_cache import MirrorCache
from .options import Overrides, SamplingOptions, current_overrides

EXTRA_STATE = "_extra_state"  # torch's state-dict key of a module's get_extra_state()


class SamplingNetwork(nn.Module):
    """Prediction settings, in order of precedence: a whole :class:`SamplingOptions` pinned by :meth:`set_sampling`
    (a trainer's online validation, a benchmark's sweep); the user's :class:`Overrides` (``NNDIFF_*`` variables, or
    ``nndiff predict``'s flags), laid over the settings the model was trained with. Those are part of the network's
    state dict (``get_extra_state``), so a checkpoint predicts with the sampler of its trainer config at training time
    even after trainer_configs/ changed; a checkpoint written before checkpoints recorded them predicts with the
    trainer config of today, and says so."""
    supports_missing = False  # whether the head can predict with input channels missing (NNDIFF_MISSING)
    supports_samples = True   # whether the head can draw several samples per window (NNDIFF_SAMPLES > 1)

    def __init__(self, schedule: NoiseSchedule, sampling: SamplingOptions, region_based: bool = False,
                 overrides: Optional[Overrides] = None):
        super().__init__()
        self.schedule = schedule
        self.recorded = sampling  # the trainer config's settings; a checkpoint's replace them when it is loaded
        self.recorded_from = "trainer config"
        self.overrides = current_overrides() if overrides is None else overrides
        self.pinned: Optional[SamplingOptions] = None
        self.sampling = self._resolve(self.pinned)
        self.register_buffer("region_based", torch.tensor(int(region_based), dtype=torch.uint8))
        self._mirror_cache = MirrorCache()
        self._announced = None

    @property
    def has_regions(self) -> bool:
        return bool(self.region_based.item())

    def cached(self, x: torch.Tensor, compute):
        """``compute()`` once per window; its mirrored passes reuse it when tta_refine is 'window'."""
        return self._mirror_cache.get_or_compute(x, compute, enabled=self.sampling.tta_refine == "window")

    def _checked(self, sampling: SamplingOptions) -> SamplingOptions:
        if sampling.missing and not self.supports_missing:
            raise NNDiffConfigError(f"NNDIFF_MISSING={','.join(map(str, sampling.missing))}: "
                                    f"{type(self).__name__} cannot predict with missing input channels (only "
                                    f"ReCoSeg can); unset NNDIFF_MISSING")
        if sampling.samples > 1 and not self.supports_samples:
            raise NNDiffConfigError(f"NNDIFF_SAMPLES={sampling.samples}: {type(self).__name__} draws one sample per "
                                    f"window (one synthesis, as in its paper); set NNDIFF_SAMPLES=1 or unset it")
        return sampling

    def _resolve(self, pinned: Optional[SamplingOptions]) -> SamplingOptions:
        """The settings that predict with ``pinned`` (None: the recorded settings with the user's overrides);
        nothing is changed."""
        if pinned is not None:
            return self._checked(pinned)
        return self._checked(self.overrides.apply(self.recorded, self.schedule.num_train_timesteps))

    def set_sampling(self, sampling: Optional[SamplingOptions]) -> None:
        """Pin ``sampling`` (every field; checkpoint settings and overrides ignored until unpinned), or unpin with
        None (back to the recorded settings with the user's overrides). A refused setting changes nothing."""
        self.sampling = self._resolve(sampling)
        self.pinned = sampling
        self._mirror_cache.clear()

    # ------------------------------------------------------------------ the settings a checkpoint records
    def get_extra_state(self) -> dict:
        return {"format": 1, "sampling": asdict(self.recorded)}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "sampling" not in state:  # a checkpoint from before they were recorded
            self.recorded_from = "trainer config of today (the checkpoint records no prediction settings)"
        else:
            values = dict(state["sampling"])
            values["missing"] = tuple(values.get("missing", ()))
            known = {f.name for f in fields(SamplingOptions)}
            self.recorded = SamplingOptions(**{k: v for k, v in values.items() if k in known})
            self.recorded_from = "checkpoint"
        self.sampling = self._resolve(self.pinned)
        self._announce()

    def _announce(self) -> None:
        """One line saying which prediction settings are used and where each came from (once per change)."""
        o, sources = self.sampling, self.overrides.sources()
        if self.pinned is not None:
            where = {f: "set by the caller" for f in sources} or {}
            default = "set by the caller"
        else:
            where, default = sources, self.recorded_from
        key = (o, tuple(sorted(where.items())), default)
        if key == self._announced:
            return
        self._announced = key
        parts = [f"{f.name}={getattr(o, f.name)!r} ({where.get(f.name, default)})" for f in fields(o)]
        print(f"nnunet_diffusion: {type(self).__name__} predicts with " + ", ".join(parts), flush=True)

    def train(self, mode: bool = True):
        self._mirror_cache.clear()
        return super().train(mode)

    # a subclass that sets these explains weights that do not fit with an NNDiffCheckpointError instead of
    # torch's key list: "<weights_name> weights do not fit this network: <what differs>. <weights_hint>"
    weights_name: str | None = None
    weights_hint: str = ""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._mirror_cache.clear()  # e.g. nnU-Net's predictor loading the next fold's weights
        if EXTRA_STATE not in state_dict:  # written before checkpoints recorded their prediction settings
            state_dict = dict(state_dict, **{EXTRA_STATE: None})
        if strict and self.weights_name is not None:
            own = self.state_dict()
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            wrong = [k for k in own if k in state_dict and torch.is_tensor(own[k])
                     and tuple(state_dict[k].shape) != tuple(own[k].shape)]
            if missing or unexpected or wrong:
                raise NNDiffCheckpointError(self.describe_weight_mismatch(missing, unexpected, wrong))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe_weight_mismatch(self, missing: list, unexpected: list, wrong: list) -> str:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) have other shapes (first: {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} expected key(s) missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
        return f"{self.weights_name} weights do not fit this network: " + "; ".join(parts) + ". " + self.weights_hint
