"""Run folders: staged, atomic, verified outputs; one run at a time; nothing touched outside the folder.

A run writes every output into a staging folder inside its output folder. Only when all of them exist
is the previous run swapped out: its ``meta.json`` is removed first, its outputs that the new run does
not write are deleted, the new files are renamed into place and the new ``meta.json`` is written *last*.
So an interrupted run leaves the previous finished run untouched (and reusable), and a folder never
holds files of two runs under one ``meta.json``. A marker file makes even an interrupted swap
recoverable: the next run deletes what the marker lists. Stale temporaries and staging folders of a
killed run are removed at the next start.

What a run promises:
- **One run at a time.** An exclusive lock (``.attnlab-lock``, released when the process ends, however it
  ends) is held from opening the folder to the end of the run; a second run into the same folder gets a
  one-line error naming the holder.
- **Finished means verified.** ``meta.json`` records every output's size and SHA-256 and a digest of itself; a
  run is reused only when each output and meta.json are as written (a truncated or emptied file, or an edited
  field, is recomputed, never served).
- **Only its own files.** A run deletes or replaces only plain files inside its folder whose names it
  validates (:func:`check_name`: no ``/``, no ``..``, no hidden or absolute names), whatever an old
  ``meta.json`` or marker lists; a finished run of another experiment, or of the same experiment in another
  *slot* (e.g. another RRT variant), is refused rather than replaced.
- **A failed run leaves nothing behind** that it created: the folders it made are removed again.

Every file is written to a temporary name and renamed into place, with the mode the umask allows
(0644 under the usual 022), never the 0600 that ``mkstemp`` would leave.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from attnlab.core.errors import InputError
from attnlab.core.provenance import digest

TMP_TAG = ".attnlab-tmp"
STAGING = ".attnlab-staging"
SWAP_MARKER = ".attnlab-swap.json"
LOCK = ".attnlab-lock"
DERIVED = ("view.html",)  # drawn from a run by `attnlab view`: stale once the run is replaced
MAX_NAME = 255


def config_hash(config: dict) -> str:
    return digest(config)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_name(name, what: str = "output name") -> str:
    """``name`` if it is a plain file name (no folder part, not hidden, not ``..``); else a one-line error.

    Every name a run writes or deletes passes here, whether it comes from attnlab, a plugin (variant and
    target names) or an old ``meta.json``."""
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".") or "/" in name
            or "\\" in name or "\x00" in name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME
            or any(ord(c) < 32 for c in name)):
        raise InputError(f"{what} {name!r} is not a plain file name (no '/', no '..', not hidden, at most "
                         f"{MAX_NAME} bytes); rename it")
    return name


def is_plain_name(name) -> bool:
    try:
        check_name(name)
        return True
    except InputError:
        return False


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The file gets mode ``0666 & ~umask`` (world-readable under the usual umask 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=TMP_TAG + (suffix or path.suffix))
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


def csv_cell(v) -> str:
    """One CSV field: text as it is, a float to 6 significant digits, an empty field for None or a non-finite
    float, a bool as 0/1, anything else (an int) by ``str``."""
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_csv(path, header: list[str], rows) -> None:
    """A CSV written by the csv module (fields with commas, quotes or newlines are quoted)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _missing_ancestors(path: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``path``, deepest first."""
    out = []
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        out.append(p)
    return out


def check_out_dir(out_dir, created: list | None = None) -> Path:
    """The output folder, created if needed; a clear error *before* any work when it cannot be one.
    ``created`` (a list) receives the folders this call made, deepest first."""
    if out_dir is None or str(out_dir).strip() == "":
        raise InputError("the output folder is empty; pass a folder path (out, e.g. runs/my-run)")
    path = Path(out_dir).expanduser()
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == path else f"lies under {ancestor}, which is a file"
                raise InputError(f"output folder {path} {where}, not a folder; choose another output folder")
            break
    made = _missing_ancestors(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".attnlab-probe", suffix=TMP_TAG)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_empty(made)
        raise InputError(f"cannot write into output folder {path}: {exc.strerror or exc}; choose a writable "
                         "output folder") from None
    if created is not None:
        created.extend(made)
    return path


def remove_empty(folders) -> None:
    """Remove each of ``folders`` (deepest first) if it is empty; never anything else."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable, not a plain file or not an object."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def versions() -> dict:
    import numpy
    import torch
    import transformers

    from attnlab._version import __version__

    return {"attnlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def file_record(path: Path) -> dict:
    """Size and SHA-256 of a file: what ``meta.json`` records so a finished run can be verified later."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _meta_digest(meta: dict) -> str:
    """Digest of a meta.json's content as it is stored (its own ``meta_sha256`` left out)."""
    import hashlib

    body = {k: v for k, v in meta.items() if k not in ("meta_sha256", "reused")}
    text = json.dumps(json_safe(body), sort_keys=True, default=str, allow_nan=False)
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest()


def valid_meta(meta) -> bool:
    """Whether a parsed ``meta.json`` is a finished run's as it was written: the fields a finished run needs, of the
    right types, and the digest recorded at commit (so no field was edited or damaged since)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("meta_sha256"), str):
        return False
    if meta["meta_sha256"] != _meta_digest(meta):
        return False
    outputs, files = meta.get("outputs"), meta.get("files")
    return (isinstance(meta.get("experiment"), str) and isinstance(meta.get("reuse_key"), str)
            and isinstance(meta.get("config"), dict) and isinstance(outputs, list)
            and all(is_plain_name(n) for n in outputs) and isinstance(files, dict)
            and all(isinstance(files.get(n), dict) and isinstance(files[n].get("bytes"), int)
                    and isinstance(files[n].get("sha256"), str) for n in outputs))


@contextmanager
def folder_lock(path: Path):
    """Hold ``path``'s run lock for the block; a one-line error naming the holder when another run has it."""
    import fcntl

    lock_path = path / LOCK
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~_umask())
    except OSError as exc:
        raise InputError(f"cannot create the run lock in {path}: {exc.strerror or exc}; choose another output "
                         "folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
                holder = (f" (pid {info.get('pid')}, started {info.get('started')}: {info.get('command', '?')})"
                          if isinstance(info, dict) else "")
            except (OSError, ValueError):
                pass
            raise InputError(f"output folder {path} is in use by another attnlab run{holder}; wait for it to "
                             "finish or choose another output folder") from None
        import sys

        info = {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["attnlab", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class RunFolder:
    """One experiment's output folder, held for the duration of a run (a context manager).

    >>> with RunFolder(out, "induction", slot={"variant": "standard"}) as run:
    ...     meta = run.finished(key)                     # the finished run with this key, verified, or None
    ...     stage = run.stage()                          # write outputs into stage / NAME
    ...     meta = run.commit(key, config, outputs, ...) # swap them in; meta.json last

    Leaving the block with an exception removes the staging folder and the folders this run created.
    """

    def __init__(self, out_dir, experiment: str, slot: dict | None = None):
        self.experiment = experiment
        self.slot = slot or {}
        self.created: list[Path] = []
        self.path = check_out_dir(out_dir, self.created)
        self._lock = None

    # ---------------------------------------------------------------- holding the folder

    def __enter__(self) -> "RunFolder":
        lock = folder_lock(self.path)
        lock.__enter__()  # another run holds the folder: its one-line error, and this run touches nothing
        self._lock = lock
        try:
            self._recover()
            self._check_owner()
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release(failed=exc_type is not None)

    def _release(self, failed: bool) -> None:
        if self._lock is None:
            return
        if failed:
            self._remove_staging()
        lock, self._lock = self._lock, None
        lock.__exit__(None, None, None)
        if failed and self.created and self._only_own_files():
            (self.path / LOCK).unlink(missing_ok=True)
            remove_empty(self.created)

    def _only_own_files(self) -> bool:
        try:
            return all(p.name == LOCK for p in self.path.iterdir())
        except OSError:
            return False

    # ---------------------------------------------------------------- state

    @property
    def staging(self) -> Path:
        return self.path / STAGING

    def _meta_path(self) -> Path:
        path = self.path / "meta.json"
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise InputError(f"{path} is not a plain file; remove it or choose another output folder")
        return path

    def meta(self) -> dict | None:
        """The folder's ``meta.json`` if it describes a finished run (fields of the right types), else None."""
        meta = read_json(self._meta_path())
        return meta if valid_meta(meta) else None

    def _recover(self) -> None:
        marker = read_json(self.path / SWAP_MARKER)
        if marker is not None and not self._meta_path().exists():
            files = marker.get("files")
            for name in files if isinstance(files, list) else []:  # a swap was cut short: none can be trusted
                self._unlink_own(name)
        self._unlink_plain(self.path / SWAP_MARKER)
        self._remove_staging()
        for stale in self.path.glob(f".*{TMP_TAG}*"):
            self._unlink_plain(stale)

    def _check_owner(self) -> None:
        meta = read_json(self._meta_path())
        other = meta.get("experiment") if meta else None
        if other is None and (self.path / "report.json").exists():
            other = "reproduce"
        if isinstance(other, str) and other != self.experiment:
            raise InputError(f"output folder {self.path} holds a finished '{other}' run; write this "
                             f"'{self.experiment}' run to another folder (out) so their files do not mix")
        config = meta.get("config") if meta else None
        if isinstance(config, dict):
            for name, value in self.slot.items():
                if name in config and config[name] != value:
                    raise InputError(f"output folder {self.path} holds a finished {self.experiment} run with "
                                     f"{name} {config[name]!r}; this run ({name} {value!r}) would replace its files - "
                                     "write it to another folder (out)")

    def _unlink_plain(self, path: Path) -> None:
        if _plain_file(path) or path.is_symlink():
            path.unlink(missing_ok=True)

    def _unlink_own(self, name) -> None:
        """Delete a file of this folder by a name from a marker or an old meta.json - only a plain file name."""
        if is_plain_name(name):
            self._unlink_plain(self.path / name)

    def _remove_staging(self) -> None:
        staging = self.staging
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
            staging.unlink()
        elif staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    def finished(self, key: str) -> dict | None:
        """The previous run's meta (marked ``reused``) if it finished with this key and every output still has
        the size and SHA-256 recorded at commit; else None."""
        meta = self.meta()
        if not meta or meta.get("reuse_key") != key or meta.get("experiment") != self.experiment:
            return None
        for name in meta["outputs"]:
            path = self.path / name
            if not _plain_file(path) or file_record(path) != {k: meta["files"][name][k] for k in ("bytes", "sha256")}:
                return None
        meta["reused"] = True
        return meta

    def stage(self) -> Path:
        self._remove_staging()
        self.staging.mkdir()
        return self.staging

    def commit(self, key: str, config: dict, outputs: list[str], identity: dict | None = None,
               kept: list[str] = (), **extra) -> dict:
        """Swap the staged ``outputs`` in (``kept``: outputs of the finished run that stay) and write meta.json
        (last), with the size and SHA-256 of every output."""
        for name in [*outputs, *kept]:
            check_name(name)
        missing = [f for f in outputs if not _plain_file(self.staging / f)]
        if missing:
            raise RuntimeError(f"run did not write {missing}")  # a bug, not a user error
        files = {name: file_record(self.staging / name) for name in outputs}
        files.update({name: file_record(self.path / name) for name in kept})
        old_meta = read_json(self._meta_path()) or {}
        old = [n for n in old_meta.get("outputs", []) if is_plain_name(n)] if isinstance(
            old_meta.get("outputs"), list) else []
        every = sorted(set(outputs) | set(kept))
        write_json(self.path / SWAP_MARKER, {"files": sorted(set(old) | set(outputs))})
        self._meta_path().unlink(missing_ok=True)
        for name in (set(old) - set(every)) | set(DERIVED):
            self._unlink_own(name)
        for name in outputs:
            os.replace(self.staging / name, self.path / name)
        meta = {"experiment": self.experiment, "config": config, "config_hash": config_hash(config),
                "reuse_key": key, "identity": identity or {}, "outputs": every, "files": files,
                "versions": versions(), **extra}
        meta["meta_sha256"] = _meta_digest(meta)
        write_json(self.path / "meta.json", meta)
        self._unlink_plain(self.path / SWAP_MARKER)
        self._remove_staging()
        return meta
