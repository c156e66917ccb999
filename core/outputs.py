"""Run folders: staged, atomic outputs; a reuse key; reuse of finished work that never mixes two runs.

A run writes every output into a staging folder inside its output folder. Only when all of them exist
is the previous run swapped out: its ``meta.json`` is removed first, its outputs that the new run does
not write are deleted, the new files are renamed into place and the new ``meta.json`` is written *last*.
So an interrupted run leaves the previous finished run untouched (and reusable), and a folder never
holds files of two runs under one ``meta.json``. A marker file makes even an interrupted swap
recoverable: the next run deletes what the marker lists. Stale temporaries and staging folders of a
killed run are removed at the next start.

Every file is written to a temporary name and renamed into place, with the mode the umask allows
(0644 under the usual 022), never the 0600 that ``mkstemp`` would leave.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from attnlab.core.errors import InputError
from attnlab.core.provenance import digest

TMP_TAG = ".attnlab-tmp"
STAGING = ".attnlab-staging"
SWAP_MARKER = ".attnlab-swap.json"
DERIVED = ("view.html",)  # drawn from a run by `attnlab view`: stale once the run is replaced


def config_hash(config: dict) -> str:
    return digest(config)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The file gets mode ``0666 & ~umask`` (world-readable under the usual umask 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_TAG + (suffix or path.suffix))
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(obj):
    """NaN and infinities become None (null): they are not valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def write_csv(path, header: list[str], rows) -> None:
    """A CSV written by the csv module (fields with commas, quotes or newlines are quoted)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def check_out_dir(out_dir) -> Path:
    """The output folder, created if needed; a clear error *before* any work when it cannot be one."""
    if out_dir is None or str(out_dir).strip() == "":
        raise InputError("the output folder is empty; pass a folder path (out, e.g. runs/my-run)")
    path = Path(out_dir).expanduser()
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == path else f"lies under {ancestor}, which is a file"
                raise InputError(f"output folder {path} {where}, not a folder; choose another output folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".attnlab-probe", suffix=TMP_TAG)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write into output folder {path}: {exc.strerror or exc}; choose a writable "
                         "output folder") from None
    return path


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def versions() -> dict:
    import numpy
    import torch
    import transformers

    from attnlab import __version__

    return {"attnlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


class RunFolder:
    """One experiment's output folder.

    >>> run = RunFolder(out, "induction")             # checks the folder, recovers an interrupted run
    >>> meta = run.finished(key)                      # the finished run with this key, or None
    >>> stage = run.stage()                           # write outputs into stage / NAME
    >>> meta = run.commit(key, config, outputs, ...)  # swap them in; meta.json last
    """

    def __init__(self, out_dir, experiment: str):
        self.path = check_out_dir(out_dir)
        self.experiment = experiment
        self._recover()
        meta = self.meta()
        other = (meta or {}).get("experiment")
        if other is None and (self.path / "report.json").exists():
            other = "reproduce"
        if other is not None and other != experiment:
            raise InputError(f"output folder {self.path} holds a finished '{other}' run; write this "
                             f"'{experiment}' run to another folder (out) so their files do not mix")

    @property
    def staging(self) -> Path:
        return self.path / STAGING

    def meta(self) -> dict | None:
        return read_json(self.path / "meta.json")

    def _recover(self) -> None:
        marker = read_json(self.path / SWAP_MARKER)
        if marker is not None and not (self.path / "meta.json").exists():
            for name in marker.get("files", []):  # a swap was cut short: none of these files can be trusted
                (self.path / name).unlink(missing_ok=True)
        (self.path / SWAP_MARKER).unlink(missing_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        for stale in self.path.glob(f".*{TMP_TAG}*"):
            stale.unlink(missing_ok=True)

    def finished(self, key: str) -> dict | None:
        """The previous run's meta (marked ``reused``) if it finished with this key and its outputs exist."""
        meta = self.meta()
        if not meta or meta.get("reuse_key") != key:
            return None
        if not all((self.path / f).is_file() for f in meta.get("outputs", [])):
            return None
        meta["reused"] = True
        return meta

    def stage(self) -> Path:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self.staging

    def commit(self, key: str, config: dict, outputs: list[str], identity: dict | None = None, **extra) -> dict:
        """Swap the staged ``outputs`` in for the previous run's and write meta.json (last)."""
        old = set((self.meta() or {}).get("outputs", []))
        missing = [f for f in outputs if not (self.staging / f).is_file()]
        if missing:
            raise RuntimeError(f"run did not write {missing}")  # a bug, not a user error
        write_json(self.path / SWAP_MARKER, {"files": sorted(old | set(outputs))})
        (self.path / "meta.json").unlink(missing_ok=True)
        for name in (old - set(outputs)) | set(DERIVED):
            (self.path / name).unlink(missing_ok=True)
        for name in outputs:
            os.replace(self.staging / name, self.path / name)
        meta = {"experiment": self.experiment, "config": config, "config_hash": config_hash(config),
                "reuse_key": key, "identity": identity or {}, "outputs": sorted(outputs),
                "versions": versions(), **extra}
        write_json(self.path / "meta.json", meta)
        (self.path / SWAP_MARKER).unlink(missing_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        return meta


def reuse_key(config: dict, **identity) -> tuple[str, dict]:
    """(key, identity): the hash of the config and of every digest that determines the result.

    ``identity`` values that are None (unknown, e.g. a model whose weights are not on disk yet) make the
    key unmatchable, so nothing is reused on a guess.
    """
    from attnlab.core.provenance import code_fingerprint

    identity = {**identity, "attnlab": code_fingerprint()}
    if any(v is None for v in identity.values()):
        return f"unknown-{os.getpid()}-{id(identity)}", identity
    return digest({"config": config, **identity}), identity


def begin_run(out_dir, experiment: str, cfg, lm=None, reuse: bool = True, **identity):
    """Open ``out_dir`` for ``experiment`` and compute the reuse key of ``cfg`` (a config dataclass with
    ``model`` and ``revision``), the model (``lm`` or the files ``cfg.model`` names) and ``identity``'s other
    digests. Returns ``(run, config, key, identity, meta)``; ``meta`` is the finished run to reuse, or None."""
    from dataclasses import asdict

    from attnlab.core.models import model_identity

    run = RunFolder(out_dir, experiment)
    config = asdict(cfg)
    key, identity = reuse_key(config, model=model_identity(cfg.model, cfg.revision, lm), **identity)
    return run, config, key, identity, (run.finished(key) if reuse else None)
