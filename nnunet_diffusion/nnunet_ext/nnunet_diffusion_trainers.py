"""The one module in the folder that ``nnUNet_extTrainer`` points at (``nndiff env`` prints the line).

nnU-Net imports every module of that folder under its bare name and evicts it from sys.modules after the
lookup. This module therefore holds no classes of its own: it re-exports the trainers from the installed
package ``nnunet_diffusion.trainers``, so each trainer class exists exactly once (one module, one class
object: isinstance, pickling and DDP's re-lookup in every rank all see the same class).

nnU-Net's lookup (``recursive_find_trainer_class_by_name``) asks ``hasattr(module, name)`` of every module of every
``nnUNet_extTrainer`` folder in turn and stops at the first that has the name, or at the first error. A user's own
trainer (say ``nnUNetTrainerNNDM_mine``, a subclass of one of ours in a folder of their own) may come after this
folder, so an unknown name with one of our heads' prefixes is answered with the list of that head's variants only
when no other ``nnUNet_extTrainer`` folder defines it; otherwise this module simply does not have it and nnU-Net
goes on to the user's folder.
"""
import os

from nnunet_diffusion.trainers import HEAD_PREFIXES as _HEAD_PREFIXES
from nnunet_diffusion.trainers import TRAINERS as _TRAINERS

globals().update(_TRAINERS)

_OUR_FOLDER = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
_looking_elsewhere = False  # set while other folders are searched (a folder holding this one must not recurse)


def _defined_in_another_folder(name: str) -> bool:
    """Whether a ``nnUNet_extTrainer`` folder other than this one defines ``name``, searched as nnU-Net searches
    (``nnunet_compat.find_class_in_folder``). A folder whose modules fail to import counts as defining it: nnU-Net's
    own search then reaches that folder and reports the user's error, not our list of variants."""
    global _looking_elsewhere
    from nnunet_diffusion import nnunet_compat

    _looking_elsewhere = True
    try:
        for folder in nnunet_compat.ext_trainer_folders():
            if os.path.realpath(folder) == _OUR_FOLDER:
                continue
            try:
                if nnunet_compat.find_class_in_folder(folder, name) is not None:
                    return True
            except Exception:
                return True
        return False
    finally:
        _looking_elsewhere = False


def __getattr__(name):
    # nnU-Net asks hasattr(module, trainer_name). For a misspelt variant of one of our heads say which variants
    # exist instead of nnU-Net's generic "could not find trainer", unless another nnUNet_extTrainer folder has it.
    if name in _TRAINERS or _looking_elsewhere:
        raise AttributeError(name)
    for prefix, head in _HEAD_PREFIXES.items():
        if name.startswith(prefix) and not _defined_in_another_folder(name):
            from nnunet_diffusion import config
            config.resolve(head, name[len(prefix):])  # raises NNDiffConfigError listing the known variants
    raise AttributeError(name)
