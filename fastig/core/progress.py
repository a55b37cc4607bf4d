"""Progress of long work: one mechanism for every part of fastig.

Long work opens a *task* and advances it::

    with progress.task("guided_ig", total=64, unit="steps") as t:
        for step in ...:
            ...
            t.advance()

and the engine calls :func:`pulse` after every model pass (and opens a ``path`` task per path it walks), so the
display moves even while a single step of a slow method runs, and the ETA of the outermost task counts the work
done inside the units under way (:meth:`Task.underway`), not only the units finished. Nothing is printed unless a
display is open. A task opened with ``show=True`` while none is open starts one (``fastig attribute`` does this for
its images; ``show_progress=True`` on a Captum-style class for that call); a task opened while a display is open is
shown on the same line, after the tasks that enclose it::

    guided_ig on resnet50 [######........] 3/8 images (38%), 0.02 images/s, ETA 0:04:10 | path 12/64 steps | 230 model passes

On a terminal the line is redrawn at most every 0.1 s; elsewhere (a log file, CI) a plain line is written every
``interval`` seconds and when the outermost task ends.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

TTY_REFRESH = 0.1  # seconds between redraws of a terminal line
LOG_INTERVAL = 5.0  # default seconds between log lines when the stream is not a terminal
BAR_WIDTH = 30


class Task:
    """One piece of work: ``count`` of ``total`` ``unit`` done (``total`` None: unknown), and the model passes
    made since it started."""

    def __init__(self, label: str, total: int | None, unit: str, display: "_Display | None"):
        self.label, self.total, self.unit, self._display = label, total, unit, display
        self.count, self.passes, self.started = 0, 0, time.perf_counter()
        self.pending = 1  # units under way, which the tasks opened inside this one work on

    def underway(self, n: int) -> None:
        """The next ``n`` units are being worked on (by the tasks opened inside this one, for the ETA)."""
        self.pending = n

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self._display is not None:
            self._display.refresh(final=self._display.tasks[0] is self and self.total is not None
                                  and self.count >= self.total)

    def rate(self, now: float, partial: float = 0.0) -> float:
        """Units per second, counting ``partial`` (0..1) of the units under way as done."""
        elapsed = now - self.started
        return (self.count + self.pending * partial) / elapsed if elapsed > 0 else 0.0

    def describe(self, now: float, first: bool, partial: float = 0.0) -> str:
        if not first:
            return f"{self.label} {self.count}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"
        rate = self.rate(now, partial)
        text = f"{self.count}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"
        if self.total is not None:
            left = self.total - self.count - self.pending * partial
            eta = left / rate if rate > 0 else math.inf
            text += f" ({100 * self.count / max(self.total, 1):.0f}%), {rate:.2f} {self.unit}/s, ETA {duration(eta)}"
        else:
            text += f", {rate:.2f} {self.unit}/s"
        return text


class _Display:
    """Where the open tasks are shown: one line on ``stream``."""

    def __init__(self, stream: TextIO, interval: float, prefix: str, bar: bool):
        self.stream, self.interval, self.prefix = stream, interval, prefix
        self.tty = bar and hasattr(stream, "isatty") and stream.isatty()
        self.tasks: list[Task] = []
        self.last = time.perf_counter()
        self.width = 0  # of the last terminal line, to blank what a shorter one leaves

    def refresh(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < (TTY_REFRESH if self.tty else self.interval):
            return
        self.last = now
        root = self.tasks[0]
        parts = [root.describe(now, first=True, partial=_fraction(self.tasks[1:]))]
        parts += [t.describe(now, first=False) for t in self.tasks[1:]]
        passes = self.tasks[-1].passes
        if passes:
            parts.append(f"{passes} model pass" + ("es" if passes > 1 else ""))
        if self.tty:
            bar = ""
            if root.total is not None:
                filled = int(BAR_WIDTH * min(root.count, root.total) / max(root.total, 1))
                bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            line = f"{self.prefix}{root.label} {bar}" + " | ".join(parts)
            self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
            self.width = len(line)
        else:
            self.stream.write(f"{self.prefix}{root.label}: " + " | ".join(parts) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fraction(inner: list[Task]) -> float:
    """How far the innermost tasks are through the outer task's units under way (0..1): each task with a total
    counts its finished units plus the fraction of the one under way; a task without a total tells nothing."""
    fraction = 0.0
    for t in reversed(inner):
        fraction = min(1.0, (min(t.count, t.total) + fraction) / t.total) if t.total else 0.0
    return fraction


_displays: list[_Display] = []  # the open display (at most one is used: the outermost)
_silent: list[Task] = []  # tasks open while no display is


@contextmanager
def task(label: str, total: int | None = None, unit: str = "items", *, show: bool = False,
         stream: TextIO | None = None, interval: float = LOG_INTERVAL, prefix: str = "",
         bar: bool = True) -> Iterator[Task]:
    """Open a task (see the module docstring). ``show``, ``stream`` (default stderr), ``interval``, ``prefix`` and
    ``bar`` (False: log lines even on a terminal) matter only when no display is open: then ``show=True`` opens
    one for this task and the tasks inside it."""
    display = _displays[0] if _displays else None
    owns = display is None and show
    if owns:
        display = _Display(stream or sys.stderr, interval, prefix, bar)
        _displays.append(display)
    t = Task(label, total, unit, display)
    (display.tasks if display is not None else _silent).append(t)
    try:
        yield t
    finally:
        (display.tasks if display is not None else _silent).remove(t)
        if owns:
            display.close()
            _displays.remove(display)


def pulse() -> None:
    """One model pass was made: counted on every open task, and the display refreshed (rate-limited)."""
    for t in (_displays[0].tasks if _displays else _silent):
        t.passes += 1
    if _displays and _displays[0].tasks:
        _displays[0].refresh()


def duration(seconds: float) -> str:
    """``H:MM:SS``, or ``?`` for an unknown (infinite) time."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
