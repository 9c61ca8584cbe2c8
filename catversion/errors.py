"""The errors a command raises for an outcome the user must act on, and the exit status of each
(printed without a traceback).

They live in the library so that `pipelines/` and `serve/` commands can raise them without importing
the command line that assembles them.

Exit statuses of `catversion` (README, "Exit codes"):
  0    everything asked for was done
  1    an error: nothing (more) could be done, e.g. a missing file, a model that does not load,
       a cluster without the resources asked for
  2    a usage error: the command line itself is wrong (argparse's own status)
  3    finished, but some concepts failed or were rejected (`batch`, `batch --validate-only`, `evaluate`)
  130  interrupted by Ctrl-C or SIGTERM (what was finished is kept)
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error the user can fix; `catversion` prints it without a traceback and exits with status 1."""

    exit_code = EXIT_ERROR


class UsageError(CLIError):
    """The command line is wrong in a way argparse cannot see (a flag needed by another one, say): status 2."""

    exit_code = EXIT_USAGE


class PartialFailure(CLIError):
    """The command finished, but some concepts failed or were rejected: status 3."""

    exit_code = EXIT_PARTIAL


class InsufficientResources(CLIError):
    """The Ray cluster cannot run what a command asks for (checked before anything starts): status 1."""
