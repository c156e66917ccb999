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
