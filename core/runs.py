"""One record per experiment, one runner: compute, then save, then plot.

An :class:`Experiment` says what an experiment is; :func:`run_experiment` does for every experiment the same
steps, in one place::

    open the run folder (locked; refuse another experiment's or slot's folder)
    -> reuse key: config + model content + the record's identity parts + attnlab's science code
    -> a finished run with that key is returned as it is (its figures redrawn from the saved results when
       only the drawing code changed)
    -> load the model (only now) -> checks that must fail before heavy work -> compute -> save data
       (staged) -> plot figures from the saved data -> commit (meta.json last)

A record's functions may be given as ``"module:attribute"`` strings, imported on first use, so that the
command line can list every experiment without importing torch.

Records are found, not listed: every ``attnlab.<package>.experiment`` module's ``EXPERIMENTS``
(:func:`experiments_available`), plus any a plugin registers with :func:`register_experiment`. Adding an
experiment is one science module plus one record (``docs/experiments.md``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from attnlab.core.errors import InputError


def _resolve(ref):
    """A callable, or ``"module:attr"`` imported now."""
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Experiment:
    """What an experiment is. The functions (callables or ``"module:attr"``):

    compute(cfg, lm, ctx) -> result                 the science; writes nothing
    save(folder, result, ctx) -> [file names]       the result's data files (CSV, npz, json)
    summary(result, ctx) -> dict                    meta.json fields: what reports and the terminal read
    plot(folder, meta) -> {key: file name}          figures drawn from the saved data and meta only
    describe(meta) -> [lines]                       the finding, for the terminal (one or two lines)
    identity(cfg, ctx) -> {name: digest}            what else determines the result (corpus, plugin source);
                                                    may refuse a bad config before anything is loaded
    prepare(cfg, ctx)                               when the run is not reused: inputs loaded before the model
                                                    (e.g. a corpus, kept in ctx.docs), so they fail first
    check(cfg, lm, ctx)                             checks that need the model, before any heavy work
    warm_up(cfg)                                    first of all, before torch or the model is imported, even
                                                    for a run that will be reused: start in the background what
                                                    compute will need (the UMAP fit worker); never changes a result;
                                                    cfg is None when `reproduce` starts it before any job
    """

    name: str
    config: type
    compute: Any
    save: Any
    summary: Any = None
    plot: Any = None
    describe: Any = None
    identity: Any = None
    prepare: Any = None
    check: Any = None
    warm_up: Any = None
    help: str = ""
    description: str = ""
    #: "none": the encoder is enough; "required": the LM head must be loaded; "optional": loaded when the
    #: checkpoint has one (the experiment adapts)
    lm_head: str = "none"
    #: config fields that name what a run folder holds (e.g. the RRT variant): a folder holding a finished run
    #: with other values is refused, never overwritten
    slot: tuple = ()
    #: the command line spelling, e.g. ("geometry", "scaling"); default (name,)
    command: tuple = ()
    #: modules whose source draws the figures (with figures/): a change there redraws without recomputing
    plot_modules: tuple = ()

    def fn(self, part: str) -> Callable | None:
        return _resolve(getattr(self, part))

    @property
    def words(self) -> tuple:
        return self.command or (self.name,)


@dataclass
class RunContext:
    """What a run knows besides its config: runtime options (not part of the result) and shared inputs."""

    device: str = "auto"
    batch_size: int | None = None
    progress: bool = False
    docs: list | None = None  # a corpus already loaded (reproduce shares one)
    cache: Any = None  # work shared between runs in one process (geometry's q/k collection)
    warn: Callable = print
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the registry

_PLUGIN_RECORDS: dict[str, Experiment] = {}


def register_experiment(record: Experiment) -> Experiment:
    """Make a plugin's record available to :func:`get_experiment` and the command line (import the plugin with
    ``--plugin``). A name taken by another record is an error."""
    taken = {e.name: e for e in experiments_available()}
    if record.name in taken and taken[record.name] is not record:
        raise InputError(f"an experiment named {record.name!r} exists already; give yours another name")
    _PLUGIN_RECORDS[record.name] = record
    return record


def experiments_available() -> list[Experiment]:
    """Every record: each subpackage's ``experiment`` module's ``EXPERIMENTS``, then plugins' records."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for sub in sorted(root.iterdir()):
        if (sub / "__init__.py").is_file() and (sub / "experiment.py").is_file():
            found += list(importlib.import_module(f"attnlab.{sub.name}.experiment").EXPERIMENTS)
    return found + [r for r in _PLUGIN_RECORDS.values() if r not in found]


