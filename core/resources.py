"""Up-front bounds: work that can never fit in this machine's memory fails before it starts."""

from __future__ import annotations

import os

from attnlab.core.errors import InputError


def available_memory_bytes() -> int:
    """Memory available to a new allocation (MemAvailable), or the physical memory where that is unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_fits(bytes_needed: float, what: str, per_unit: float, unit_name: str) -> None:
    """Raise a one-line error when ``bytes_needed`` exceeds the memory available, naming the largest count
    of ``unit_name`` (each ``per_unit`` bytes) that would fit."""
    available = available_memory_bytes()
    if bytes_needed > available:
        fits = int(available // max(per_unit, 1))
        raise InputError(f"{what} needs about {bytes_needed / 2**30:.3g} GiB of memory but this machine has "
                         f"{available / 2**30:.3g} GiB available; use at most about {fits} {unit_name}")


def keep_freed_memory() -> bool:
    """Process-wide: let glibc's malloc keep large freed blocks for reuse instead of handing them back to the
    system at once. By default every allocation above a threshold (128 KiB, rising to at most 32 MiB) is a fresh
    ``mmap``, which the kernel zeroes page by page on first touch, unmapped again when freed: arrays of tens to
    hundreds of MB made and dropped in a loop (the geometry's scaling metrics and their resamples) then spend as
    much time in the kernel as in the computation. Raising both thresholds to 1 GiB made the offline main job's
    system time fall from 14.5-17.2 s to 3.3-4.2 s (``docs/benchmarks.md``); the price is a resident size that
    stays near its peak.

    For attnlab's own processes only (the command line and its worker processes): a library must not change its
    user's allocator. Returns whether it applied (False where the C library has no ``mallopt``, e.g. macOS)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold, one_gib = -1, -3, 1 << 30  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, one_gib)) and bool(mallopt(m_trim_threshold, one_gib))
