"""Run directories: atomic writes, a config hash, and reuse of finished work.

Every file is written to a temporary name in the same folder and renamed into place, so a crash never
leaves a half-written output. A run records its config hash in ``meta.json`` *last*; a rerun with the same
config finds that hash and every listed output present, and skips the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def finished(out_dir: str | Path, config: dict) -> dict | None:
    """The previous run's meta (marked ``reused``) if it finished with this exact config and its outputs exist."""
    meta_path = Path(out_dir) / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("config_hash") != config_hash(config):
        return None
    if not all((Path(out_dir) / f).exists() for f in meta.get("outputs", [])):
        return None
    meta["reused"] = True
    return meta


def versions() -> dict:
    import numpy
    import torch
    import transformers

    from attnlab import __version__

    return {"attnlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def write_meta(out_dir, config: dict, outputs: list[str], **extra) -> dict:
    """Write meta.json last: it marks the run finished."""
    meta = {"config": config, "config_hash": config_hash(config), "outputs": sorted(outputs),
            "versions": versions(), **extra}
    write_json(Path(out_dir) / "meta.json", meta)
    return meta
