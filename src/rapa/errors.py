"""Errors a user can fix: the command line prints them as one line."""


class RapaError(Exception):
    """A problem with the user's input (a run directory, a config, a file), not a bug.

    The command line prints it as one line and exits with :attr:`exit_status`.
    """

    exit_status = 2
    """Exit status of the ``rapa`` command: 2, a bad input."""


class OutputError(RapaError):
    """A result could not be written (disk full, folder removed, permission lost) after
    the output was checked: the command prints one line and exits with status 1."""

    exit_status = 1
