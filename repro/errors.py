"""Errors a user can act on. The command line prints their message alone, without a traceback."""


class ReproError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class SpecError(ReproError):
    """An experiment spec is malformed: the message names the file and the key."""


class DataError(ReproError):
    """A dataset is missing or malformed: the message names the path tried and how to fix it."""
