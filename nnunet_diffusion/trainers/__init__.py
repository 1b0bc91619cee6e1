"""nnUNetTrainer subclasses, one module per head (``registry.HEADS`` names each head's module), plus every variant
declared in trainer_configs/.

``nnunet_diffusion/nnunet_ext/nnunet_diffusion_trainers.py`` re-exports ``TRAINERS`` for nnU-Net's
``nnUNet_extTrainer`` lookup; the classes themselves live (once) in the modules below.
"""
from importlib import import_module

from ..registry import HEADS

TRAINERS = {name: getattr(m, name) for m in (import_module(f".{h.module}", __name__) for h in HEADS)
            for name in m.__all__}

# trainer-name prefix -> head: an unknown name with one of these prefixes is explained with the list of known
# variants (not stock nnU-Net's "nnUNetTrainer_", which other packages' trainers use too)
HEAD_PREFIXES = {f"{h.trainer}_": h.name for h in HEADS if h.diffusion}

__all__ = ["TRAINERS", "HEAD_PREFIXES", *sorted(TRAINERS)]
globals().update(TRAINERS)
