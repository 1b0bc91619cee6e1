"""Typed trainer specs: each head's ``trainer_configs/<head>.toml`` parsed and validated once into a frozen object.

A head's spec class (a subclass of :class:`Spec`, declared in the head's own module under ``heads/``) lists every key
of its TOML as a typed field with its range (:func:`key`); :func:`parse` lays a ``[variants.X]`` over ``[defaults]``,
checks every value's type and range, refuses unknown and missing keys, and runs the spec's own cross-key checks
(:meth:`Spec.check`). Every problem is one :class:`SpecError` naming the file, the variant and the key.

The rest of the package reads a head's settings as attributes of its spec (``spec.sampling_steps``), never as
strings in a dict; :meth:`Spec.as_dict` is the plain form a checkpoint records and the documentation prints.

Keys every spec has (nnU-Net's own training-length knobs) are on :class:`Spec`; :class:`DiffusionSpec` adds the
noise schedule and the sampler of every diffusion head.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import ClassVar, Optional

from .diffusion.core import PREDICTION_TYPES, SAMPLERS, SCHEDULES
from .errors import NNDiffConfigError

META_KEYS = ("description",)


class SpecError(NNDiffConfigError):
    """A trainer config value, variant name or key is invalid; the message names the file, variant and key."""


def key(*, default=dataclasses.MISSING, min=None, max=None, min_open: bool = False, max_open: bool = False,
        choices: Optional[tuple] = None, item_min=None, doc: str = ""):
    """A spec field: ``min``/``max`` bound a number (``*_open``: the bound itself is not allowed), ``choices`` the
    allowed strings, ``item_min`` every item of a list; no ``default``: the key must be in ``[defaults]``."""
    meta = dict(min=min, max=max, min_open=min_open, max_open=max_open, choices=choices, item_min=item_min, doc=doc)
    return field(default=default, metadata=meta)


def config_differences(theirs: dict, ours: dict, ignore: frozenset) -> tuple[list[str], list[str]]:
    """How trainer config ``ours`` differs from ``theirs`` (a checkpoint's recorded one), ``ignore``'s keys apart:
    the keys ``theirs`` predates (sorted), and "key old -> new" for each key of ``theirs`` whose value differs."""
    new = sorted(set(ours) - set(theirs) - ignore)
    changed = [f"{k} {theirs[k]!r} -> {ours.get(k, '(unset)')!r}"
               for k in sorted(set(theirs) - ignore) if theirs[k] != ours.get(k)]
    return new, changed


@dataclass(frozen=True, kw_only=True)
class Spec:
    """nnU-Net's training-length knobs, which every trainer of the package has. ``source`` names the TOML file and
    variant the spec was parsed from (errors and logs say it); it is not a key."""
    HEAD: ClassVar[str] = ""
    STAGE_KEYS: ClassVar[tuple] = ("num_epochs",)
    """The keys whose epochs add up to the head's whole schedule (its optimiser budget is their sum x
    ``num_iterations_per_epoch``)."""
    PREDICT_ONLY: ClassVar[frozenset] = frozenset({"num_val_iterations_per_epoch", "save_every", "keep_snapshots",
                                                   "resume_every"})
    """Keys that change only prediction, online validation or bookkeeping, never the trained weights: a training
    resumed (``--c``) after one of them changed is still one training."""

    source: str = field(default="", compare=False, metadata={"internal": True})
    num_iterations_per_epoch: int = key(min=1)
    num_val_iterations_per_epoch: int = key(min=0)
    save_every: int = key(min=1)
    keep_snapshots: bool = key(default=False, doc="keep the checkpoint_latest.pth of every save_every epochs as "
                               "checkpoint_ep<E>.pth")
    resume_every: Optional[int] = key(default=None, min=1, doc="write checkpoint_latest.pth (the point --c resumes "
                                      "from) every this many epochs, more often than save_every; snapshots "
                                      "(keep_snapshots) stay at save_every (unset: save_every, nnU-Net's rule)")
    # nnU-Net's own optimiser knobs: unset keeps nnUNetTrainer's value
    initial_lr: Optional[float] = key(default=None, min=0, min_open=True)
    weight_decay: Optional[float] = key(default=None, min=0)
    oversample_foreground_percent: Optional[float] = key(default=None, min=0, max=1)
    # stopping at the model's own plateau (trainers/early_stop.py, issue 33): off unless set; they read nnU-Net's
    # online EMA pseudo Dice of the fold's validation patches
    stop_plateau_steps: int = key(default=0, min=0, doc="stop when nnU-Net's EMA pseudo Dice has not risen more "
                                  "than stop_min_delta for this many optimiser steps (0: off)")
    stop_min_delta: float = key(default=0.01, min=0, doc="the rise (Dice in [0, 1]) that counts as an improvement")
    stop_chance_steps: int = key(default=0, min=0, doc="after this many optimiser steps, stop if the best EMA pseudo "
                                 "Dice is below stop_chance_dice (0: off)")
    stop_chance_dice: float = key(default=0.1, min=0, max=1, doc="the best EMA pseudo Dice below which a model counts "
                                  "as not segmenting")

    def __post_init__(self):
        """Every value converted to its field's type and range-checked, then the head's cross-key checks: a spec made
        any way (parsed, or ``dataclasses.replace``) never holds a bad value."""
        where = self.source or f"{type(self).__name__}"
        for name, f in _fields(type(self)).items():
            v = getattr(self, name)
            if v is None and f.default is None:
                continue  # an optional key left unset
            object.__setattr__(self, name, _convert(where, f, v))
        self.check()

    # -------------------------------------------------------------- reading
    def fail(self, key_name: str, problem: str):
        raise SpecError(f"{self.source}: {key_name}: {problem}")

    def check(self) -> None:
        """Cross-key checks of a head (a subclass extends it); raise with :meth:`fail`."""

    @property
    def total_epochs(self) -> int:
        return sum(int(getattr(self, k)) for k in self.STAGE_KEYS)

    @property
    def optimizer_steps(self) -> int:
        """Optimiser steps of the whole schedule from scratch."""
        return self.total_epochs * self.num_iterations_per_epoch

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    def as_dict(self) -> dict:
        """The plain values (lists, not tuples; unset optional keys left out): what a checkpoint records as its
        trainer config and the documentation prints."""
        out = {}
        for name in self.keys():
            v = getattr(self, name)
            if v is None:
                continue
            out[name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True, kw_only=True)
class NNUNetSpec(Spec):
    """Stock nnU-Net (``nnUNetTrainer_<variant>``): only the training length changes."""
    HEAD: ClassVar[str] = "nnunet"
    num_epochs: int = key(min=1)


TTA_MODES = ("window", "mirror")
FUSIONS = ("mean", "staple")


@dataclass(frozen=True, kw_only=True)
class DiffusionSpec(Spec):
    """What every diffusion head has: the noise schedule, the parameterisation, the shipped sampler (prediction) and
    the cheap sampler of online validation."""
    PREDICT_ONLY: ClassVar[frozenset] = Spec.PREDICT_ONLY | {"sampler", "sampling_steps", "num_samples", "tta_refine",
                                                             "fusion", "val_sampler", "val_sampling_steps"}
    num_train_timesteps: int = key(min=1)
    beta_schedule: str = key(choices=SCHEDULES)
    beta_start: float = key(min=0, min_open=True)
    beta_end: float = key(min=0, min_open=True)
    prediction_type: str = key(choices=PREDICTION_TYPES)
    sampler: str = key(choices=SAMPLERS)
    sampling_steps: int = key(min=1)
    num_samples: int = key(min=1)
    tta_refine: str = key(choices=TTA_MODES)
    fusion: str = key(default="mean", choices=FUSIONS)
    val_sampler: str = key(choices=SAMPLERS)
    val_sampling_steps: int = key(min=1)

    def check(self) -> None:
        super().check()
        for name in ("sampling_steps", "val_sampling_steps"):
            if getattr(self, name) > self.num_train_timesteps:
                self.fail(name, f"must be in 1..num_train_timesteps ({self.num_train_timesteps}); got "
                                f"{getattr(self, name)}")
        if self.beta_end <= self.beta_start:
            self.fail("beta_end", f"must be above beta_start ({self.beta_start}); got {self.beta_end}")


# ------------------------------------------------------------------------------------------------ parsing
def _type_error(where: str, name: str, want: str, value) -> SpecError:
    return SpecError(f"{where}: {name} must be {want}; got {value!r}")


def _convert(where: str, f: dataclasses.Field, value):
    """``value`` as the type of field ``f``, range-checked; a SpecError naming ``where`` and the key otherwise."""
    tp = f.type if not isinstance(f.type, str) else _HINTS[id(f)]
    m = f.metadata
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(where, f.name, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(where, f.name, "an integer", value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(where, f.name, "a number", value)
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise _type_error(where, f.name, "a string", value)
        if m.get("choices") and value not in m["choices"]:
            raise _type_error(where, f.name, "one of " + ", ".join(m["choices"]), value)
        return value
    elif typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise _type_error(where, f.name, "a list of integers", value)
        if m.get("item_min") is not None and any(v < m["item_min"] for v in value):
            raise _type_error(where, f.name, f"a list of integers >= {m['item_min']}", value)
        return tuple(value)
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and (value < lo or (m.get("min_open") and value == lo)):
        raise _type_error(where, f.name, f"{'>' if m.get('min_open') else '>='} {lo}", value)
    if hi is not None and (value > hi or (m.get("max_open") and value == hi)):
        raise _type_error(where, f.name, f"{'<' if m.get('max_open') else '<='} {hi}", value)
    return value


_HINTS: dict = {}


@lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        _HINTS[id(f)] = hints[f.name]
        out[f.name] = f
    return out


def config_file(head: str):
    return resources.files("nnunet_diffusion.trainer_configs").joinpath(f"{head}.toml")


@lru_cache(maxsize=None)
def load_toml(head: str) -> dict:
    """The parsed trainer_configs/<head>.toml: {"defaults", "variants", "file"}. Structural problems (no file, not
    TOML, a variant name that cannot be part of a class name) are SpecErrors."""
    f = config_file(head)
    if not f.is_file():
        raise SpecError(f"no trainer config for head {head!r}: {f} does not exist")
    try:
        data = tomllib.loads(f.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"trainer config {f} is not valid TOML: {e}") from None
    for name in data.get("variants", {}):
        if not name.isidentifier():
            raise SpecError(f"{f}: variant name {name!r} must be a Python identifier (it becomes part of a class "
                            f"name)")
    return {"defaults": data.get("defaults", {}), "variants": data.get("variants", {}), "file": str(f)}


def parse(spec_cls: type, head: str, variant: Optional[str] = None) -> Spec:
    """``[defaults]`` of trainer_configs/<head>.toml with ``[variants.<variant>]`` laid over it, as a validated
    ``spec_cls``."""
    cfg = load_toml(head)
    where = cfg["file"] + (f" [variants.{variant}]" if variant else " [defaults]")
    if variant is not None and variant not in cfg["variants"]:
        raise SpecError(f"unknown {head} variant {variant!r}; known variants: "
                        f"{', '.join(sorted(cfg['variants'])) or '(none)'} (declared in {cfg['file']})")
    fields = _fields(spec_cls)
    for table, values in [("[defaults]", cfg["defaults"])] + [
            (f"[variants.{v}]", o) for v, o in cfg["variants"].items()]:
        unknown = sorted(set(values) - set(fields) - (set(META_KEYS) if table != "[defaults]" else set()))
        if unknown:
            raise SpecError(f"{cfg['file']} {table}: unknown key(s) {unknown}; the keys of {head} are "
                            f"{', '.join(sorted(fields))}")
    values = dict(cfg["defaults"])
    if variant is not None:
        values.update({k: v for k, v in cfg["variants"][variant].items() if k not in META_KEYS})
    missing = sorted(n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING)
    if missing:
        raise SpecError(f"{cfg['file']} [defaults]: missing key(s) {missing}")
    return spec_cls(source=where, **values)


def description(head: str, variant: str) -> str:
    return load_toml(head)["variants"][variant].get("description", "")


def variant_names(head: str) -> list[str]:
    return sorted(load_toml(head)["variants"])
