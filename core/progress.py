"""Progress bars that stay quiet: labelled, gone when done, and plain lines when stdout is not a terminal."""

from __future__ import annotations

import sys
import time


class _PlainLines:
    """Periodic plain lines (no carriage returns or cursor codes) for logs and pipes."""

    def __init__(self, iterable, desc: str, total: int | None, every_s: float = 10.0):
        self.iterable, self.desc, self.total, self.every_s = iterable, desc, total, every_s

    def __iter__(self):
        start = last = time.monotonic()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.every_s:
                last = now
                of = f"/{self.total}" if self.total else ""
                print(f"{self.desc}: {done}{of} ({now - start:.0f} s)", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:  # tqdm's API, for callers that label the current step
        pass


def bar(iterable, *, desc: str, unit: str = "it", total: int | None = None, leave: bool = False):
    """A tqdm bar on a terminal (removed when done unless ``leave``); plain periodic lines otherwise."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not sys.stderr.isatty():
        return _PlainLines(iterable, desc, total)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, dynamic_ncols=True)
