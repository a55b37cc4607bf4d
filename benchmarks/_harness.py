"""Honest side-by-side timings: warm-up first, then alternating rounds, ratios of medians.

Why not plain pytest-benchmark groups: a group runs its tests one after the other, so the first one pays for cold
caches, lazy library initialization (oneDNN primitives, allocator growth) and whatever else the shared machine
does at that moment; the ratio then measures the order as much as the code. Here every case is warmed up once,
then the cases run in rounds whose order alternates (forward, reversed, forward, ...), so no case always runs
first or last, and each case reports its median wall time and process CPU time. Ratios are ratios of medians,
printed with the spread of the per-round ratios.

``alternate_processes`` does the same for whole processes (import, model construction, preparation and the work):
what a user waits for from the shell. ``Worker`` is a persistent process that times the code it is sent, for
comparing two environments (source trees, allocator settings) call by call without restarting either.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Timings:
    """Per case, the wall and CPU seconds of every round (in round order)."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str, kind: str = "wall") -> float:
        return statistics.median(getattr(self, kind)[name])

    def ratio(self, slow: str, fast: str, kind: str = "wall") -> float:
        """How many times faster ``fast`` is than ``slow`` (median over median)."""
        return self.median(slow, kind) / self.median(fast, kind)

    def round_ratios(self, slow: str, fast: str, kind: str = "wall") -> list[float]:
        a, b = getattr(self, kind)[slow], getattr(self, kind)[fast]
        return [x / y for x, y in zip(a, b)]

    def table(self, reference: str | None = None) -> str:
        names = list(self.wall)
        reference = reference or names[0]
        lines = [f"{'case':<34} {'wall (median)':>13} {'cpu (median)':>13} {'rounds':>6}  x faster than " + reference]
        for name in names:
            spread = self.round_ratios(reference, name)
            lines.append(f"{name:<34} {self.median(name):>12.3f}s {self.median(name, 'cpu'):>12.3f}s "
                         f"{len(self.wall[name]):>6}  {self.ratio(reference, name):.2f} "
                         f"(rounds {min(spread):.2f}-{max(spread):.2f}; cpu {self.ratio(reference, name, 'cpu'):.2f})")
        return "\n".join(lines)

    def record(self, benchmark, reference: str | None = None) -> None:
        """Put the medians and ratios into pytest-benchmark's ``extra_info`` and print the table."""
        reference = reference or next(iter(self.wall))
        for name in self.wall:
            benchmark.extra_info[f"{name}_wall_s"] = round(self.median(name), 4)
            benchmark.extra_info[f"{name}_cpu_s"] = round(self.median(name, "cpu"), 4)
            benchmark.extra_info[f"{name}_x_faster_than_{reference}"] = round(self.ratio(reference, name), 3)
        print("\n" + self.table(reference))
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def alternate(cases: dict[str, Callable[[], Any]], rounds: int = 3, warmup: int = 1,
              sync: Callable[[], None] | None = None) -> Timings:
    """Time every case ``rounds`` times after ``warmup`` untimed runs, alternating the order between rounds.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each case so that queued device work is counted."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
            if sync:
                sync()
    timings = Timings({n: [] for n in names}, {n: [] for n in names})
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            cases[name]()
            if sync:
                sync()
            timings.wall[name].append(time.perf_counter() - wall)
            timings.cpu[name].append(time.process_time() - cpu)
    return timings


def alternate_processes(commands: dict[str, list[str]], rounds: int = 3, env: dict | None = None) -> Timings:
    """Whole-process wall and CPU (user + system of the child) time of each command, alternating the order."""
    names = list(commands)
    timings = Timings({n: [] for n in names}, {n: [] for n in names})
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = time.perf_counter()
            subprocess.run(commands[name], check=True, env=env, capture_output=True)
            timings.wall[name].append(time.perf_counter() - wall)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            timings.cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return timings


def python(code: str, *args: str) -> list[str]:
    """A command running ``code`` in a fresh interpreter (this one's executable)."""
    return [sys.executable, "-c", code, *args]


def json_line(output: str) -> dict:
    """The last line of a subprocess's output, as JSON."""
    return json.loads(output.strip().splitlines()[-1])


_WORKER_LOOP = r"""
import json, sys, time
print("READY", flush=True)
for line in sys.stdin:
    code = json.loads(line)
    wall, cpu = time.perf_counter(), time.process_time()
    eval(code)
    print("RESULT " + json.dumps([time.perf_counter() - wall, time.process_time() - cpu]), flush=True)
"""


class Worker:
    """A Python process that runs ``setup`` once (under this environment plus ``env``) and then times each
    expression it is sent, in its own namespace: ``time(code)`` returns (wall, CPU) seconds."""

    def __init__(self, setup: str, env: dict | None = None):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-c", setup + _WORKER_LOOP], env=env, cwd="/tmp", text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.process.stdout:  # anything else the code prints is skipped
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"worker exited with {self.process.wait()}")

    def time(self, code: str) -> tuple[float, float]:
        self.process.stdin.write(json.dumps(code) + "\n")
        self.process.stdin.flush()
        return tuple(json.loads(self._read("RESULT ")))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
