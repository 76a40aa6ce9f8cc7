"""Errors a user can fix: the command line prints them as one line."""


class RapaError(Exception):
    """A problem with the user's input (a run directory, a config, a file), not a bug."""
