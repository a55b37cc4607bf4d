"""Errors that name a problem of the user's input. The CLI prints them as one line and exits with code 2."""


class FastigError(Exception):
    """Base class: a problem with what the user asked for or gave (not a bug in fastig)."""


class UnknownNameError(FastigError, ValueError):
    """An unknown model, method, metric or option name."""


class CheckpointError(FastigError):
    """A weight file that is missing, truncated, corrupt, unsafe or of the wrong architecture."""


class ImageReadError(FastigError):
    """An image file that is missing, unreadable or not an image."""


class ResourceError(FastigError):
    """The machine ran out of something a run needs (disk space, the file-size limit): not a problem of the
    user's input, so the CLI exits with code 1. The message says what was kept and how to go on."""


class InputError(FastigError, ValueError):
    """An input, baseline, target or option of an attribution that does not fit the model or the method, or asks
    for more work than fits (the message names the argument and what was expected)."""


# Captum signals bad arguments with AssertionError (and missing features with NotImplementedError). These classes
# keep fastig's one-line messages and the ValueError/TypeError a Python user expects, and derive from Captum's
# exception too, so code written for Captum (``except AssertionError``) catches fastig's errors unchanged.


class InvalidArgumentError(InputError, AssertionError):
    """An argument with a wrong value (shape, size, range), where Captum raises AssertionError (an InputError)."""


class InvalidTypeError(FastigError, TypeError, AssertionError):
    """An argument of a wrong type, where Captum raises AssertionError."""


class NotSupportedError(FastigError, NotImplementedError):
    """A feature a method does not have (``attribute_future`` where Captum raises NotImplementedError too)."""
