"""Predict-time options that ``nnUNetv2_predict`` has no flags for, read from environment variables
(nnU-Net does the same for its own options, e.g. nnUNet_compile). ``nndiff predict`` sets them from flags.

Values are checked when the network is built (when ``nnUNetv2_predict`` loads the model), so a bad value
stops the run before any case is touched, with a message naming the variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..diffusion import SAMPLERS
from ..errors import NNDiffConfigError

ENV_VARS = {
    "NNDIFF_REFINE": "1 = apply the diffusion refinement (default), 0 = return the nnU-Net backbone's output "
                     "unchanged (bit-identical to predicting with the backbone alone)",
    "NNDIFF_STEPS": "number of reverse diffusion steps K, 1..T (default: the trainer config's sampling_steps)",
    "NNDIFF_SAMPLER": "ddpm (ancestral, stochastic) or ddim (deterministic) (default: the trainer config's)",
    "NNDIFF_SAMPLES": "number of samples per window, >= 1: refinement samples averaged (NNDM), masks fused "
                      "(MedSegDiff, DDMD), diverse samples (MoDiff); ReCoSeg: 1 only (default: the trainer "
                      "config's)",
    "NNDIFF_SEED": "seed of the sampling noise, integer >= 0 (default 0); same seed, same prediction",
    "NNDIFF_TTA_REFINE": "with test-time mirroring: 'window' samples once per window and reuses the result, "
                         "flipped, for the mirrored passes (NNDM: every mirror still gets its own backbone pass) "
                         "(default); 'mirror' samples for every mirror (8x the sampling cost in 3D)",
    "NNDIFF_FUSION": "how several samples become one mask (heads that segment by sampling, e.g. MedSegDiff): "
                     "mean (default) or staple",
    "NNDIFF_MISSING": "ReCoSeg: comma-separated input channel indices to treat as missing (e.g. 1,3); other heads "
                      "refuse it (default: none missing)",
}
TTA_MODES = ("window", "mirror")
FUSIONS = ("mean", "staple")


@dataclass(frozen=True)
class SamplingOptions:
    refine: bool = True
    steps: int = 1000
    sampler: str = "ddpm"
    samples: int = 1
    seed: int = 0
    tta_refine: str = "window"
    fusion: str = "mean"
    missing: tuple = ()

    def validate(self, num_train_timesteps: int, source: str = "trainer config") -> "SamplingOptions":
        if not 1 <= self.steps <= num_train_timesteps:
            raise NNDiffConfigError(f"{source}: sampling steps must be in 1..{num_train_timesteps} (the model's "
                                    f"T); got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise NNDiffConfigError(f"{source}: sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if self.samples < 1:
            raise NNDiffConfigError(f"{source}: samples must be >= 1; got {self.samples}")
        if self.seed < 0:
            raise NNDiffConfigError(f"{source}: seed must be >= 0; got {self.seed}")
        if self.tta_refine not in TTA_MODES:
            raise NNDiffConfigError(f"{source}: tta_refine must be one of {', '.join(TTA_MODES)}; "
                                    f"got {self.tta_refine!r}")
        if self.fusion not in FUSIONS:
            raise NNDiffConfigError(f"{source}: fusion must be one of {', '.join(FUSIONS)}; got {self.fusion!r}")
        if any(int(m) < 0 for m in self.missing):
            raise NNDiffConfigError(f"{source}: missing channels must be indices >= 0; got {list(self.missing)}")
        return self


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise NNDiffConfigError(f"environment variable {name} must be an integer; got {raw!r}") from None


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise NNDiffConfigError(f"environment variable {name} must be 0 or 1; got {raw!r}")


def options_from_env(defaults: SamplingOptions, num_train_timesteps: int, environ=None) -> SamplingOptions:
    """``defaults`` (from the trainer config) overridden by the NNDIFF_* variables that are set."""
    env = os.environ if environ is None else environ
    over = {}
    if "NNDIFF_REFINE" in env:
        over["refine"] = _bool("NNDIFF_REFINE", env["NNDIFF_REFINE"])
    for key, name in (("steps", "NNDIFF_STEPS"), ("samples", "NNDIFF_SAMPLES"), ("seed", "NNDIFF_SEED")):
        if name in env:
            over[key] = _int(name, env[name])
    for key, name in (("sampler", "NNDIFF_SAMPLER"), ("tta_refine", "NNDIFF_TTA_REFINE"), ("fusion", "NNDIFF_FUSION")):
        if name in env:
            over[key] = env[name].strip().lower()
    if "NNDIFF_MISSING" in env:
        raw = env["NNDIFF_MISSING"]
        over["missing"] = tuple(sorted({_int("NNDIFF_MISSING", v) for v in raw.split(",") if v.strip()}))
    opts = replace(defaults, **over)
    if over:
        opts.validate(num_train_timesteps, source="environment (" + ", ".join(
            n for n in ENV_VARS if n in env) + ")")
    return opts.validate(num_train_timesteps)
