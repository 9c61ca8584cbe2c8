"""The error every command raises for a mistake the user can fix (printed without a traceback).

It lives in the library so that `pipelines/` and `serve/` commands can raise it without importing
the command line that assembles them.
"""


class CLIError(Exception):
    """An error the user can fix; `catversion` prints it without a traceback and exits with status 2."""