def get_experiment(name: str) -> Experiment:
    records = {e.name: e for e in experiments_available()}
    if name not in records:
        raise InputError(f"unknown experiment {name!r}; known: {', '.join(sorted(records))}")
    return records[name]


# ---------------------------------------------------------------- the reuse key


def reuse_key(config: dict, **identity) -> tuple[str, dict]:
    """(key, identity): the hash of the config and of every digest that determines the result, attnlab's
    science code included.

    ``identity`` values that are None (unknown, e.g. a model whose weights are not on disk yet) make the
    key unmatchable, so nothing is reused on a guess.
    """
    from attnlab.core.provenance import code_fingerprint, digest

    identity = {**identity, "attnlab": code_fingerprint()}
    if any(v is None for v in identity.values()):
        return f"unknown-{os.getpid()}-{id(identity)}", identity
    return digest({"config": config, **identity}), identity


def record_source(exp: Experiment) -> str:
    """Digest of the source files of a record's functions that lie outside attnlab (a plugin's), so that an edited
    plugin experiment is recomputed; "" for attnlab's own records (``code_fingerprint`` covers them)."""
    from attnlab.core.provenance import digest, file_digest, package_root

    import inspect

    root = package_root()
    files = set()
    for part in ("compute", "save", "summary", "identity", "prepare", "check"):
        ref = getattr(exp, part)
        if ref is None:
            continue
        try:
            path = inspect.getsourcefile(_resolve(ref))
        except TypeError:
            continue
        if path and not Path(path).resolve().is_relative_to(root):
            files.add(str(Path(path).resolve()))
    return digest({f: file_digest(f) for f in sorted(files)}) if files else ""


def render_key(exp: Experiment) -> str:
    from attnlab.core.provenance import render_fingerprint

    return render_fingerprint(*exp.plot_modules)


# ---------------------------------------------------------------- the runner


def load_for(exp: Experiment, cfg, lm, device):
    """The model a run works on: ``lm`` as given (a loaded model, or a loader called only now), else
    ``cfg.model`` loaded with the LM head the record asks for."""
    from attnlab.core.errors import MissingHeadError
    from attnlab.core.models import LoadedModel, load_model

    if isinstance(lm, LoadedModel):
        return lm
    if callable(lm):
        return lm()
    kwargs = dict(device=device, dtype=cfg.dtype, revision=cfg.revision)
    if exp.lm_head == "optional":
        try:
            return load_model(cfg.model, masked_lm=True, **kwargs)
        except MissingHeadError:
            return load_model(cfg.model, **kwargs)
    return load_model(cfg.model, masked_lm=exp.lm_head == "required", **kwargs)


class Pending:
    """A run started by :func:`start_experiment`. ``meta``: its config, model and summary (what later runs' configs
    read), known at once; :meth:`result` waits for its figures, commits the run and returns ``meta.json``'s
    content."""

    def __init__(self, meta: dict, finish: Callable | None = None, future=None):
        self.meta = meta
        self._finish = finish
        self._error: BaseException | None = None
        self._future = future  # its figures in the plot worker's queue, if they went there

    def queued(self) -> bool:
        """Its figures wait in the plot worker's queue, not started: ``result()`` would draw them here."""
        return self._future is not None and self._finish is not None and not (self._future.running() or
                                                                                self._future.done())

    def result(self) -> dict:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            try:
                self.meta = finish()
            except BaseException as exc:  # raised again to every later caller: the run was never committed
                self._error = exc
                raise
        if self._error is not None:
            raise self._error
        return self.meta


def run_experiment(exp: Experiment, cfg, out, lm=None, reuse: bool = True, **options) -> dict:
    """Run ``exp`` with ``cfg`` into the folder ``out`` and return its ``meta.json`` (marked ``reused`` when a
    finished run with the same reuse key was served). ``lm``: a loaded model, a zero-argument loader (called only
    when the work is not reused), or None (load ``cfg.model``). Options: those of :func:`start_experiment`."""
    return start_experiment(exp, cfg, out, lm, reuse, **options).result()


