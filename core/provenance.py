"""What determines a result, as short content digests: model weights, corpus, plugin source, attnlab itself.

A finished run is reused only when its *reuse key* matches: a hash of the experiment's config together
with these digests. So a model folder overwritten with another model, an edited corpus file, an edited
variant plugin or a new attnlab all make a rerun compute again instead of serving stale results.

- model: a local folder -> size and SHA-256 of every file in it (config, weights, tokenizer); a Hub id ->
  the commit it resolves to (the Hub's own content address), from the local cache when offline; a model
  built in-process -> SHA-256 of its parameters and buffers.
- corpus: a file -> SHA-256 of its bytes; a folder -> of every ``*.txt``; documents passed in-process ->
  of their ids, titles and texts; an ``hf:`` spec -> the spec itself (the stream cannot be hashed without
  reading it all; recorded as such).
- code: the source file that defines a variant (plugins included), and attnlab's own source files.

File digests are cached per (path, size, mtime, inode), in memory and in ``~/.cache/attnlab/digests.json``
(``ATTNLAB_CACHE`` moves it), so a large checkpoint is hashed once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

_MEMORY: dict = {}


def _cache_file() -> Path:
    root = os.environ.get("ATTNLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnlab")
    return Path(root) / "digests.json"


def _load_disk_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk_cache(entries: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def file_digest(path: str | Path) -> str:
    """``"<size>:<sha256>"`` of a file's bytes (cached by path, size, mtime and inode)."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key in _MEMORY:
        return _MEMORY[key]
    disk = _load_disk_cache()
    if key not in disk:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        disk[key] = f"{st.st_size}:{h.hexdigest()}"
        if st.st_size > 1 << 20:  # only large files are worth a disk cache entry
            _save_disk_cache(disk)
    _MEMORY[key] = disk[key]
    return disk[key]


def digest(obj) -> str:
    """SHA-256 (first 16 hex digits) of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_digest(folder: Path, pattern: str = "*") -> str:
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
    return digest({p.name: file_digest(p) for p in files})


def is_local_path(name: str) -> bool:
    return Path(name).expanduser().exists()


def hub_commit(name: str, revision: str | None = None) -> str | None:
    """The commit a Hub id resolves to, from the local cache (no network); None if it is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return None
    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # a malformed id raises a validation error: it is simply not cached
        return None
    if isinstance(found, str):
        return Path(found).parent.name  # .../snapshots/<commit>/config.json
    return None


def model_fingerprint(name: str, revision: str | None = None) -> str | None:
    """Digest of what ``name`` loads, without loading it; None when that cannot be known here."""
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder:" + folder_digest(path)
    commit = hub_commit(name, revision)
    return f"hub:{name}@{commit}" if commit else None


def parameters_fingerprint(module) -> str:
    """Digest of a model built in-process: every parameter and buffer, by name."""
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "params:" + h.hexdigest()[:16]


def corpus_fingerprint(spec: str, docs=None) -> str:
    """Digest of a corpus: its documents when given, else the file or folder the spec names."""
    if docs is not None:
        return "docs:" + digest([(d.id, d.title, d.text) for d in docs])
    if spec.startswith("hf:"):
        return "hf-spec:" + spec  # a streamed dataset is not hashed (it would have to be read whole)
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder:" + folder_digest(path, "*.txt")
    if path.is_file():
        return "file:" + file_digest(path)
    return "missing:" + spec


def source_fingerprint(func) -> str:
    """Digest of the source file that defines ``func`` (a variant builder, a plugin)."""
    import inspect

    try:
        return file_digest(inspect.getsourcefile(func))
    except (TypeError, OSError):
        return digest(getattr(func, "__qualname__", repr(func)))


#: folders of the package that only draw or drive (figures, CLI, report, jobs): they never change a number, so
#: editing them redraws figures from saved results instead of recomputing them
RENDERING = ("figures", "experiments")


def package_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _science_files(root: Path) -> list[Path]:
    """Every module of the attnlab package outside :data:`RENDERING`: the package's own ``__init__`` and each
    subpackage (a folder with ``__init__.py``) - derived from the package, not listed by hand."""
    files = [p for p in root.glob("*.py")]
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and (sub / "__init__.py").is_file() and sub.name not in RENDERING:
            files += sub.rglob("*.py")
    return sorted(files)


@lru_cache(maxsize=None)
def code_fingerprint(module: str | None = None) -> str:
    """attnlab's version and a digest of every module that computes a result (a change invalidates old runs).
    ``module`` (e.g. ``"attnlab.organisms.train"``): only that module and the attnlab modules it imports, directly
    or not (:func:`module_closure`) - for work too costly to redo when an unrelated module changes."""
    from attnlab._version import __version__

    root = package_root()
    files = _science_files(root) if module is None else module_closure(module)
    return f"{__version__}+{digest({str(p.relative_to(root)): file_digest(p) for p in files})}"


def _module_file(name: str) -> Path | None:
    """The source file of the attnlab module ``name`` (a package's ``__init__.py``); None for an attribute."""
    parts = name.split(".")
    if parts[0] != "attnlab":
        return None
    if len(parts) == 1:
        return package_root() / "__init__.py"
    base = package_root().joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path, name: str) -> set[str]:
    """Every attnlab module the source of module ``name`` imports anywhere (function-local imports too), read from
    its syntax tree: ``import attnlab.a.b``, ``from attnlab.a import b`` (b a module or a name of a) and relative
    imports."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "attnlab"}


@lru_cache(maxsize=None)
def module_closure(module: str) -> tuple[Path, ...]:
    """The source files that can change what ``module`` computes: it, every attnlab module it imports (transitively)
    and their packages' ``__init__.py`` - derived from the import statements, not listed by hand. Modules under
    :data:`RENDERING` only draw, and are left out."""
    root = package_root()
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ first
            prefix = ".".join(parts[:i])
            path = _module_file(prefix)
            if path is None or prefix in seen:
                continue
            rel = path.relative_to(root).parts
            if len(rel) > 1 and rel[0] in RENDERING:
                continue
            seen[prefix] = path
            todo += sorted(_imported_modules(path, prefix))
    if module not in seen:
        raise ValueError(f"{module!r} is not a module of attnlab")
    return tuple(sorted(set(seen.values())))


@lru_cache(maxsize=None)
def render_fingerprint(*modules: str) -> str:
    """Digest of what draws a run's figures: ``figures/`` and the named modules (a change redraws, from the saved
    results, without recomputing them)."""
    import importlib.util

    root = package_root()
    files = sorted((root / "figures").glob("*.py"))
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            files.append(Path(spec.origin))
    return digest({str(p.relative_to(root)) if p.is_relative_to(root) else str(p): file_digest(p) for p in files})
