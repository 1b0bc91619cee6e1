"""The one module in the folder that ``nnUNet_extTrainer`` points at (``nndiff env`` prints the line).

nnU-Net imports every module of that folder under its bare name and evicts it from sys.modules after the
lookup. This module therefore holds no classes of its own: it re-exports the trainers from the installed
package ``nnunet_diffusion.trainers``, so each trainer class exists exactly once (one module, one class
object: isinstance, pickling and DDP's re-lookup in every rank all see the same class).
"""
from nnunet_diffusion.trainers import HEAD_PREFIXES as _HEAD_PREFIXES
from nnunet_diffusion.trainers import TRAINERS as _TRAINERS

globals().update(_TRAINERS)


def __getattr__(name):
    # nnU-Net asks hasattr(module, trainer_name). For a misspelt variant of one of our heads say which
    # variants exist instead of nnU-Net's generic "could not find trainer".
    for prefix, head in _HEAD_PREFIXES.items():
        if name.startswith(prefix) and name not in _TRAINERS:
            from nnunet_diffusion import config
            config.resolve(head, name[len(prefix):])  # raises NNDiffConfigError listing the known variants
    raise AttributeError(name)
