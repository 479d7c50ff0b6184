"""Exceptions with messages that say what was wrong and what to do.

All derive from ``AutoRoundError`` (a ``ValueError``), so callers can catch one type; the CLI prints the
message on one line and exits non-zero.
"""


class AutoRoundError(ValueError):
    """Base class of every user-facing error of the project."""


class SchemeError(AutoRoundError):
    """Unknown or impossible quantization scheme."""


class FormatError(AutoRoundError):
    """Unknown export format, or a format that cannot hold the requested scheme."""


class ModelLoadError(AutoRoundError):
    """The model could not be found or read."""


class DatasetError(AutoRoundError):
    """Bad calibration or evaluation data specification, or too little data."""


class OutputError(AutoRoundError):
    """The output folder cannot be written."""


class BackendError(AutoRoundError):
    """No inference kernel can run a layer, or a required backend package is missing."""
