"""Errors a user can act on. Each message says what was wrong and what to do about it."""


class AttnlabError(Exception):
    """Base class: the CLI prints these as one-line messages instead of a traceback."""


class ModelNotAvailableError(AttnlabError):
    """Weights or config for a model could not be found (unknown id, offline, empty cache)."""


class UnsupportedModelError(AttnlabError):
    """The model's architecture is not one attnlab knows how to read attention from."""


class MissingHeadError(AttnlabError):
    """The experiment needs a head (e.g. masked-LM) that the checkpoint does not contain."""


class InputError(AttnlabError):
    """Bad tensors or settings: sequence too long, query positions out of range, bad padding, ..."""


class CorpusError(AttnlabError):
    """A corpus could not be read, or has too few usable documents."""
