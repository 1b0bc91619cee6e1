"""Exceptions with messages meant for users: what is wrong, where, and what to do about it."""


class NNDiffError(Exception):
    """Base class of the package's user-facing errors (the ``nndiff`` CLI prints only their message)."""


class NNDiffConfigError(NNDiffError, ValueError):
    """A trainer config, variant name or option value is invalid."""


class NNDiffCheckpointError(NNDiffError, RuntimeError):
    """A checkpoint does not fit the trainer, network or plans it is used with."""


class NNDiffTrainingError(NNDiffError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says which checkpoint is the last good one."""
