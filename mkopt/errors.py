"""Errors in what a user passed (a file, a data set, a config value), as opposed to bugs.

The ``mkopt`` command line prints a :class:`UserInputError` as one line naming the file or value and
the fix, and exits with status 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable


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


def exit_on_user_error(main: Callable[[], object], program: str) -> int:
    """Run ``main()``; a :class:`UserInputError` becomes one line on stderr and exit status 1.

    The status is ``main()``'s when it returns an int, else 0.

    What every mkopt entry point (``mkopt`` and the recipe scripts) does: bad input is the user's to
    fix and gets its message only; any other exception is a bug and keeps its traceback.

    Example:
        >>> def bad():
        ...     raise ConfigError("run.yaml: unknown key 'lrr'")
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     status = exit_on_user_error(bad, "recipe")
        >>> status, err.getvalue()
        (1, "recipe: error: run.yaml: unknown key 'lrr'\\n")
    """
    import sys

    try:
        status = main()
    except UserInputError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
