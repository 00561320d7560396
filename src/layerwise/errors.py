"""The errors layerwise raises on bad input, and what the CLI turns into one-line messages.

Every error a user can cause (a bad parameter, a broken file, a request too large for the machine, a
missing optional extra) is a :class:`LayerwiseError`. The subclasses that describe bad values also derive
from :class:`ValueError` (or :class:`TypeError`), so ``except ValueError`` keeps working for callers that
predate this module. Anything that is *not* a ``LayerwiseError`` is a bug and keeps its traceback.

>>> from layerwise.errors import ConfigError, LayerwiseError
>>> issubclass(ConfigError, LayerwiseError) and issubclass(ConfigError, ValueError)
True
"""

from __future__ import annotations

__all__ = [
    "LayerwiseError",
    "ParameterError",
    "ParameterTypeError",
    "ConfigError",
    "InputDataError",
    "CheckpointError",
    "OutputPathError",
    "ResourceError",
    "MissingExtraError",
]


class LayerwiseError(Exception):
    """Base class of every error caused by the user's input or environment (not by a bug)."""


class ParameterError(LayerwiseError, ValueError):
    """A function or command argument has a value outside what is allowed (the message names it)."""


class ParameterTypeError(LayerwiseError, TypeError):
    """A function or command argument has the wrong type (the message names it)."""


class ConfigError(LayerwiseError, ValueError):
    """A configuration file (YAML/JSON) is malformed or holds a bad value (the message names the key)."""


class InputDataError(LayerwiseError, ValueError):
    """A data file or tensor given as input is malformed, truncated or out of range (names the file)."""


class CheckpointError(LayerwiseError, ValueError):
    """A model checkpoint is unreadable, inconsistent or incompatible with another (names the file/key)."""


class OutputPathError(LayerwiseError, ValueError):
    """An output path would destroy or overwrite something the command did not create."""


class ResourceError(LayerwiseError, MemoryError):
    """A request would need more memory (or other resources) than the machine has; the message gives the
    estimate."""


class MissingExtraError(LayerwiseError, ImportError):
    """An optional dependency is not installed; the message names the extra (``pip install layerwise[X]``)."""