def start_experiment(exp: Experiment, cfg, out, lm=None, reuse: bool = True, *, device: str = "auto",
                     batch_size: int | None = None, progress: bool = False, docs=None, cache=None,
                     warn: Callable = print, plotter=None) -> Pending:
    """:func:`run_experiment` up to its figures: with a ``plotter`` (:class:`attnlab.core.plotworker.Plotter`) they
    are drawn in its process while the caller goes on, and :meth:`Pending.result` commits the run. The run folder
    stays locked until then; a caller must call ``result()`` on every Pending it gets."""
    import contextlib

    if exp.warm_up:
        exp.fn("warm_up")(cfg)
    from attnlab.core import plotworker
    from attnlab.core.models import model_identity
    from attnlab.core.outputs import RunFolder

    if not isinstance(cfg, exp.config):
        raise InputError(f"experiment {exp.name!r} takes a {exp.config.__name__}, got {type(cfg).__name__}")
    ctx = RunContext(device=device, batch_size=batch_size, progress=progress, docs=docs, cache=cache, warn=warn)
    t0 = time.perf_counter()
    config = dataclasses.asdict(cfg)
    slot = {name: config[name] for name in exp.slot}
    hold = contextlib.ExitStack()
    with hold:  # left at once on an error or a reuse; otherwise handed to finish() below
        run = hold.enter_context(RunFolder(out, exp.name, slot=slot))
        extra = exp.fn("identity")(cfg, ctx) if exp.identity else {}
        source = record_source(exp)
        if source:
            extra["record"] = source
        key, identity = reuse_key(config, model=model_identity(cfg.model, cfg.revision, lm), **extra)
        meta = run.finished(key) if reuse else None
        if meta is not None:
            return Pending(_redraw(exp, run, meta) if meta.get("render") != render_key(exp) else meta)
        if exp.prepare:
            exp.fn("prepare")(cfg, ctx)
        lm = load_for(exp, cfg, lm, device)
        identity["model"] = lm.fingerprint
        t_load = time.perf_counter()
        if exp.check:
            exp.fn("check")(cfg, lm, ctx)
        result = exp.fn("compute")(cfg, lm, ctx)
        t_compute = time.perf_counter()
        stage = run.stage()
        data = list(exp.fn("save")(stage, result, ctx))
        summary = exp.fn("summary")(result, ctx) if exp.summary else {}
        meta = {"experiment": exp.name, "config": config, "model": lm.meta, **summary}
        future = plotter.submit(exp.plot, stage, meta) if plotter is not None and exp.plot else None
        figures = None if future is not None else _plot(exp, stage, meta)
        t_saved = time.perf_counter()
        held = hold.pop_all()

    def finish() -> dict:
        with held:  # an error here leaves the run uncommitted and its staging folder removed
            figures_, plot_s = (figures, 0.0) if future is None else \
                plotworker.drawn(future, lambda: _plot(exp, stage, meta))
            timings = {**summary.pop("timings", {}), "load_s": round(t_load - t0, 3),
                       "compute_s": round(t_compute - t_load, 3), "total_s": round(t_saved - t0 + plot_s, 3)}
            if future is not None:
                timings["plot_s"] = round(plot_s, 3)  # drawn in the plot worker, beside the next computation
            return run.commit(key, config, data + list(figures_.values()), identity, model=lm.meta, data=data,
                              figures=figures_, render=render_key(exp), timings=timings, **summary)

    return Pending(meta, finish, future)


def draw(plot, folder: Path, meta: dict) -> dict:
    """The figures ``{key: file name}`` (keys as strings) that ``plot`` - a callable or ``"module:attr"`` - draws
    from a run's saved data in ``folder`` and its ``meta``; here or in the plot worker (``core.plotworker``)."""
    figures = _resolve(plot)(folder, meta) or {}
    return {str(k): v for k, v in figures.items()}


def _plot(exp: Experiment, folder: Path, meta: dict) -> dict:
    return draw(exp.plot, folder, meta) if exp.plot else {}


def _redraw(exp: Experiment, run, meta: dict) -> dict:
    """A finished run whose drawing code changed: its figures again, from its saved data; nothing recomputed."""
    import shutil

    data = [n for n in meta.get("data", []) if n in meta["outputs"]]
    if len(data) != len(meta.get("data", [])) or not isinstance(meta.get("figures"), dict):
        return meta  # written before figures were separate from data: keep it as it is
    stage = run.stage()
    for name in data:  # plot reads the data where it writes the figures
        shutil.copyfile(run.path / name, stage / name)
    figures = _plot(exp, stage, meta)
    for name in data:
        (stage / name).unlink()
    keep = {k: meta[k] for k in meta if k not in ("experiment", "config", "config_hash", "reuse_key", "identity",
                                                  "outputs", "files", "versions", "figures", "render", "reused", "meta_sha256",
                                                  "data")}
    new = run.commit(meta["reuse_key"], meta["config"], list(figures.values()), meta.get("identity"), kept=data,
                     data=data, figures=figures, render=render_key(exp), **keep)
    new["reused"] = True
    return new
