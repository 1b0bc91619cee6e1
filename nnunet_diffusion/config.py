"""trainer_configs/*.toml: each head's paper hyper-parameters ([defaults]) and named variants ([variants.X]).

A variant is data: ``nnUNetTrainerNNDM_tiny`` is the class ``nnUNetTrainerNNDM`` with the keys of
``[variants.tiny]`` laid over ``[defaults]``. Variant classes are generated from these files (see
``trainers/registry.py``), so adding a variant never means copying a class.
"""
from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib import resources

from .errors import NNDiffConfigError

# keys every trainer understands (nnU-Net's own training-length knobs); heads add their own keys
TRAINING_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every",
                 "initial_lr", "weight_decay", "oversample_foreground_percent")
META_KEYS = ("description",)
# keys any head's variant may set without a [defaults] entry, with their default value: keep_snapshots keeps a copy
# of every checkpoint_latest.pth nnU-Net writes (every save_every epochs) as checkpoint_ep<E>.pth, for curves of
# accuracy against training length (benchmarks/table.py)
COMMON_KEYS = {"keep_snapshots": False}


def _config_file(head: str):
    return resources.files("nnunet_diffusion.trainer_configs").joinpath(f"{head}.toml")


@lru_cache(maxsize=None)
def load(head: str) -> dict:
    """The parsed trainer_configs/<head>.toml (``defaults`` and ``variants`` tables)."""
    f = _config_file(head)
    if not f.is_file():
        raise NNDiffConfigError(f"no trainer config for head {head!r}: {f} does not exist")
    try:
        data = tomllib.loads(f.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise NNDiffConfigError(f"trainer config {f} is not valid TOML: {e}") from None
    defaults = data.get("defaults", {})
    variants = data.get("variants", {})
    allowed = set(defaults) | set(META_KEYS) | set(COMMON_KEYS)
    for name, overrides in variants.items():
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise NNDiffConfigError(f"{f}: variant [{name}] sets unknown key(s) {unknown}; "
                                    f"known keys are those of [defaults]: {sorted(defaults)}")
        if not name.isidentifier():
            raise NNDiffConfigError(f"{f}: variant name {name!r} must be a Python identifier "
                                    f"(it becomes part of a class name)")
    return {"defaults": defaults, "variants": variants, "file": str(f)}


def variant_names(head: str) -> list[str]:
    return sorted(load(head)["variants"])


def resolve(head: str, variant: str | None = None) -> dict:
    """``[defaults]`` with ``[variants.<variant>]`` laid over it."""
    cfg = load(head)
    out = dict(COMMON_KEYS, **cfg["defaults"])
    if variant is not None:
        if variant not in cfg["variants"]:
            raise NNDiffConfigError(f"unknown {head} variant {variant!r}; known variants: "
                                    f"{', '.join(variant_names(head)) or '(none)'} (declared in {cfg['file']})")
        out.update({k: v for k, v in cfg["variants"][variant].items() if k not in META_KEYS})
    return out


# head -> the keys whose epochs add up to its whole schedule (a head not listed trains num_epochs); the first key of
# NNDM's is its nnU-Net stage, which a training seeded by NNDIFF_BASELINE skips
STAGE_EPOCH_KEYS = {"nndm": ("stage1_epochs", "stage2_epochs", "stage3_epochs"),
                    "recoseg": ("stage1_epochs", "stage2_epochs"),
                    "ddmd": ("ae_epochs", "diffusion_epochs")}


def total_epochs(hp: dict, head: str, from_baseline: bool = False) -> int:
    """Epochs of a head's whole schedule (every stage) for its resolved config ``hp``; ``from_baseline``: NNDM
    started from a trained nnU-Net (NNDIFF_BASELINE), its stage 1 skipped."""
    keys = STAGE_EPOCH_KEYS.get(head, ("num_epochs",))
    if from_baseline and head == "nndm":
        keys = keys[1:]
    return sum(int(hp[k]) for k in keys)
