"""UMAP fits in a second process that starts while this one is still loading the model.

In a fresh process a grid of UMAP fits first pays for importing umap-learn (with scikit-learn, scipy and numba:
about 2 s) and for loading numba's compiled functions (about 1.5 s). That work is Python under the GIL, so a
thread cannot overlap it with the model load, which is also imports. A child process can: started before the
model loads, it imports umap-learn and loads the compiled functions on the other core, then waits for panels.

Protocol (both ends are this module): the parent writes one pickled ``(points, kwargs)`` per request to the child's
stdin, the child answers with one pickled ``("ok", layouts)`` or ``("error", message)`` on its own copy of stdout
(fd 1 itself is pointed at stderr, so nothing a library prints can corrupt the answer). The child computes with
:func:`attnlab.geometry.embedding.fit_panels`, the same code as the in-process path: the layouts are the same, bit
for bit. The child exits when the parent closes its stdin, or when the parent exits.

If the child cannot start or dies, the fits run in this process instead (:func:`fit_remote` returns None).
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import tempfile
import threading

_lock = threading.Lock()
_child: dict = {}


def start() -> None:
    """Start the worker (once per process; idempotent). Cheap here: the child does its imports on its own."""
    with _lock:
        if "proc" in _child or os.environ.get("ATTNLAB_UMAP_WORKER") == "0":
            return
        try:
            err = tempfile.TemporaryFile()
            proc = subprocess.Popen([sys.executable, "-m", "attnlab.geometry.fitworker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except OSError:
            return
        _child.update(proc=proc, err=err)
        atexit.register(stop, False)


def stop(reap: bool = True) -> None:
    """End the worker: it exits on the end of its input. Not waited for (an idle child ends on its own); with
    ``reap`` a daemon thread collects its exit status (not at interpreter exit, where no thread may start)."""
    with _lock:
        proc = _child.pop("proc", None)
        err = _child.pop("err", None)
    if proc is None:
        return
    try:
        proc.stdin.close()
    except OSError:
        pass
    if reap and proc.poll() is None:
        threading.Thread(target=_reap, args=(proc,), daemon=True).start()
    err.close()


def _reap(proc) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def fit_remote(points, kwargs: dict):
    """The worker's :func:`~attnlab.geometry.embedding.fit_panels` of ``points`` (a list of ``[n_i, d]`` float64
    arrays), or None when no worker runs or it failed (the caller then fits here). An error the fits themselves
    raise is raised here, as the in-process fit would raise it."""
    with _lock:
        proc = _child.get("proc")
        if proc is None:
            return None
        try:
            pickle.dump((points, kwargs), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            status, value = pickle.load(proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError):
            status, value = "dead", None
    if status == "ok":
        return value
    if status == "error":
        raise RuntimeError(value)
    stop()  # it died: never ask it again
    return None


def main() -> None:
    from attnlab.core.resources import keep_freed_memory

    keep_freed_memory()  # attnlab's own process, as the command line's is
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever umap-learn, numba or scikit-learn print goes to stderr, never into the answer
    requests = sys.stdin.buffer
    from attnlab.geometry.embedding import fit_panels, warm

    warm()
    while True:
        try:
            points, kwargs = pickle.load(requests)
        except EOFError:
            return
        try:
            reply = ("ok", fit_panels(points, **kwargs))
        except Exception as exc:  # noqa: BLE001 - sent back, raised in the parent
            reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, answer, protocol=pickle.HIGHEST_PROTOCOL)
        answer.flush()


if __name__ == "__main__":
    main()
