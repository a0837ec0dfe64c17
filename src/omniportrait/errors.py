"""Typed errors for every user-facing failure.

Each message is one line that says what went wrong and what to do. Front ends (CLI, web app, dataset
builder) catch :class:`OmniPortraitError` and show ``str(err)`` without a traceback.
"""


class OmniPortraitError(Exception):
    """Base class of every error caused by the user's input or setup."""


class InvalidImageError(OmniPortraitError):
    """The file is missing, unreadable, not an image, corrupt, too small or too large."""


class NoFaceError(OmniPortraitError):
    """No face was found in the reference image."""


class MultipleFacesError(OmniPortraitError):
    """Several faces were found and strict mode asked for exactly one."""


class ClassWordError(OmniPortraitError):
    """A class word ("woman", "man", ...) could not be located in the prompt."""


class ConfigError(OmniPortraitError):
    """An unknown preset, checkpoint path, flag value or incompatible option."""


class MissingDependencyError(OmniPortraitError):
    """An optional extra is needed for this feature (``pip install 'omniportrait[EXTRA]'``)."""


class FaceIndexError(OmniPortraitError):
    """The requested face index is not among the faces found (the message says how many there are)."""


class DatasetBuildError(OmniPortraitError):
    """A dataset build cannot go on (e.g. a worker process died); rerunning the same command resumes it."""


class OutOfMemoryError(OmniPortraitError):
    """The GPU ran out of memory; the message names the options that lower the peak."""
