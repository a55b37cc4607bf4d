"""A bounded-memory block for tests of inputs that ask for unbounded memory (``from _limits import memory_limit``).

Inside ``memory_limit(extra)`` the process may map at most ``extra`` more bytes of address space than it holds on
entry (``RLIMIT_AS``), so code that would allocate without bound fails inside the test (MemoryError, cv2.error,
RuntimeError) instead of taking the machine down; the old limit is restored on exit.
"""

import contextlib
import os
import resource
import sys

import pytest


def mapped_bytes() -> int:
    """The process's current address-space size (VmSize), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def memory_limit(extra: int):
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc/self/statm are Linux-only")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped_bytes() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
