"""nnUNetTrainer subclasses, one module per paper, plus every variant declared in trainer_configs/.

``nnunet_diffusion/nnunet_ext/nnunet_diffusion_trainers.py`` re-exports ``TRAINERS`` for nnU-Net's
``nnUNet_extTrainer`` lookup; the classes themselves live (once) in the modules below.
"""
from . import baseline, ddmd, medsegdiff, modiff, nndm, recoseg

TRAINERS = {name: getattr(m, name) for m in (baseline, nndm, medsegdiff, recoseg, ddmd, modiff) for name in m.__all__}

# trainer-name prefix -> config head: an unknown name with one of these prefixes is explained with the list of
# known variants (not "nnUNetTrainer_", which other packages' trainers use too)
HEAD_PREFIXES = {"nnUNetTrainerNNDM_": "nndm", "nnUNetTrainerMedSegDiff_": "medsegdiff",
                 "nnUNetTrainerReCoSeg_": "recoseg", "nnUNetTrainerDDMD_": "ddmd",
                 "nnUNetTrainerMoDiff_": "modiff"}

__all__ = ["TRAINERS", "HEAD_PREFIXES", *sorted(TRAINERS)]
globals().update(TRAINERS)
