"""The one list of heads. The trainers, ``nndiff``, the demo, the grid, the budget accounting, the benchmarks and the
documentation generator all read it; adding a head is its own files (``heads/<head>.py`` with its spec,
``trainers/<head>.py``, its inference network, ``trainer_configs/<head>.toml``, its explanation page) plus one
:class:`Head` entry in :data:`HEADS`.

What differs between heads in code that is not a head's own (the demo's extra rows, the table's comparison rows, the
grid's job order) is said here as a capability of the entry, never as ``if head == "<name>"`` elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from .errors import NNDiffConfigError
from .heads.ddmd import DDMDSpec
from .heads.medsegdiff import MedSegDiffSpec
from .heads.modiff import MoDiffSpec
from .heads.nndm import NNDMSpec
from .heads.recoseg import ReCoSegSpec
from .spec import NNUNetSpec, Spec, parse


@dataclass(frozen=True)
class Head:
    """One head: ``name`` is its key everywhere (``trainer_configs/<name>.toml``); ``trainer`` its trainer class
    (variants are ``<trainer>_<variant>``), defined in ``nnunet_diffusion.trainers.<module>``."""
    name: str
    title: str
    trainer: str
    module: str
    spec: type
    diffusion: bool = True
    refinement_toggle: bool = False
    """Prediction can switch the diffusion part off (``NNDIFF_REFINE=0`` / ``--no-refine``) and return its nnU-Net
    backbone's output: comparisons show that row beside the refined one."""
    baseline_stage: bool = False
    """Its first stage is a whole nnU-Net that a trained one can replace (``NNDIFF_BASELINE``): that stage is not
    trained then, and a grid runs the baseline's job first."""
    missing_channels: bool = False
    """Prediction can treat input channels as missing (``NNDIFF_MISSING``)."""
    residual_maps: bool = False
    """``nndiff predict --residuals`` writes its |synthetic - real| maps."""
    discrepancy_maps: bool = False
    """``nndiff predict --discrepancy`` writes its autoencoder discrepancy maps."""
    sample_outputs: bool = False
    """``nndiff predict --samples-out`` writes its individual samples (multi-rater data)."""
    demo_default: bool = False
    """Trained by ``make demo`` without ``--all-heads``."""
    demo_submission: bool = False
    """``make demo`` converts this head's predictions of the BraTS validation cases into a submission."""

    def trainer_name(self, variant: Optional[str] = None) -> str:
        return self.trainer if variant is None else f"{self.trainer}_{variant}"

    def settings(self, variant: Optional[str] = None) -> Spec:
        """The validated spec of ``variant`` (``None``: ``[defaults]``)."""
        return settings(self.name, variant)


HEADS: tuple[Head, ...] = (
    Head("nnunet", "nnU-Net", "nnUNetTrainer", "baseline", NNUNetSpec, diffusion=False, demo_default=True),
    Head("nndm", "NNDM", "nnUNetTrainerNNDM", "nndm", NNDMSpec, refinement_toggle=True, baseline_stage=True,
         demo_default=True, demo_submission=True),
    Head("medsegdiff", "MedSegDiff", "nnUNetTrainerMedSegDiff", "medsegdiff", MedSegDiffSpec),
    Head("recoseg", "ReCoSeg", "nnUNetTrainerReCoSeg", "recoseg", ReCoSegSpec, missing_channels=True,
         residual_maps=True),
    Head("modiff", "MoDiff", "nnUNetTrainerMoDiff", "modiff", MoDiffSpec, sample_outputs=True),
    Head("ddmd", "DDMD", "nnUNetTrainerDDMD", "ddmd", DDMDSpec, discrepancy_maps=True),
)
STOCK = HEADS[0]
DIFFUSION_HEADS = tuple(h for h in HEADS if h.diffusion)


def head(name: str) -> Head:
    for h in HEADS:
        if h.name == name:
            return h
    raise NNDiffConfigError(f"unknown head {name!r}; the heads are {', '.join(h.name for h in HEADS)}")


def names(diffusion_only: bool = False) -> list[str]:
    return [h.name for h in (DIFFUSION_HEADS if diffusion_only else HEADS)]


def for_trainer_name(name: str) -> Optional[tuple[Head, Optional[str]]]:
    """(head, variant) of a trainer class name of ours (``nnUNetTrainerNNDM_table`` -> (nndm, "table")); ``None``
    for a name that is none of ours (nnU-Net's own ``nnUNetTrainer`` included: its variants are ours only where the
    TOML declares them). The variant is not checked against the TOML."""
    for h in sorted(HEADS, key=lambda h: -len(h.trainer)):
        if name == h.trainer and h.diffusion:
            return h, None
        if name.startswith(h.trainer + "_"):
            return h, name[len(h.trainer) + 1:]
    return None


@lru_cache(maxsize=None)
def settings(name: str, variant: Optional[str] = None) -> Spec:
    """The validated spec of head ``name``'s ``variant`` (parsed once per process)."""
    return parse(head(name).spec, name, variant)
