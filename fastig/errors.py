"""Errors that name a problem of the user's input. The CLI prints them as one line and exits with code 2."""


class FastigError(Exception):
    """Base class: a problem with what the user asked for or gave (not a bug in fastig)."""


class UnknownNameError(FastigError, ValueError):
    """An unknown model, method, metric or option name."""


class CheckpointError(FastigError):
    """A weight file that is missing, truncated, corrupt, unsafe or of the wrong architecture."""


class ImageReadError(FastigError):
    """An image file that is missing, unreadable or not an image."""


class InputError(FastigError, ValueError):
    """An input, baseline, target or option of an attribution that does not fit the model or the method, or asks
    for more work than fits (the message names the argument and what was expected)."""
