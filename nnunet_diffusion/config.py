"""trainer_configs/*.toml: each head's paper hyper-parameters ([defaults]) and named variants ([variants.X]).

A variant is data: ``nnUNetTrainerNNDM_tiny`` is the class ``nnUNetTrainerNNDM`` with the keys of
``[variants.tiny]`` laid over ``[defaults]``. The variant classes are generated from these files (the trainers
package, ``trainers/base.py`` ``make_variants``), so adding a variant never means copying a class.

Code reads a head's settings through its typed spec (:func:`spec`, ``nnunet_diffusion/spec.py``); :func:`resolve` is
the same spec as a plain dict, for what prints or compares every key alike (the documentation, a checkpoint's
recorded config).
"""
from __future__ import annotations

from typing import Optional

from .spec import META_KEYS, SpecError, Spec, load_toml, variant_names  # noqa: F401 (this module's API)

# nnU-Net's own knobs a spec may set on the trainer (unset: nnUNetTrainer's value)
TRAINING_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every",
                 "initial_lr", "weight_decay", "oversample_foreground_percent")


def load(head: str) -> dict:
    """The parsed trainer_configs/<head>.toml (``defaults`` and ``variants`` tables, ``file``)."""
    return load_toml(head)


def spec(head: str, variant: Optional[str] = None) -> Spec:
    """The validated, typed settings of ``head``'s ``variant`` (``[defaults]`` for None)."""
    from .registry import settings
    return settings(head, variant)


def resolve(head: str, variant: Optional[str] = None) -> dict:
    """``[defaults]`` with ``[variants.<variant>]`` laid over it, validated, as a plain dict."""
    return spec(head, variant).as_dict()


def total_epochs(hp: Spec, from_baseline: bool = False) -> int:
    """Epochs of a head's whole schedule (every stage) for its spec ``hp``; ``from_baseline``: a head whose first
    stage is a whole nnU-Net started from a trained one (NNDM's NNDIFF_BASELINE), that stage skipped."""
    keys = hp.STAGE_KEYS
    if from_baseline and keys[0] != "num_epochs":
        from .registry import head as _head
        if _head(hp.HEAD).baseline_stage:
            keys = keys[1:]
    return sum(int(getattr(hp, k)) for k in keys)
