"""Every figure of the paper with one command: ``attnlab reproduce --out DIR``.

Runs each experiment with the paper's settings and protocols, one run folder per experiment under
``DIR/runs/`` (reused when rerun with the same settings, model content, corpus content and attnlab), copies
each figure to ``DIR/figures/<figure>.png`` and writes a report, ``DIR/index.html`` and ``DIR/README.md``:
every figure with its caption, the paper's reported result beside ours, what could not be produced and why,
run times and provenance.

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
from attnlab.core.models import EMBEDDED_NAME, embedded_model_path, model_label
from attnlab.core.outputs import atomic_path, check_out_dir, read_json, versions, write_json
from attnlab.experiments.common_args import add_runtime_args
from attnlab.experiments.report import FigureResult, write_report

ROLES = {
    "gpt2": "gpt2",
    "bert": "bert-base-uncased",
    "bert-tiny": "prajjwal1/bert-tiny",
    "bert-small": "prajjwal1/bert-small",
    "bert-medium": "prajjwal1/bert-medium",
    "bert-large": "bert-large-uncased",
}
PAPER_TOP_HEADS = ["L9H0", "L9H6", "L10H1", "L10H9", "L11H8"]
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
    reused: int = 0  # filled in by reproduce(): experiments reused from an earlier run
    advice: str | None = None  # filled in by reproduce(): how to supply missing weights, said once

    def trials(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Figure:
    """One figure of the report: where it comes from and what the paper reported, if anything."""

    id: str
    caption: str  # may name {model}: the model actually used
    source: str  # file inside the job's run folder, or a callable(meta) -> file
    compare: Callable | None = None  # (meta, substituted) -> [(quantity, paper, ours)]
    paper_image: str | None = None  # the paper's image of this figure (shared/reference/paper-figures)

    def source_for(self, meta: dict) -> str:
        return self.source(meta) if callable(self.source) else self.source


@dataclass
class Job:
    """One experiment run that produces one or more figures."""

    name: str
    role: str
    masked_lm: bool
    config: Callable  # (settings, model name, context) -> the experiment's config dataclass
    run: Callable  # (config, out_dir, loader, settings, context) -> meta
    figures: list[Figure]
    embedded_ok: bool = True  # can the embedded MiniLM stand in for this role here?
    needs: str = ""  # what a stand-in must have, when it cannot


# ---------------------------------------------------------------- paper comparisons (from results, not files)


def _heads_text(top: list, k: int) -> list[str]:
    return [f"L{layer}H{head} ({mean:.3g})" for layer, head, mean, _ in top[:k]]


def _compare_top(target: str, paper: list[str]):
    def compare(meta, substituted):
        ours = _heads_text(meta["top_heads"][target], len(paper))
        overlap = len({h.split(" ")[0] for h in ours} & set(paper))
        note = "not comparable: another model stood in" if substituted else \
            f"{overlap} of {len(paper)} as in the paper"
        return [(f"strongest heads, {_target_words(target)}", ", ".join(paper), ", ".join(ours) + f" - {note}")]

    return compare


def _target_words(target: str) -> str:
    from attnlab.experiments.induction import target_words

    return target_words(target)


def _compare_icl(meta, substituted):
    s = meta["summary"]
    ci = f"95% CI {s['ci95'][0]:.3f} .. {s['ci95'][1]:.3f}, " if s["ci95"][0] is not None else ""
    return [("mean loss(50) - loss(500)", "0.23 (50 trials)", f"{s['mean']:.3f} ({ci}{s['n']} trials)")]


def _compare_optimum(paper_notebook: float, layer: int, head: int):
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
    from attnlab.experiments.induction import InductionConfig, run_induction

    def config(s: Settings, model: str, context):
        # --quick uses the clean protocol: with a handful of trials one r = 0 trial of the paper protocol
        # (mask on the first copy) could make the only visible structure in a map
        return InductionConfig(model=model, variant=variant, protocol="clean" if s.quick else "paper",
                               trials=s.trials(trials, QUICK_TRIALS), seed=s.seed, dtype=s.dtype)

    def run(cfg, out, loader, s: Settings, context):
        return run_induction(cfg, out, lm=loader, batch_size=s.batch_size, progress=s.progress, reuse=not s.force)

    return Job(name, role, False, config, run, figures)


def _icl_job():
    from attnlab.experiments.icl import ICLConfig, run_icl

    def config(s: Settings, model: str, context):
        return ICLConfig(model=model, corpus=s.corpus, protocol="paper", trials=s.trials(50, 5), seed=s.seed,
                         dtype=s.dtype)

    def run(cfg, out, loader, s: Settings, context):
        return run_icl(cfg, out, lm=loader, batch_size=s.batch_size, reuse=not s.force, progress=s.progress)

    return Job("icl", "bert", True, config, run, [
        Figure("figure5", "Figure 5 - in-context learning score of {model}: masked-LM loss with 50 tokens of "
               "context minus loss with 500 tokens, per trial (paper protocol).", "icl_histogram.png", _compare_icl,
               "icl_loss_difference.png")],
        embedded_ok=False, needs="a masked-LM head (the embedded all-MiniLM-L6-v2 has none)")


def _geometry_config(s: Settings, model: str):
    return dict(model=model, corpus=s.corpus, sentences=s.trials(100, 20), seed=s.seed, dtype=s.dtype,
                protocol=s.geometry_protocol)


def _scaling_job():
    from attnlab.experiments.geometry import GeometryConfig, run_scaling

    def config(s: Settings, model: str, context):
        return GeometryConfig(**_geometry_config(s, model), continuous=not s.quick, bootstrap=s.trials(20, 10))

    def run(cfg, out, loader, s: Settings, context):
        return run_scaling(cfg, out, lm=loader, batch_size=s.batch_size, progress=s.progress, reuse=not s.force,
                           cache=context["geometry"])

    metrics = [("figure2a", "weighted_corr", "weighted correlation of dot product and distance"),
               ("figure2b", "scaled_weighted_corr", "weighted correlation scaled by the head's share of "
                                                    "pairs under a threshold pooled over all heads"),
               ("figure2c", "norm_ratio", "ratio of median query and key norms")]
    return Job("geometry_scaling", "gpt2", False, config, run, [
        Figure(fid, f"Figure 2{fid[-1]} - {{model}}: optimal scaling constant c per head (queries x c, keys / c"
               f"{{translation}}), chosen by {text}; protocol {{protocol}}. Hatched cells: fewer than half of the "
               "sentence resamples agree on the optimum.", f"figure2_{metric}.png")
        for fid, metric, text in metrics])


def pick_umap_heads(optima: dict, metric: str = "scaled_weighted_corr") -> tuple[tuple[int, int], tuple[int, int]]:
    """The stated rule for Figures 3-4 on a model other than GPT-2: by the metric the figures frame (the scaled
    weighted correlation, the paper's metric for them), Figure 3 shows the head whose optimum is most stable (share of sentence resamples agreeing) among heads with an optimum below 1 (queries shrunk),
    Figure 4 the most stable among heads with an optimum above 1 (queries grown) - the paper's two heads
    were one of each. Ties go to the lower layer, then head; if one side is empty, the most stable remaining
    head. ``optima``: the scaling run's meta["optima"]."""
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


def _umap_job(fig: str, index: int, layer: int, head: int, paper_optimum: float, paper_image: str | None = None):
    from attnlab.experiments.geometry import UMAPConfig, run_umap, umap_name

    def config(s: Settings, model: str, context):
        where = (layer, head)
        if context.get("substituted", {}).get("gpt2"):  # another model: the stated rule picks the heads
            scaling = context["results"].get("geometry_scaling")
            if scaling is None:
                raise InputError("the scaling run did not finish, so no head can be picked for the UMAP")
            where = pick_umap_heads(scaling["optima"])[index]
        return UMAPConfig(**_geometry_config(s, model), layer=where[0], head=where[1],
                          max_points=200 if s.quick else 1500, metric="scaled_weighted_corr")

    def run(cfg, out, loader, s: Settings, context):
        return run_umap(cfg, out, lm=loader, batch_size=s.batch_size, progress=s.progress, reuse=not s.force,
                        cache=context["geometry"])

    def source(meta):
        return f"{umap_name(meta['config']['layer'], meta['config']['head'])}.png"

    return Job(f"geometry_umap_{fig}", "gpt2", False, config, run, [
        Figure(fig, f"Figure {fig[-1]} - joint UMAP (cosine) of {{model}} layer {{layer}} head {{head}}: scaled"
               f"{{translation_short}} queries (green) and keys (orange) at six constants; the optimal constant by "
               "the scaled weighted correlation is framed.", source, _compare_optimum(paper_optimum, layer, head),
               paper_image)])


def jobs() -> list[Job]:
    """Every experiment of the paper, grouped by model role so each model is loaded once."""
    standard = [
        Figure("figure7a", "Figure 7a - induction map of {model}, standard RRT (X X): attention from [MASK] to the "
               "previous instance of the masked token.", "induction_standard_prev.png",
               _compare_top("prev", PAPER_TOP_HEADS), "ind_score_rrt.png"),
        Figure("figure7b", "Figure 7b - {model}, standard RRT: attention to the token before the previous instance.",
               "induction_standard_before.png", _compare_top("before", ["L9H9"]), "ind_score_rrt_before.png"),
        Figure("figure7c", "Figure 7c - {model}, standard RRT: attention to the token after the previous instance.",
               "induction_standard_after.png", _compare_top("after", ["L8H2"]), "ind_score_rrt_after.png"),
    ]
    shuffled = [
        Figure("figure8a", "Figure 8a - {model}, shuffled RRT (X perm(X)): attention to the token after the "
               "first-copy instance of the masked token's left neighbour; our mapping of the paper's one shuffled "
               "panel (ind_score_shuffle_before).",
               "induction_shuffled_after_prev_of_left.png", paper_image="ind_score_shuffle_before.png"),
        Figure("figure8b", "Figure 8b - {model}, shuffled RRT: attention to the token before the first-copy "
               "instance of the right neighbour; the paper shows no panel for this target.",
               "induction_shuffled_before_prev_of_right.png"),
    ]
    triple = [
        Figure("figure8c", "Figure 8c - {model}, triple RRT (X X X, mask in the middle copy): attention to the "
               "instance before (first copy); maps to the paper's triple 'before' panel (ind_score_triple_before).",
               "induction_triple_prev.png", paper_image="ind_score_triple_before.png"),
        Figure("figure8d", "Figure 8d - {model}, triple RRT: attention to the instance after (third copy); maps "
               "to the paper's triple 'after' panel (ind_score_triple_after).",
               "induction_triple_next.png", paper_image="ind_score_triple_after.png"),
    ]
    sizes = []
    for letter, role, image in zip("abcd", ["bert-tiny", "bert-small", "bert-medium", "bert-large"],
                                   ["Tiny", "Small", "Medium", "Large"]):
        job = _induction_job(f"induction_{role.replace('-', '_')}", role, "standard", [
            Figure(f"figure9{letter}", f"Figure 9{letter} - induction map (standard RRT, previous instance) of "
                   "{model}" + f" (paper: {ROLES[role]}).", "induction_standard_prev.png",
                   paper_image=f"ind_mapBERT_{image}.png")])
        job.embedded_ok, job.needs = False, "four BERT sizes (one embedded model cannot stand for them)"
        sizes.append(job)
    return [
        _scaling_job(), _umap_job("figure3", 0, 1, 2, 2.5), _umap_job("figure4", 1, 3, 3, 0.2),
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


class Runner:
    """Runs the jobs, substituting the embedded model where a role's model cannot be had."""

    def __init__(self, settings: Settings, say=print):
        from attnlab.experiments.geometry import GeometryCache

        self.settings = settings
        self.cache = ModelCache(settings)
        self.say = say
        self.role_error: dict = {}  # role -> the error that made its model unavailable
        self.context = {"geometry": GeometryCache(), "results": {}, "substituted": {}}
        self.embedded = embedded_model_path() if settings.fallback else None
        self.advice: str | None = None
        self.reused = 0

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

    def run(self, job: Job) -> tuple[dict | None, str | None, str | None, bool]:
        """(meta, model used, None, False) on success; (None, model, reason, unavailable) when the experiment
        could not run - ``unavailable`` when that is because no model at hand can make it."""
        out = self.settings.out / "runs" / job.name
        for _ in range(2):  # a second round only after the role's own model failed to load
            model, reason = self.model_for(job)
            if model is None:
                return None, self.settings.models[job.role], reason, True
            try:
                cfg = job.config(self.settings, model, self.context)
                meta = job.run(cfg, out, lambda: self.cache.get(model, job.masked_lm), self.settings, self.context)
                self.reused += bool(meta.get("reused"))
                return meta, model, None, False
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
                log = self.settings.out / "logs" / f"{job.name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(traceback.format_exc())
                return None, model, f"unexpected {type(exc).__name__}: {exc} (traceback in logs/{job.name}.log)", False
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


def _previous_results(settings: Settings, skip: set) -> list[FigureResult]:
    """Figures of an earlier run in the same folder that this run did not redo: still in the report."""
    report = read_json(settings.out / "report.json") or {}
    kept = []
    for entry in report.get("figures", []):
        if entry.get("id") in skip or not entry.get("path"):
            continue
        meta = read_json(settings.out / "runs" / entry["job"] / "meta.json")
        if meta is None or not (settings.out / entry["path"]).is_file():
            continue  # its run is gone or unfinished: nothing trustworthy to show
        r = FigureResult(**{k: v for k, v in entry.items() if k in FigureResult.__dataclass_fields__})
        r.meta, r.earlier = meta, True
        kept.append(r)
    return kept


def reproduce(settings: Settings, only: list[str] | None = None, say=print) -> list[FigureResult]:
    """Run every job (or those producing the figures in ``only``) and write the report. Returns the results."""
    t0 = time.perf_counter()
    check_out_dir(settings.out)
    if (settings.out / "meta.json").exists():
        raise InputError(f"output folder {settings.out} holds a single experiment's run (meta.json); write the "
                         "report to another folder (out)")
    selected = [j for j in jobs() if not only or any(f.id in only for f in j.figures)]
    runner = Runner(settings, say)
    results: list[FigureResult] = []
    iterator = selected
    if settings.progress:
        from attnlab.core.progress import bar

        iterator = bar(selected, desc="reproduce", unit="experiment")
    for job in iterator:
        if settings.progress and hasattr(iterator, "set_postfix_str"):
            iterator.set_postfix_str(job.name)
        meta, model, reason, unavailable = runner.run(job)
        if meta is not None:
            runner.context["results"][job.name] = meta
            if model != settings.models[job.role]:
                runner.context["substituted"][job.role] = model
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
                source = fig.source_for(meta)
                if meta.get("top_heads"):
                    result.target = source[len(f"induction_{meta['config']['variant']}_"):-len(".png")]
                copy_figure(run_dir / source, settings.out / "figures" / f"{fig.id}.png")
                result.path = f"figures/{fig.id}.png"
                result.meta = meta
                if fig.compare:
                    result.comparison = fig.compare(meta, substituted)
            results.append(result)
    runner.cache.loaded.clear()
    done = {r.id for r in results}
    results += _previous_results(settings, done)
    order = [f.id for j in jobs() for f in j.figures]
    results.sort(key=lambda r: order.index(r.id) if r.id in order else len(order))
    write_json(settings.out / "report.json", {"figures": [r.record() for r in results]})
    sections = []
    if "induction_standard" in runner.context["results"] and not only:
        sections.append(_patterns_section(runner))
        sections.append(_heads_section(runner))
    sizes = [(r.model_used, r.meta) for r in results if r.id.startswith("figure9") and r.meta is not None]
    if len(sizes) >= 2:
        sections.append(_sizes_section(settings, sizes))
    given = {role: model for role, model in settings.models.items() if model != ROLES[role]}
    write_report(settings, results, total_s=time.perf_counter() - t0, versions=versions(),
                 substituted=dict(runner.context["substituted"]), advice=runner.advice, sections=sections, given=given)
    settings.reused, settings.advice = runner.reused, runner.advice
    return results


def _sizes_section(settings: Settings, sizes) -> dict:
    """Figure 9 as one figure: every size's map of the previous instance at relative depth, one colour scale."""
    from attnlab.figures.heatmap import small_multiples

    import numpy as np

    panels = [(model_label(model), np.array([[np.nan if v is None else v for v in row]
                                             for row in meta["maps"]["prev"]["mean"]])) for model, meta in sizes]
    small_multiples(panels,
                    "Figure 9 across model sizes: attention from [MASK] to the previous instance",
                    settings.out / "figures" / "figure9.png")
    return {"title": "Figure 9 across sizes", "job": "figure9-sizes", "image": "figures/figure9.png",
            "text": "The panels of Figure 9 side by side: layers at their relative depth, one colour scale for all "
                    "models, each model's strongest head outlined."}


def _heads_section(runner: Runner) -> dict:
    """Beyond the paper: is an induction-like head also a copying head, and does the model use it? (#14)"""
    from attnlab.experiments.heads import HeadsConfig, run_heads

    model = runner.context["results"]["induction_standard"]["config"]["model"]
    s = runner.settings
    # the ablation scan is the cost here (144 heads x a pass over both versions of every trial on bert-base):
    # 8 trials of n = 30 keep it near a minute on a 2-core CPU; `attnlab heads` defaults to 16 of n = 50
    cfg = HeadsConfig(model=model, trials=2 if s.quick else 8, seq_len=20 if s.quick else 30, ablation=not s.quick,
                      dtype=s.dtype)
    out = s.out / "runs" / "heads"

    def load():  # the masked LM when there is one (ablation, DLA), else the encoder (weights, patterns)
        try:
            return runner.cache.get(model, True)
        except AttnlabError:
            return runner.cache.get(model, False)

    try:
        meta = run_heads(cfg, out, lm=load, reuse=not s.force, progress=s.progress)
    except AttnlabError as exc:
        return {"title": "Induction heads: copying and causal evidence", "error": str(exc)}
    rows = [(f"L{a}H{b}", f"{v:.3f}") for a, b, v in meta["top_heads"]["masked_induction"][:5]]
    notes = " ".join(meta.get("notes") or [])
    return {"title": "Induction heads: copying and causal evidence (beyond the paper)", "job": "heads",
            "image": "runs/heads/story.png", "rows": rows, "header": ["head", "prefix matching at [MASK] (corrected)"],
            "text": f"{model_label(model)}: per head, prefix matching at a [MASK] (x) against the OV copying score "
                    "(y)" + (f"; not coloured: {notes}" if notes else
                             ", coloured by direct logit attribution at the [MASK] (--quick skips the ablation scan)"
                             if s.quick else ", coloured by how much zeroing the head alone changes the in-context "
                             "copying gain of the rrt task (blue: the model uses it)")
                    + ". Full scores: runs/heads/heads.csv, composition.csv, heads.png."}


PATTERN_WORDS = ("dog", "river", "run", "happy")


def _patterns_section(runner: Runner) -> dict:
    """Beyond the paper: pattern/message projections of a few words through the strongest heads of Figure 7a."""
    from attnlab.experiments.patterns import PatternsConfig, run_patterns

    meta7 = runner.context["results"]["induction_standard"]
    model = meta7["config"]["model"]
    heads = [(layer, head) for layer, head, _, _ in meta7["top_heads"]["prev"][:3]]
    layers = ",".join(str(layer) for layer in sorted({layer for layer, _ in heads}))
    cfg = PatternsConfig(model=model, words=PATTERN_WORDS, layers=layers, top_k=5, dtype=runner.settings.dtype)
    out = runner.settings.out / "runs" / "patterns"
    try:
        meta = run_patterns(cfg, out, lm=lambda: runner.cache.get(model, False), reuse=not runner.settings.force,
                            warn=lambda *_: None)
    except AttnlabError as exc:
        return {"title": "Pattern and message projections", "error": str(exc)}
    top = meta["top_tokens"]  # {word: {kind: {"L<l>H<h>": [tokens]}}}
    rows = [(word, f"L{layer}H{head}", ", ".join(top[word]["pattern"].get(f"L{layer}H{head}", [])),
             ", ".join(top[word]["message"].get(f"L{layer}H{head}", [])))
            for word in PATTERN_WORDS for layer, head in heads]
    return {"title": "Pattern and message projections (beyond the paper)", "job": "patterns", "rows": rows,
            "image": "runs/patterns/patterns.png",
            "model": model, "header": ["word", "head", "pattern: looks for (top 5)", "message: writes (top 5)"],
            "text": f"{model_label(model)}: the three heads with the strongest attention to the previous instance "
                    "(Figure 7a). Pattern p = x W_Q W_K^T, what the head looks for when the word is the query; "
                    "message m = x W_V W_O, what it writes when it attends to the word; nearest vocabulary tokens by "
                    "cosine. Full tables: runs/patterns/patterns.md.",
            "reused": bool(meta.get("reused"))}


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
    p = sub.add_parser("reproduce", help="every figure of the paper, with a report (index.html, README.md)",
                       description=__doc__, formatter_class=_raw())
    p.add_argument("--out", required=True, help="output directory (figures/, runs/, index.html, README.md)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_TRIALS} induction trials (clean protocol), 5 ICL trials, 20 sentences, "
                        "small UMAPs")
    p.add_argument("--model", action="append", default=[], metavar="ROLE=ID_OR_PATH",
                   help=f"substitute a model (repeatable); roles: {', '.join(ROLES)}")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help=f"corpus for ICL and geometry (default: {DEFAULT_CORPUS}); e.g. a local .jsonl.gz")
    p.add_argument("--only", default=None, help="comma-separated figure ids, e.g. figure7a,figure9b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--geometry-protocol", default="text", choices=["text", "notebook"],
                   help="Figures 2-4: text (our reading of the paper's words, default) or notebook (the paper's "
                        "notebook computation)")
    p.add_argument("--no-fallback", action="store_true",
                   help=f"never substitute the embedded {EMBEDDED_NAME} for a model that cannot be had")
    p.add_argument("--force", action="store_true", help="recompute every experiment, even finished ones")
    p.add_argument("--paper-figures", default=None,
                   help="folder of the paper's figure images, shown beside ours in index.html")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _corpus_default(args) -> str:
    """The Hub corpus when the Hub answers; else the shared Simple Wikipedia file when it sits beside the
    checkout (a fresh offline machine still gets Figures 2-4)."""
    if args.corpus != DEFAULT_CORPUS:
        return args.corpus
    from attnlab.core.models import hub_reachable

    local = Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki" / "articles-400.jsonl.gz"
    if not hub_reachable() and local.is_file():
        return str(local)
    return args.corpus


def _run(args) -> int:
    models = parse_models(args.model)
    out = check_out_dir(args.out)
    only = [f.strip() for f in args.only.split(",") if f.strip()] if args.only else None
    known = [f.id for j in jobs() for f in j.figures]
    if args.only is not None and not only:
        raise InputError(f"only lists no figure ({args.only!r}); known: {', '.join(known)}")
    if only and (unknown := sorted(set(only) - set(known))):
        raise InputError(f"unknown figure id(s) {', '.join(unknown)}; known: {', '.join(known)}")
    settings = Settings(out=out, models=models, corpus=_corpus_default(args), quick=args.quick, seed=args.seed,
                        device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        progress=not args.no_progress, command="attnlab " + shlex.join(args.argv),
                        fallback=not args.no_fallback, force=args.force, geometry_protocol=args.geometry_protocol,
                        paper_figures=args.paper_figures)
    from attnlab.core.models import device_map_of, resolve_device

    if device_map_of(args.device) is None:
        resolve_device(args.device)  # a bad device fails now, not once per experiment
    if args.paper_figures and not Path(args.paper_figures).is_dir():
        raise InputError(f"paper figures folder {args.paper_figures} does not exist; pass the folder of the paper's "
                         "images (e.g. ../shared/reference/paper-figures)")
    results = reproduce(settings, only, say=lambda line: print(line, file=sys.stderr))
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
