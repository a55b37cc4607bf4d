"""Errors that name a problem of the user's input. The CLI prints them as one line and exits with code 2.

Also the one check of integer counts, sizes and steps (:func:`check_int`), which every module and the CLI use.
"""

from __future__ import annotations

import numbers
from typing import Any


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


# --- the one check of integer arguments -----------------------------------------------------------------------


def int_problem(value: Any, minimum: int = 1, none_ok: bool = False, why: str = "") -> str | None:
    """What is wrong with ``value`` as an integer >= ``minimum``, e.g. ``must be a positive integer, got 0``; None
    when nothing is. Bools are not integers here; numpy integers are; None is accepted with ``none_ok``. A bound
    with a reason (``why``) is said as a number: ``must be an integer >= 1 (for gausslegendre), got 0``."""
    if value is None and none_ok:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return None
    if why:
        expected = f"an integer >= {minimum} ({why})"
    else:
        expected = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
    return f"must be {expected}{' or None' if none_ok else ''}, got {value!r}"


def check_int(name: str, value: Any, minimum: int = 1, *, none_ok: bool = False, why: str = "",
              error: type[FastigError] = InvalidArgumentError) -> int | None:
    """``value`` as an ``int`` if it is an integer >= ``minimum`` (by default a positive integer; None passes with
    ``none_ok``), else ``error`` (default :class:`InvalidArgumentError`: a ValueError and, for Captum's callers,
    an AssertionError) in one line naming the argument: ``n_samples must be a positive integer, got 0``. ``why``
    says in parentheses what the bound is for. The CLI's integer flags check with the same rule
    (``fastig.cli.IntAtLeast``)."""
    problem = int_problem(value, minimum, none_ok, why)
    if problem is not None:
        raise error(f"{name} {problem}")
    return None if value is None else int(value)
