"""Figures drawn in a second process while this one computes the next experiment (``reproduce``).

A figure is drawn from its run's saved data and meta alone (``plot(folder, meta)``, compute-then-save-then-plot),
so it can be drawn anywhere. In ``reproduce`` drawing is about as long as computing, and both were on one core:
matplotlib's text layout and rasterisation run under the GIL, so a thread cannot overlap them. A worker process
can. :class:`Plotter` keeps one, started with ``spawn`` (a fork of a process whose torch threads are running may
deadlock), warmed by importing matplotlib while the parent imports torch.

Only records whose ``plot`` is a ``"module:attr"`` string are drawn there (the worker imports it by name); a plot
given as a callable (a plugin's function, a test's lambda) is drawn in this process, as is everything when the
worker cannot start or dies (:meth:`Plotter.submit` returns None, or :func:`drawn` falls back). The figures are the
same files either way (tested). ``ATTNLAB_PLOT_WORKER=0`` turns the worker off.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from pathlib import Path


class Plotter:
    """One worker process that draws figures; :meth:`close` ends it (pending figures are drawn first).

    Requests wait here, in this process, and go to the worker one at a time (a dispatcher thread hands over the
    next when the last is drawn), so a request the worker has not started can still be cancelled and drawn by a
    caller that would otherwise wait (:func:`drawn`). ProcessPoolExecutor's own queue would have marked the next
    requests running already."""

    def __init__(self):
        import threading
        from collections import deque

        self._pool = None
        self._queue: deque = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = None
        if os.environ.get("ATTNLAB_PLOT_WORKER") == "0":
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init)
            self._pool.submit(_warm)  # matplotlib's import, on the other core
        except (OSError, RuntimeError):
            self._pool = None
            return
        self._thread = threading.Thread(target=self._dispatch, name="attnlab-plot-dispatch", daemon=True)
        self._thread.start()

    def submit(self, ref, folder: Path, meta: dict) -> Future | None:
        """Queue ``ref(folder, meta)`` for the worker; None when it must be drawn here (see the module)."""
        if self._pool is None or not isinstance(ref, str):
            return None
        future = Future()
        with self._wake:
            self._queue.append((future, (ref, str(folder), meta)))
            self._wake.notify()
        return future

    def _dispatch(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                future, args = self._queue.popleft()
            if not future.set_running_or_notify_cancel():  # a waiting caller drew it itself
                continue
            try:
                future.set_result(self._pool.submit(_draw, *args).result())
            except BaseException as exc:  # the plot's own error, or a broken pool (drawn() then draws it here)
                future.set_exception(exc)

    def close(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._closing = True
                self._wake.notify()
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            # every request is answered by now, so this waits only for the idle worker's exit (0.03-0.04 s measured;
            # 0.6 s when it is still warming up). Not waiting left the pool's manager thread running into
            # interpreter exit, where Python 3.11's concurrent.futures can write to the wake-up pipe the thread is
            # closing ("OSError: Bad file descriptor", a traceback at exit; once in a full test run under load)
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "Plotter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drawn(future: Future, draw_here) -> tuple[dict, float]:
    """``(figures, seconds spent drawing)`` of a submitted plot. ``draw_here()`` draws it in this process instead
    when the worker has not started it (this process is waiting for it, so it is free: at the end of ``reproduce``
    the two processes share the queue) or died under it. An error of the plot itself is raised, as it would be
    here."""
    from concurrent.futures import BrokenExecutor

    if not future.cancel():
        try:
            return future.result()
        except BrokenExecutor:  # the worker died, or the pool was broken before this was handed over
            pass
    t0 = time.perf_counter()
    figures = draw_here()
    return figures, time.perf_counter() - t0


def _init() -> None:
    from attnlab.core.resources import keep_freed_memory

    os.environ["MPLBACKEND"] = "Agg"  # headless, as the command line is
    keep_freed_memory()  # attnlab's own process, as the command line's is


def _warm() -> None:
    import gc

    import matplotlib.pyplot  # noqa: F401

    gc.freeze()  # the imported modules: left out of every collection, and out of the exit's (0.3 s less)


def _draw(ref: str, folder: str, meta: dict) -> tuple[dict, float]:
    from attnlab.core.runs import draw

    t0 = time.perf_counter()
    figures = draw(ref, Path(folder), meta)
    return figures, time.perf_counter() - t0
