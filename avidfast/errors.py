"""The one base class of avidfast's errors.

Every mistake a user can make (a bad config value, an unreadable manifest, a missing compiled
extension) raises a subclass of `AvidfastError` with a message that names the input and says what
to do next. The command line prints these in one line; anything else that escapes is a bug and
keeps its traceback.
"""


class AvidfastError(Exception):
    """Base of every error that avidfast raises for a user's input or environment."""


class ExtensionUnavailableError(AvidfastError, RuntimeError):
    """The compiled operator library avidfast._C is missing or does not match the running torch."""


class EvalError(AvidfastError, ValueError):
    """An evaluation that cannot run on the given inputs (a checkpoint without memory banks, labels that
    do not fit it, a device that is not there, too few clips for a batch): the message names the input."""


class TrainingError(AvidfastError, RuntimeError):
    """A problem that stops training (or its start from a checkpoint), with what to do about it."""


class RunFolderError(AvidfastError, ValueError):
    """A run folder (training's out_dir, an evaluation's) that cannot be used: it cannot be written, or it
    holds another run's results."""


class NonFiniteError(AvidfastError, FloatingPointError):
    """A loss, gradient or state that is NaN or infinite, refused before it reaches weights, memory
    banks, partition constants or checkpoints: the message says where (step, rank) and what to try."""


class RankFailedError(AvidfastError, RuntimeError):
    """One rank of a torch.distributed run failed (a missing file, a bad input, a full disk); every
    rank raises this same error, naming the failing rank, its host and its error, and stops."""
