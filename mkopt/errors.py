"""Errors in what a user passed (a file, a data set, a config value), as opposed to bugs.

The ``mkopt`` command line prints a :class:`UserInputError` as one line naming the file or value and
the fix, and exits with status 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input: missing or malformed data, an unknown name, a config value of the wrong type.

    Example:
        >>> str(UserInputError("data.npz lacks y_test"))
        'data.npz lacks y_test'
    """


class DataError(UserInputError):
    """A data set is missing, malformed, or not the data earlier results were made from."""


class ConfigError(UserInputError):
    """A config file or override is malformed, names an unknown key, or has a value of the wrong type."""
