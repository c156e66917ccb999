"""Every figure of the paper with one command: ``attnlab reproduce --out DIR``.

Runs each experiment with the paper's settings and protocols, one run folder per experiment under
``DIR/runs/`` (reused when rerun with the same settings, model content, corpus content and attnlab), copies
each figure to ``DIR/figures/<figure>.png`` and writes a report, ``DIR/index.html`` and ``DIR/README.md``:
every figure with its caption, the verdict on each induction map (chance, null, the rule that named a head),
the paper's reported result beside ours, what could not be produced and why, run times and provenance.

Offline: whether the Hugging Face Hub answers is decided once (a probe of a few seconds; ``HF_HUB_OFFLINE=1``
skips it). A model that cannot be had is reported once and not tried again; unless ``--no-fallback``, the
embedded all-MiniLM-L6-v2 (installed with attnlab) stands in for every role it can serve - the induction maps
(Figures 7-8) and the query/key geometry (Figures 2-4) - and the figures that need what it lacks (Figure 5: a
masked-LM head; Figure 9: four model sizes) are listed as not produced. Every substituted figure says so.

Exit status: 0 when every figure that the models at hand can make was made (with --no-fallback: when every
figure was made); 1 otherwise.

Model roles (``--model ROLE=ID_OR_PATH`` substitutes one, e.g. a local folder when offline):
    gpt2         Figures 2-4 (query/key geometry)            default gpt2
    bert         Figures 5, 7a-c, 8a-d (ICL, induction)       default bert-base-uncased (needs its MLM head)
    bert-tiny, bert-small, bert-medium, bert-large           Figure 9 (induction maps across sizes)
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.errors import AttnlabError, InputError, MissingHeadError, ModelNotAvailableError
from attnlab.core.names import EMBEDDED_NAME, embedded_model_path, model_label
from attnlab.core.outputs import atomic_path, check_out_dir, folder_lock, read_json, write_json
from attnlab.experiments.common_args import add_runtime_args
from attnlab.experiments.paper import REPORTED_HEADS, REPORTED_ICL_MEAN, ROLES, UMAP_HEADS

QUICK_TRIALS = 8


@dataclass
class Settings:
    out: Path
    models: dict = field(default_factory=lambda: dict(ROLES))
    corpus: str = DEFAULT_CORPUS
    quick: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int | None = None
    progress: bool = True
    command: str = "(Python API)"
    fallback: bool = True
    force: bool = False
    geometry_protocol: str = "text"
    paper_figures: str | None = None
    organism: str | None = None  # a trained organism's folder (default: the cache's, see experiments/organisms.py)
    reused: int = 0  # filled in by reproduce(): experiments reused from an earlier run
    advice: str | None = None  # filled in by reproduce(): how to supply missing weights, said once
    organism_line: str | None = None  # filled in by reproduce(): the organism's verdict, or why it is missing

    def trials(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Figure:
    """One figure of the report: which of its run's figures it is (a key of the run's ``meta["figures"]``) and
    what the paper reported, if anything."""

    id: str
    caption: str  # may name {model}: the model actually used
    key: str  # the run's figure key: an induction target, a geometry metric, "umap", "histogram"
    compare: Callable | None = None  # (meta, substituted) -> [(quantity, paper, ours)]
    paper_image: str | None = None  # the paper's image of this figure (shared/reference/paper-figures)


@dataclass
class Job:
    """One experiment run (a record and the config the paper's settings give it) that makes some figures."""

    name: str
    role: str
    experiment: str  # the record's name
    config: Callable  # (settings, model name, context) -> the record's config
    figures: list[Figure]
    masked_lm: bool = False
    embedded_ok: bool = True  # can the embedded MiniLM stand in for this role here?
    needs: str = ""  # what a stand-in must have, when it cannot

    @property
    def record(self):
        from attnlab.core.runs import get_experiment

        return get_experiment(self.experiment)


# ---------------------------------------------------------------- paper comparisons (from results, not files)


def _compare_top(target: str):
    """The paper's heads for ``target`` beside ours - ranked by mean attention, as the paper ranks them."""
    paper = REPORTED_HEADS[target]

    def compare(meta, substituted):
        from attnlab.induction.experiment import target_words

        top = meta["top_heads"][target][:len(paper)]
        ours = [f"L{h['layer']}H{h['head']} ({h['mean']:.3g}{', named' if h['named'] else ''})" for h in top]
        overlap = len({f"L{h['layer']}H{h['head']}" for h in top} & set(paper))
        named = meta["verdict"][target]["heads"]
        note = "not comparable: another model stood in" if substituted else \
            f"{overlap} of {len(paper)} as in the paper; the verdict names {', '.join(named) or 'none'}"
        return [(f"strongest heads by mean, {target_words(target)}", ", ".join(paper), ", ".join(ours) + f" - {note}")]

    return compare


def _compare_icl(meta, substituted):
    s = meta["summary"]
    ci = f"95% CI {s['ci95'][0]:.3f} .. {s['ci95'][1]:.3f}, " if s["ci95"][0] is not None else ""
    return [("mean loss(50) - loss(500)", f"{REPORTED_ICL_MEAN:g} (50 trials)", f"{s['mean']:.3f} ({ci}{s['n']} trials)")]


def _compare_optimum(figure: str):
    (layer, head), paper_notebook = UMAP_HEADS[figure]

    def compare(meta, substituted):
        ours = meta.get("optimum")
        cfg = meta["config"]
        if substituted or (cfg["layer"], cfg["head"]) != (layer, head):
            note = " - not comparable: another model and head"
        else:
            note = ""
        ours_text = "none" if ours is None else f"{ours:g} (attnlab: queries x c) = {1 / ours:.3g} (notebook: queries / c)"
        return [(f"optimal c, {cfg['metric'].replace('_', ' ')} (protocol {cfg['protocol']}), "
                 f"L{cfg['layer']}H{cfg['head']}",
                 f"{paper_notebook:g} (notebook: queries / c) = {1 / paper_notebook:g} (attnlab: queries x c); "
                 f"scaled metric, GPT-2 L{layer}H{head}", ours_text + note)]

    return compare


# ---------------------------------------------------------------- jobs


def _induction_job(name, role, variant, figures, trials=50):
    def config(s: Settings, model: str, context):
        from attnlab.induction.experiment import InductionConfig

        # --quick uses the clean protocol: with a handful of trials one r = 0 trial of the paper protocol
        # (mask on the first copy) could make the only visible structure in a map
        return InductionConfig(model=model, variant=variant, protocol="clean" if s.quick else "paper",
                               trials=s.trials(trials, QUICK_TRIALS), seed=s.seed, dtype=s.dtype)

    return Job(name, role, "induction", config, figures)


def _icl_job():
    def config(s: Settings, model: str, context):
        from attnlab.icl.experiment import ICLConfig

        return ICLConfig(model=model, corpus=s.corpus, protocol="paper", trials=s.trials(50, 5), seed=s.seed,
                         dtype=s.dtype)

    return Job("icl", "bert", "icl", config, [
        Figure("figure5", "Figure 5 - in-context learning score of {model}: masked-LM loss with 50 tokens of "
               "context minus loss with 500 tokens, per trial (paper protocol).", "histogram", _compare_icl,
               "icl_loss_difference.png")],
        masked_lm=True, embedded_ok=False, needs="a masked-LM head (the embedded all-MiniLM-L6-v2 has none)")


def _geometry_config(s: Settings, model: str):
    return dict(model=model, corpus=s.corpus, sentences=s.trials(100, 20), seed=s.seed, dtype=s.dtype,
                protocol=s.geometry_protocol)


def _scaling_job():
    def config(s: Settings, model: str, context):
        from attnlab.geometry.experiment import GeometryConfig

        return GeometryConfig(**_geometry_config(s, model), continuous=not s.quick, bootstrap=s.trials(20, 10))

    metrics = [("figure2a", "weighted_corr", "weighted correlation of dot product and distance"),
               ("figure2b", "scaled_weighted_corr", "weighted correlation scaled by the head's share of "
                                                    "pairs under a threshold pooled over all heads"),
               ("figure2c", "norm_ratio", "ratio of median query and key norms")]
    return Job("geometry_scaling", "gpt2", "geometry-scaling", config, [
        Figure(fid, f"Figure 2{fid[-1]} - {{model}}: optimal scaling constant c per head (queries x c, keys / c"
               f"{{translation}}), chosen by {text}; protocol {{protocol}}. Hatched cells: fewer than half of the "
               "sentence resamples agree on the optimum.", metric)
        for fid, metric, text in metrics])


def pick_umap_heads(optima: dict, metric: str = "scaled_weighted_corr") -> tuple[tuple[int, int], tuple[int, int]]:
    """The stated rule for Figures 3-4 on a model other than GPT-2: by the metric the figures frame (the scaled
    weighted correlation, the paper's metric for them), Figure 3 shows the head whose optimum is most stable
    (share of sentence resamples agreeing) among heads with an optimum below 1 (queries shrunk), Figure 4 the
    most stable among heads with an optimum above 1 (queries grown) - the paper's two heads were one of each.
    Ties go to the lower layer, then head; if one side is empty, the most stable remaining head. ``optima``:
    the scaling run's meta["optima"]."""
    rows = [(layer, head, opt, stab) for layer, head, opt, stab in optima[metric] if opt is not None]
    if not rows:
        return (0, 0), (0, 1)

    def most_stable(candidates):
        return min(candidates, key=lambda r: (-(r[3] if r[3] is not None else -1), r[0], r[1]))

    below = [r for r in rows if r[2] < 1]
    above = [r for r in rows if r[2] > 1]
    first = most_stable(below or rows)
    rest = [r for r in (above or rows) if (r[0], r[1]) != (first[0], first[1])] or rows
    second = most_stable(rest)
    return (first[0], first[1]), (second[0], second[1])


def _umap_job(fig: str, index: int, paper_image: str | None = None):
    (layer, head), _ = UMAP_HEADS[fig]

    def config(s: Settings, model: str, context):
        from attnlab.geometry.experiment import UMAPConfig

        where = (layer, head)
        if context.get("substituted", {}).get("gpt2"):  # another model: the stated rule picks the heads
            scaling = context["results"].get("geometry_scaling")
            if scaling is None:
                raise InputError("the scaling run did not finish, so no head can be picked for the UMAP")
            where = pick_umap_heads(scaling["optima"])[index]
        return UMAPConfig(**_geometry_config(s, model), layer=where[0], head=where[1],
                          max_points=200 if s.quick else 1500, metric="scaled_weighted_corr")

    return Job(f"geometry_umap_{fig}", "gpt2", "geometry-umap", config, [
        Figure(fig, f"Figure {fig[-1]} - joint UMAP (cosine) of {{model}} layer {{layer}} head {{head}}: scaled"
               f"{{translation_short}} queries (green) and keys (orange) at six constants; the optimal constant by "
               "the scaled weighted correlation is framed.", "umap", _compare_optimum(fig), paper_image)])


def jobs() -> list[Job]:
    """Every experiment of the paper, grouped by model role so each model is loaded once."""
    standard = [
        Figure("figure7a", "Figure 7a - induction map of {model}, standard RRT (X X): attention from [MASK] to the "
               "previous instance of the masked token.", "prev", _compare_top("prev"), "ind_score_rrt.png"),
        Figure("figure7b", "Figure 7b - {model}, standard RRT: attention to the token before the previous instance.",
               "before", _compare_top("before"), "ind_score_rrt_before.png"),
        Figure("figure7c", "Figure 7c - {model}, standard RRT: attention to the token after the previous instance.",
               "after", _compare_top("after"), "ind_score_rrt_after.png"),
    ]
    shuffled = [
        Figure("figure8a", "Figure 8a - {model}, shuffled RRT (X perm(X)): attention to the token after the "
               "first-copy instance of the masked token's left neighbour; our mapping of the paper's one shuffled "
               "panel (ind_score_shuffle_before).", "after_prev_of_left", paper_image="ind_score_shuffle_before.png"),
        Figure("figure8b", "Figure 8b - {model}, shuffled RRT: attention to the token before the first-copy "
               "instance of the right neighbour; the paper shows no panel for this target.", "before_prev_of_right"),
    ]
    triple = [
        Figure("figure8c", "Figure 8c - {model}, triple RRT (X X X, mask in the middle copy): attention to the "
               "instance before (first copy); maps to the paper's triple 'before' panel (ind_score_triple_before).",
               "prev", paper_image="ind_score_triple_before.png"),
        Figure("figure8d", "Figure 8d - {model}, triple RRT: attention to the instance after (third copy); maps "
               "to the paper's triple 'after' panel (ind_score_triple_after).", "next",
               paper_image="ind_score_triple_after.png"),
    ]
    sizes = []
    for letter, role, image in zip("abcd", ["bert-tiny", "bert-small", "bert-medium", "bert-large"],
                                   ["Tiny", "Small", "Medium", "Large"]):
        job = _induction_job(f"induction_{role.replace('-', '_')}", role, "standard", [
            Figure(f"figure9{letter}", f"Figure 9{letter} - induction map (standard RRT, previous instance) of "
                   "{model}" + f" (paper: {ROLES[role]}).", "prev", paper_image=f"ind_mapBERT_{image}.png")])
        job.embedded_ok, job.needs = False, "four BERT sizes (one embedded model cannot stand for them)"
        sizes.append(job)
    return [
        _scaling_job(), _umap_job("figure3", 0), _umap_job("figure4", 1),
        _icl_job(),  # first of its role: the masked LM it loads then serves the induction runs too
        _induction_job("induction_standard", "bert", "standard", standard),
        _induction_job("induction_shuffled", "bert", "shuffled", shuffled),
        _induction_job("induction_triple", "bert", "triple", triple),
        *sizes,
    ]


# ---------------------------------------------------------------- running


class ModelCache:
    """Loads each (model, head) once, keeps only the current model's weights, and remembers every model that
    could not be loaded so that it is never tried again in this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded: dict = {}
        self.failed: dict = {}  # (name, masked_lm) -> AttnlabError

    def get(self, name: str, masked_lm: bool):
        from attnlab.core.models import load_model

        if (name, masked_lm) in self.failed:
            raise self.failed[(name, masked_lm)]
        for (n, has_head), lm in self.loaded.items():  # a masked LM also serves as the plain encoder
            if n == name and (has_head or not masked_lm):
                return lm
        self.loaded = {k: v for k, v in self.loaded.items() if k[0] == name}  # drop other models' weights
        try:
            lm = load_model(name, masked_lm=masked_lm, device=self.settings.device, dtype=self.settings.dtype)
        except AttnlabError as exc:
            self.failed[(name, masked_lm)] = exc
            if not masked_lm:
                self.failed[(name, True)] = exc
            raise
        self.loaded[(name, masked_lm)] = lm
        return lm

    def best(self, name: str):
        """The masked LM when the checkpoint has its head (ablation, DLA), else the encoder."""
        try:
            return self.get(name, True)
        except MissingHeadError:
            return self.get(name, False)


class Runner:
    """Runs the jobs, substituting the embedded model where a role's model cannot be had."""

    def __init__(self, settings: Settings, say=print):
        from attnlab.geometry.study import GeometryCache

        self.settings = settings
        self.cache = ModelCache(settings)
        self.say = say
        self.role_error: dict = {}  # role -> the error that made its model unavailable
        self.context = {"geometry": GeometryCache(), "results": {}, "substituted": {}}
        self.embedded = embedded_model_path() if settings.fallback else None
        self.advice: str | None = None
        self.reused = 0
        self.plotter = None  # reproduce's plot worker (attnlab.core.plotworker.Plotter), while it runs
        self.pending: list = []  # started runs not yet finished

    def model_for(self, job: Job) -> tuple[str | None, str | None]:
        """(model name to use, reason it cannot run) for a job, given what failed before."""
        role = job.role
        if role not in self.role_error:
            return self.settings.models[role], None
        if self.embedded and job.embedded_ok:
            return self.embedded, None
        if self.embedded:
            return None, f"its model is not available here, and it needs {job.needs}"
        return None, str(self.role_error[role])

    def run_record(self, experiment: str, cfg, out: Path, loader) -> dict:
        return self.start_record(experiment, cfg, out, loader).result()

    def start_record(self, experiment: str, cfg, out: Path, loader):
        """:func:`attnlab.core.runs.start_experiment` with this run's options; its figures are drawn in the plot
        worker when ``reproduce`` has one. Returns the Pending run."""
        from attnlab.core.runs import get_experiment, start_experiment

        s = self.settings
        pending = start_experiment(get_experiment(experiment), cfg, out, lm=loader, reuse=not s.force,
                                   batch_size=s.batch_size, progress=s.progress, cache=self.context["geometry"],
                                   warn=lambda *_: None, plotter=self.plotter)
        self.pending.append(pending)
        return pending

    def drain(self) -> None:
        """Finish every started run. First this process draws, in order, the figures the plot worker has not
        started (the worker goes on with the queue meanwhile: two drawing at the end instead of one), then it waits
        for the rest. Errors are kept for each run's own caller (``Pending.result()`` raises them again)."""
        def finish(pending):
            try:
                pending.result()
            except Exception:
                pass

        while queued := [p for p in self.pending if p.queued()]:
            finish(queued[0])
        for pending in self.pending:
            finish(pending)
        self.pending.clear()

    def finish(self, job: Job, pending) -> tuple[dict | None, str | None]:
        """A started job's (committed meta, None), or (None, the reason) when drawing or committing it failed."""
        try:
            return pending.result(), None
        except AttnlabError as exc:
            return None, str(exc)
        except Exception as exc:  # an unexpected failure must not cost the other figures; keep the traceback
            return None, self._log_unexpected(job, exc)

    def _log_unexpected(self, job: Job, exc: Exception) -> str:
        log = self.settings.out / "logs" / f"{job.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        return f"unexpected {type(exc).__name__}: {exc} (traceback in logs/{job.name}.log)"

    def start(self, job: Job) -> tuple:
        """(Pending run, model used, None, False) once the job's computation is done (its figures may still be
        drawing); (None, model, reason, unavailable) when the experiment could not run - ``unavailable`` when
        that is because no model at hand can make it."""
        out = self.settings.out / "runs" / job.name
        for _ in range(2):  # a second round only after the role's own model failed to load
            model, reason = self.model_for(job)
            if model is None:
                return None, self.settings.models[job.role], reason, True
            try:
                cfg = job.config(self.settings, model, self.context)
                pending = self.start_record(job.experiment, cfg, out, lambda: self.cache.get(model, job.masked_lm))
                self.reused += bool(pending.meta.get("reused"))
                return pending, model, None, False
            except ModelNotAvailableError as exc:  # the role's model cannot be had: every job of the role
                if model == self.settings.models[job.role] and job.role not in self.role_error:
                    self.role_error[job.role] = exc
                    self._announce(job.role, exc)
                    continue
                return None, model, str(exc), True
            except MissingHeadError as exc:  # only the jobs that need the head: the encoder still serves the rest
                return None, model, str(exc), True
            except AttnlabError as exc:  # e.g. a Hub corpus with no Hub: not at hand, like a missing model
                return None, model, str(exc), bool(getattr(exc, "unavailable", False))
            except Exception as exc:  # an unexpected failure must not cost the other figures; keep the traceback
                return None, model, self._log_unexpected(job, exc), False
        return None, self.settings.models[job.role], str(self.role_error.get(job.role)), True

    def _announce(self, role: str, exc: AttnlabError) -> None:
        """One line per missing model, as soon as it is known; the how-to advice is kept for the end."""
        self.advice = self.advice or getattr(exc, "advice", None)
        served = [f.id for j in jobs() if j.role == role and j.embedded_ok for f in j.figures]
        if self.embedded and served:
            then = f"the embedded {EMBEDDED_NAME} stands in for {_id_ranges(served)}"
        else:
            then = f"{_id_ranges([f.id for j in jobs() if j.role == role for f in j.figures])} cannot be made"
        self.say(f"{role}: {getattr(exc, 'short', None) or exc}; {then}")


def _id_ranges(ids: list[str]) -> str:
    """figure7a, figure7b, figure7c, figure8a -> "figures 7a-c, 8a" (for one-line messages)."""
    groups: dict = {}
    for fid in ids:
        number = fid.removeprefix("figure")
        groups.setdefault(number.rstrip("abcd"), []).append(number[len(number.rstrip("abcd")):])
    parts = []
    for num, letters in groups.items():
        letters = [x for x in letters if x]
        parts.append(num + (letters[0] if len(letters) == 1 else f"{letters[0]}-{letters[-1]}" if letters else ""))
    return ("figure " if len(ids) == 1 else "figures ") + ", ".join(parts)


def copy_figure(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _fill_caption(fig: Figure, meta: dict | None, model: str | None) -> str:
    """The caption with the model actually used (and, for geometry, the head and protocol it ran with)."""
    cfg = (meta or {}).get("config", {})
    translate = cfg.get("translate_keys", True) and cfg.get("protocol", "text") == "text"
    return fig.caption.format(model=model_label(model or "?"), layer=cfg.get("layer", "?"), head=cfg.get("head", "?"),
                              protocol=cfg.get("protocol", "?"),
                              translation=", keys translated onto the query centroid" if translate else ", no translation",
                              translation_short=", key-translated" if translate else "")


def _previous_results(settings: Settings, skip: set):
    """Figures of an earlier run in the same folder that this run did not redo: still in the report."""
    from attnlab.experiments.report import FigureResult
    from attnlab.experiments.view import finished_meta

    report = read_json(settings.out / "report.json") or {}
    kept = []
    entries = report.get("figures") if isinstance(report.get("figures"), list) else []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("id") in skip or not isinstance(entry.get("path"), str):
            continue
        job = entry.get("job")
        if not isinstance(job, str) or not job or "/" in job or job.startswith("."):
            continue
        meta = finished_meta(settings.out / "runs" / job)
        path = settings.out / entry["path"]
        if meta is None or not path.is_file() or not path.resolve().is_relative_to(settings.out.resolve()):
            continue  # its run is gone or unfinished: nothing trustworthy to show
        try:
            r = FigureResult(**{k: v for k, v in entry.items() if k in FigureResult.__dataclass_fields__})
        except TypeError:
            continue
        r.meta, r.earlier = meta, True
        kept.append(r)
    return kept


def reproduce(settings: Settings, only: list[str] | None = None, say=print, plotter=None):
    """Run every job (or those producing the figures in ``only``) and write the report. Returns the results.
    ``plotter``: a started :class:`~attnlab.core.plotworker.Plotter` to draw in (the caller closes it); None: the
    workers are started here (:func:`start_workers`)."""
    check_out_dir(settings.out)
    with folder_lock(settings.out):
        return _reproduce(settings, only, say, plotter)


def start_workers(only: list[str] | None = None):
    """The worker processes of a ``reproduce`` of ``only``, started first (by the command, before it imports
    torch): the plot worker (a :class:`~attnlab.core.plotworker.Plotter`, returned; the caller closes it) and, when
    a selected job fits UMAP layouts, the fit worker. Their start-up imports (matplotlib; umap-learn and numba's
    compiled functions) then use the core that torch's import leaves idle: in a fresh ``reproduce`` process the
    first 3.7 s ran on one core."""
    from attnlab.core.plotworker import Plotter

    plotter = Plotter()
    for job in selected_jobs(only):
        if job.record.warm_up:
            job.record.fn("warm_up")(None)
            break
    return plotter


def selected_jobs(only: list[str] | None = None) -> list[Job]:
    """The jobs that make the figures in ``only`` (every job when None), in their order."""
    return [j for j in jobs() if not only or any(f.id in only for f in j.figures)]


def _reproduce(settings: Settings, only: list[str] | None, say, plotter=None):
    from attnlab.core.outputs import versions
    from attnlab.experiments.report import write_report

    t0 = time.perf_counter()
    if (settings.out / "meta.json").exists():
        raise InputError(f"output folder {settings.out} holds a single experiment's run (meta.json); write the "
                         "report to another folder (out)")
    selected = selected_jobs(only)
    runner = Runner(settings, say)
    from attnlab.experiments.sections import REPORT_ORDER, sizes_section, start_sections

    with (contextlib.nullcontext(plotter) if plotter is not None else start_workers(only)) as runner.plotter:
        # figures drawn in a second process while the next job computes
        started: list = []
        builders: dict = {}

        def sections_after(job: str) -> None:  # the report's own sections start right after the job they read
            builders.update(start_sections(runner, job))

        try:
            _start_jobs(runner, selected, started, None if only else sections_after)
        finally:  # every started run is committed (or cleaned up), whatever happened after it
            runner.drain()
            finished = [(job, *(runner.finish(job, p) if p is not None else (None, reason)), model, unavailable)
                        for job, p, model, reason, unavailable in started]
        results = _figure_results(runner, finished, only)
        sections = [builders[name]() for name in REPORT_ORDER if name in builders]
        if not only:
            from attnlab.experiments.organisms import organism_folder, organism_line, organism_sections

            sections += organism_sections(runner, organism_folder(settings.organism))
            settings.organism_line = organism_line(sections)
        runner.cache.loaded.clear()
    runner.plotter = None
    done = {r.id for r in results}
    results += _previous_results(settings, done)
    order = [f.id for j in jobs() for f in j.figures]
    results.sort(key=lambda r: order.index(r.id) if r.id in order else len(order))
    write_json(settings.out / "report.json", {"figures": [r.record() for r in results]})
    sizes = [(r.model_used, r.meta) for r in results if r.id.startswith("figure9") and r.meta is not None]
    if len(sizes) >= 2:
        sections.append(sizes_section(settings, sizes))
    given = {role: model for role, model in settings.models.items() if model != ROLES[role]}
    write_report(settings, results, total_s=time.perf_counter() - t0, versions=versions(),
                 substituted=dict(runner.context["substituted"]), advice=runner.advice, sections=sections, given=given)
    settings.reused, settings.advice = runner.reused, runner.advice
    return results


def _start_jobs(runner: Runner, selected: list, started: list, after=None) -> None:
    """Start every job in turn (each computes; its figures go to the plot worker), appending ``(job, Pending or
    None, model, reason, unavailable)`` to ``started``, and call ``after(job name)`` once each has started. Later
    jobs' configs read the earlier ones' summaries, known once computed."""
    settings = runner.settings
    iterator = selected
    if settings.progress:
        from attnlab.core.progress import bar

        iterator = bar(selected, desc="reproduce", unit="experiment")
    for job in iterator:
        if settings.progress and hasattr(iterator, "set_postfix_str"):
            iterator.set_postfix_str(job.name)
        pending, model, reason, unavailable = runner.start(job)
        started.append((job, pending, model, reason, unavailable))
        if pending is not None:
            runner.context["results"][job.name] = pending.meta
            if model != settings.models[job.role]:
                runner.context["substituted"][job.role] = model
        if after is not None:
            after(job.name)


def _figure_results(runner: Runner, finished: list[tuple], only) -> list:
    """The report's figure entries from the finished jobs: each figure copied to figures/ with its caption."""
    from attnlab.experiments.report import FigureResult

    settings = runner.settings
    results = []
    for job, meta, reason, model, unavailable in finished:
        if meta is not None:
            runner.context["results"][job.name] = meta
        run_dir = settings.out / "runs" / job.name
        for fig in job.figures:
            if only and fig.id not in only:
                continue
            substituted = meta is not None and model != settings.models[job.role]
            result = FigureResult(fig.id, _fill_caption(fig, meta, model),
                                  job.name, job.role, settings.models[job.role], model_used=model,
                                  substituted=substituted, paper_image=fig.paper_image)
            if meta is None:
                result.error = reason
                result.unavailable = unavailable
            else:
                if substituted:
                    result.caption += (f" Offline stand-in: {model_label(model)} instead of "
                                       f"{settings.models[job.role]}; not comparable with the paper.")
                if job.experiment == "induction":
                    result.target = fig.key
                copy_figure(run_dir / meta["figures"][fig.key], settings.out / "figures" / f"{fig.id}.png")
                result.path = f"figures/{fig.id}.png"
                result.meta = meta
                if fig.compare:
                    result.comparison = fig.compare(meta, substituted)
            results.append(result)
    return results


# ---------------------------------------------------------------- CLI


def parse_models(specs: list[str]) -> dict:
    models = dict(ROLES)
    for spec in specs:
        role, sep, model = spec.partition("=")
        if not sep or not model.strip():
            raise InputError(f"a model substitution takes ROLE=ID_OR_PATH, got {spec!r}")
        if role not in ROLES:
            import difflib

            close = difflib.get_close_matches(role, list(ROLES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown model role {role!r}{hint}; roles are: {', '.join(ROLES)}")
        model = model.strip()
        looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
        if looks_like_path and not Path(model).expanduser().exists():
            raise InputError(f"model folder {model!r} (role {role}) does not exist; pass an existing folder written "
                             "by save_pretrained() or a Hub id")
        models[role] = model
    return models


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("reproduce", help="every figure of the paper, with a report (index.html, README.md)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (figures/, runs/, index.html, README.md) (required)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_TRIALS} induction trials (clean protocol), 5 ICL trials, 20 sentences, "
                        "small UMAPs (default: off)")
    p.add_argument("--model", action="append", default=[], metavar="ROLE=ID_OR_PATH",
                   help=f"substitute a model (repeatable); roles: {', '.join(ROLES)} (default: the paper's)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help=f"corpus for ICL and geometry, e.g. a local .jsonl.gz (default: {DEFAULT_CORPUS}; offline: "
                        "the shared Simple Wikipedia file when it sits beside the checkout)")
    p.add_argument("--only", default=None, help="comma-separated figure ids, e.g. figure7a,figure9b (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--geometry-protocol", default="text", choices=["text", "notebook"],
                   help="Figures 2-4: text (our reading of the paper's words) or notebook (the paper's notebook "
                        "computation) (default: text)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32)")
    p.add_argument("--no-fallback", action="store_true",
                   help=f"never substitute the embedded {EMBEDDED_NAME} for a model that cannot be had (default: off)")
    p.add_argument("--force", action="store_true", help="recompute every experiment, even finished ones (default: off)")
    p.add_argument("--paper-figures", default=None,
                   help="folder of the paper's figure images, shown beside ours in index.html (default: none)")
    p.add_argument("--organism", default=None,
                   help="folder of a model organism trained by `attnlab train --recipe induction-causal` (default: "
                        "$ATTNLAB_CACHE/organisms/induction-causal, ~/.cache/attnlab when unset)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: off)")
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _corpus_default(args) -> str:
    from attnlab.core.corpus import offline_default

    return offline_default(args.corpus)


def _run(args) -> int:
    # The plot worker draws on one core while torch computes here. torch's OpenMP threads spin-wait for work by
    # default, and a spinning thread on the worker's core stalls them both: --quick took 25-26 s with it, 20-21 s
    # with passive waiting (the full main job about 2 s more: 57.9 s against 55.6 s). Read when torch loads, so set
    # before it is imported; a user's own setting wins.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    models = parse_models(args.model)
    only = [f.strip() for f in args.only.split(",") if f.strip()] if args.only else None
    known = [f.id for j in jobs() for f in j.figures]
    if args.only is not None and not only:
        raise InputError(f"only lists no figure ({args.only!r}); known: {', '.join(known)}")
    if only and (unknown := sorted(set(only) - set(known))):
        raise InputError(f"unknown figure id(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.paper_figures and not Path(args.paper_figures).is_dir():
        raise InputError(f"paper figures folder {args.paper_figures} does not exist; pass the folder of the paper's "
                         "images (e.g. ../shared/reference/paper-figures)")
    from attnlab.core.names import device_map_of

    if args.device not in ("auto", "cpu") and device_map_of(args.device) is None:
        from attnlab.core.models import resolve_device  # imports torch: only for a device that must be looked up

        resolve_device(args.device)  # a bad device fails now, not once per experiment
    out = check_out_dir(args.out)  # only now: a refused command creates no folder
    # the workers start once the input is accepted and, for auto or cpu, before torch is imported (by the Hub probe
    # of the default corpus, or by the first job), which leaves the other core idle
    with start_workers(only) as plotter:
        settings = Settings(out=out, models=models, corpus=_corpus_default(args), quick=args.quick, seed=args.seed,
                            device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                            progress=not args.no_progress, command="attnlab " + shlex.join(args.argv),
                            fallback=not args.no_fallback, force=args.force, geometry_protocol=args.geometry_protocol,
                            paper_figures=args.paper_figures, organism=args.organism)
        return _report(settings, only, plotter)


def _report(settings: Settings, only: list[str] | None, plotter) -> int:
    """The command's run and its terminal summary."""
    results = reproduce(settings, only, say=lambda line: print(line, file=sys.stderr), plotter=plotter)
    ran = [r for r in results if not getattr(r, "earlier", False)]
    failed = [r for r in ran if r.error]
    unavailable = [r for r in failed if r.unavailable and settings.fallback]
    substituted = sorted({r.id for r in ran if r.substituted})
    notes = []
    if settings.quick:
        notes.append("quick mode (smoke run, not comparable with the paper)")
    if substituted:
        notes.append(f"{len(substituted)} figures made with the embedded {EMBEDDED_NAME} (not comparable with the paper)")
    if settings.reused:
        notes.append(f"{settings.reused} experiments reused")
    from attnlab.induction.scores import verdict_line

    for r in ran:
        if r.target and r.meta is not None and r.id in ("figure7a", "figure7b", "figure7c"):
            print(f"{r.id} verdict: {verdict_line(r.target, r.meta['verdict'][r.target])}")
    if settings.organism_line:
        print(settings.organism_line)
    print(f"{len(ran) - len(failed)} of {len(ran)} figures produced" + (f"; {'; '.join(notes)}" if notes else "")
          + f"; report: {settings.out / 'index.html'}")
    by_reason: dict = {}
    for r in failed:
        by_reason.setdefault(r.error, []).append(r.id)
    for reason, ids in by_reason.items():
        print(f"  not produced: {_id_ranges(ids)}: {reason}")
    if settings.advice:
        print(f"  {settings.advice}")
    hard = [r for r in failed if r not in unavailable]
    return 1 if hard else 0
