"""Predict-time options that ``nnUNetv2_predict`` has no flags for, read from environment variables
(nnU-Net does the same for its own options, e.g. nnUNet_compile). ``nndiff predict`` sets them from flags.

Values are checked when the network is built (when ``nnUNetv2_predict`` loads the model), so a bad value
stops the run before any case is touched, with a message naming the variable.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, replace
from typing import Optional

from ..diffusion import SAMPLERS
from ..errors import NNDiffConfigError
from ..spec import FUSIONS, TTA_MODES

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

    def validate(self, num_train_timesteps: Optional[int], source: str = "trainer config") -> "SamplingOptions":
        """Every field in range; ``num_train_timesteps`` None (the model's T not known yet, e.g. ``nndiff predict``'s
        flags checked before nnU-Net loads the model): steps only >= 1."""
        if num_train_timesteps is None:
            if self.steps < 1:
                raise NNDiffConfigError(f"{source}: sampling steps must be >= 1; got {self.steps}")
        elif not 1 <= self.steps <= num_train_timesteps:
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


FIELDS_OF_VARS = {"NNDIFF_REFINE": "refine", "NNDIFF_STEPS": "steps", "NNDIFF_SAMPLER": "sampler",
                  "NNDIFF_SAMPLES": "samples", "NNDIFF_SEED": "seed", "NNDIFF_TTA_REFINE": "tta_refine",
                  "NNDIFF_FUSION": "fusion", "NNDIFF_MISSING": "missing"}


@dataclass(frozen=True)
class Overrides:
    """What a user asked to change in a model's prediction settings: (field, value, where it came from) triples, laid
    over the settings the checkpoint recorded (or the trainer config's, for a checkpoint that records none)."""
    items: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.items)

    def apply(self, base: SamplingOptions, num_train_timesteps: int) -> SamplingOptions:
        """``base`` with these values laid over it, validated (an error names where the bad value came from); ``base``
        alone (no overrides) is returned as it is: it comes from a validated trainer config."""
        if not self.items:
            return base
        return replace(base, **{f: v for f, v, _ in self.items}).validate(num_train_timesteps, source=self.describe())

    def describe(self) -> str:
        """Where the values came from, e.g. "environment (NNDIFF_STEPS, NNDIFF_SAMPLER)"."""
        env = [src[len("environment ("):-1] for *_, src in self.items if src.startswith("environment (")]
        rest = [src for *_, src in self.items if not src.startswith("environment (")]
        return ", ".join(list(dict.fromkeys(rest)) + ([f"environment ({', '.join(env)})"] if env else []))

    def sources(self) -> dict[str, str]:
        """{field: where its value came from}."""
        return {f: src for f, _, src in self.items}

    def __or__(self, other: "Overrides") -> "Overrides":
        """These overrides with ``other``'s laid over them (``other`` wins on a field both set)."""
        theirs = {f for f, *_ in other.items}
        return Overrides(tuple(i for i in self.items if i[0] not in theirs) + other.items)


def overrides_from_env(environ=None) -> Overrides:
    """The NNDIFF_* prediction variables that are set (each parsed; a bad value is a one-line error naming it)."""
    env = os.environ if environ is None else environ
    items = []
    for name, fld in FIELDS_OF_VARS.items():
        if name not in env:
            continue
        raw = env[name]
        if fld == "refine":
            value = _bool(name, raw)
        elif fld in ("steps", "samples", "seed"):
            value = _int(name, raw)
        elif fld == "missing":
            value = tuple(sorted({_int(name, v) for v in raw.split(",") if v.strip()}))
        else:
            value = raw.strip().lower()
        items.append((fld, value, f"environment ({name})"))
    return Overrides(tuple(items))


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("nnunet_diffusion_prediction_overrides", default=None)


@contextlib.contextmanager
def prediction_overrides(overrides: Overrides):
    """Within the block, every network built for prediction (e.g. by ``nnUNetv2_predict``'s entry point, which
    ``nndiff predict`` calls) takes ``overrides`` on top of the NNDIFF_* variables: how ``nndiff predict``'s flags
    reach the network as one explicit value instead of through the environment."""
    token = _ACTIVE.set(overrides)
    try:
        yield overrides
    finally:
        _ACTIVE.reset(token)


def current_overrides() -> Overrides:
    """The NNDIFF_* variables, with the overrides of an enclosing :func:`prediction_overrides` laid over them."""
    active = _ACTIVE.get()
    return overrides_from_env() | active if active is not None else overrides_from_env()


def options_from_env(defaults: SamplingOptions, num_train_timesteps: int, environ=None) -> SamplingOptions:
    """``defaults`` (from the trainer config) overridden by the NNDIFF_* variables that are set."""
    return overrides_from_env(environ).apply(defaults, num_train_timesteps)
