"""Every figure of the paper with one command: ``attnlab reproduce --out DIR``.

Runs each experiment with the paper's settings and protocols, one run folder per experiment under
``DIR/runs/`` (reused when rerun with the same settings: config hash), copies each figure to
``DIR/figures/<figure>.png`` and writes a report, ``DIR/index.html`` and ``DIR/README.md``: every figure with
its caption, the paper's reported result beside ours, what could not be produced and why, run times and
provenance. Exit status 0 when every figure was produced, 1 when some were not (the rest still are).

Model roles (``--model ROLE=ID_OR_PATH`` substitutes one, e.g. a local folder when offline):
    gpt2         Figures 2-4 (query/key geometry)            default gpt2
    bert         Figures 5, 7a-c, 8a-d (ICL, induction)       default bert-base-uncased (needs its MLM head)
    bert-tiny, bert-small, bert-medium, bert-large           Figure 9 (induction maps across sizes)
"""

from __future__ import annotations

import shlex
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.errors import AttnlabError, InputError
from attnlab.core.outputs import atomic_path, finished, versions
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

    def trials(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Figure:
    """One figure of the report: where it comes from and what the paper reported, if anything."""

    id: str
    caption: str
    source: str  # file inside the job's run folder
    compare: Callable[[Path], list] | None = None  # run folder -> [(quantity, paper, ours)]


@dataclass
class Job:
    """One experiment run that produces one or more figures."""

    name: str
    role: str
    masked_lm: bool
    config: Callable[[Settings], object]  # -> the experiment's config dataclass
    run: Callable  # (config, out_dir, lm, settings) -> meta
    figures: list[Figure]


# ---------------------------------------------------------------- paper comparisons


def _top_heads(run_dir: Path, target: str, k: int) -> list[str]:
    import csv

    rows = [r for r in csv.DictReader(open(run_dir / "scores.csv")) if r["target"] == target]
    rows.sort(key=lambda r: -float(r["mean"]))
    return [f"L{r['layer']}H{r['head']} ({float(r['mean']):.3g})" for r in rows[:k]]


def _compare_top(target: str, paper: list[str]):
    def compare(run_dir: Path):
        ours = _top_heads(run_dir, target, len(paper))
        overlap = len({h.split(" ")[0] for h in ours} & set(paper))
        return [(f"strongest heads, target '{target}'", ", ".join(paper),
                 ", ".join(ours) + f" - {overlap} of {len(paper)} as in the paper")]

    return compare


def _compare_icl(run_dir: Path):
    import json

    s = json.loads((run_dir / "summary.json").read_text())
    return [("mean loss(50) - loss(500)", "0.23 (50 trials)",
             f"{s['mean']:.3f} (95% CI {s['ci95'][0]:.3f} .. {s['ci95'][1]:.3f}, {s['n']} trials)")]


def _compare_optimum(paper: float):
    def compare(run_dir: Path):
        import json

        meta = json.loads((run_dir / "meta.json").read_text())
        return [("optimal c (weighted correlation)", f"{paper:g}", f"{meta['optimum']:g}")]

    return compare


# ---------------------------------------------------------------- jobs


def _induction_job(name, role, variant, figures, trials=50):
    from attnlab.experiments.induction import InductionConfig, run_induction

    def config(s: Settings):
        return InductionConfig(model=s.models[role], variant=variant, protocol="paper",
                               trials=s.trials(trials, 4), seed=s.seed, dtype=s.dtype)

    def run(cfg, out, lm, s: Settings):
        return run_induction(cfg, out, lm=lm, batch_size=s.batch_size, progress=s.progress)

    return Job(name, role, False, config, run, figures)


def _icl_job():
    from attnlab.experiments.icl import ICLConfig, run_icl

    def config(s: Settings):
        return ICLConfig(model=s.models["bert"], corpus=s.corpus, protocol="paper", trials=s.trials(50, 5),
                         seed=s.seed, dtype=s.dtype)

    def run(cfg, out, lm, s: Settings):
        return run_icl(cfg, out, lm=lm, batch_size=s.batch_size)

    return Job("icl", "bert", True, config, run, [
        Figure("figure5", "Figure 5 - in-context learning score: masked-LM loss with 50 tokens of context "
               "minus loss with 500 tokens, per trial (paper protocol).", "icl_histogram.png", _compare_icl)])


def _scaling_job():
    from attnlab.experiments.geometry import GeometryConfig, run_scaling

    def config(s: Settings):
        return GeometryConfig(model=s.models["gpt2"], corpus=s.corpus, sentences=s.trials(100, 20), seed=s.seed,
                              continuous=not s.quick, dtype=s.dtype)

    def run(cfg, out, lm, s: Settings):
        return run_scaling(cfg, out, lm=lm, batch_size=s.batch_size, progress=s.progress)

    metrics = [("figure2a", "weighted_corr", "weighted correlation of dot product and distance"),
               ("figure2b", "scaled_weighted_corr", "weighted correlation scaled by the head's share of "
                                                    "pairs under a threshold pooled over all heads"),
               ("figure2c", "norm_ratio", "ratio of median query and key norms")]
    return Job("geometry_scaling", "gpt2", False, config, run, [
        Figure(fid, f"Figure 2{fid[-1]} - optimal scaling constant c per head (queries x c, keys / c, keys "
               f"translated onto the query centroid), chosen by {text}.", f"figure2_{metric}.png")
        for fid, metric, text in metrics])


def _umap_job(fig: str, layer: int, head: int, paper_optimum: float):
    from attnlab.experiments.geometry import UMAPConfig, run_umap, umap_name

    def config(s: Settings):
        return UMAPConfig(model=s.models["gpt2"], corpus=s.corpus, sentences=s.trials(100, 20), seed=s.seed,
                          layer=layer, head=head, max_points=200 if s.quick else 1500, dtype=s.dtype)

    def run(cfg, out, lm, s: Settings):
        return run_umap(cfg, out, lm=lm, batch_size=s.batch_size, progress=s.progress)

    return Job(f"geometry_umap_L{layer}H{head}", "gpt2", False, config, run, [
        Figure(fig, f"Figure {fig[-1]} - joint UMAP (cosine) of layer {layer} head {head}'s scaled, key-translated "
               "queries (green) and keys (orange) at six constants; the optimal constant is framed.",
               f"{umap_name(layer, head)}.png", _compare_optimum(paper_optimum))])


def jobs() -> list[Job]:
    """Every experiment of the paper, grouped by model role so each model is loaded once."""
    standard = [
        Figure("figure7a", "Figure 7a - induction map, standard RRT (X X): attention from [MASK] to the previous "
               "instance of the masked token.", "induction_standard_prev.png", _compare_top("prev", PAPER_TOP_HEADS)),
        Figure("figure7b", "Figure 7b - standard RRT: attention to the token before the previous instance.",
               "induction_standard_before.png", _compare_top("before", ["L9H9"])),
        Figure("figure7c", "Figure 7c - standard RRT: attention to the token after the previous instance.",
               "induction_standard_after.png", _compare_top("after", ["L8H2"])),
    ]
    shuffled = [
        Figure("figure8a", "Figure 8a - shuffled RRT (X perm(X)): attention to the token after the first-copy "
               "instance of the masked token's left neighbour.", "induction_shuffled_after_prev_of_left.png"),
        Figure("figure8b", "Figure 8b - shuffled RRT: attention to the token before the first-copy instance of "
               "the right neighbour.", "induction_shuffled_before_prev_of_right.png"),
    ]
    triple = [
        Figure("figure8c", "Figure 8c - triple RRT (X X X, mask in the middle copy): attention to the instance "
               "before (first copy).", "induction_triple_prev.png"),
        Figure("figure8d", "Figure 8d - triple RRT: attention to the instance after (third copy).",
               "induction_triple_next.png"),
    ]
    sizes = [
        _induction_job(f"induction_{role.replace('-', '_')}", role, "standard", [
            Figure(f"figure9{letter}", f"Figure 9{letter} - induction map (standard RRT, previous instance) of "
                   f"{role}.", "induction_standard_prev.png")])
        for letter, role in zip("abcd", ["bert-tiny", "bert-small", "bert-medium", "bert-large"])
    ]
    return [
        _scaling_job(), _umap_job("figure3", 1, 2, 2.5), _umap_job("figure4", 3, 3, 0.2),
        _icl_job(),  # first of its role: the masked LM it loads then serves the induction runs too
        _induction_job("induction_standard", "bert", "standard", standard),
        _induction_job("induction_shuffled", "bert", "shuffled", shuffled),
        _induction_job("induction_triple", "bert", "triple", triple),
        *sizes,
    ]


# ---------------------------------------------------------------- running


class ModelCache:
    """Loads each (model, head) once and keeps only the current role's models in memory."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded: dict = {}
        self.role = None

    def get(self, role: str, masked_lm: bool):
        from attnlab.core.models import load_model

        if role != self.role:
            self.loaded.clear()  # the previous role's models are no longer needed
            self.role = role
        name = self.settings.models[role]
        for (n, has_head), lm in self.loaded.items():  # a masked LM also serves as the plain encoder
            if n == name and (has_head or not masked_lm):
                return lm
        lm = load_model(name, masked_lm=masked_lm, device=self.settings.device, dtype=self.settings.dtype)
        self.loaded[(name, masked_lm)] = lm
        return lm


def run_job(job: Job, settings: Settings, cache: ModelCache) -> tuple[dict | None, str | None]:
    """(meta, None) on success, (None, reason) when the experiment could not run."""
    out = settings.out / "runs" / job.name
    try:
        cfg = job.config(settings)
        meta = finished(out, asdict(cfg))  # finished work: no model load at all
        if meta is None:
            meta = job.run(cfg, out, cache.get(job.role, job.masked_lm), settings)
        return meta, None
    except AttnlabError as exc:
        return None, str(exc)
    except Exception as exc:  # an unexpected failure must not cost the other figures; keep the traceback
        log = settings.out / "logs" / f"{job.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        return None, f"unexpected {type(exc).__name__}: {exc} (traceback in logs/{job.name}.log)"


def copy_figure(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def reproduce(settings: Settings, only: list[str] | None = None) -> list[FigureResult]:
    """Run every job (or those producing the figures in ``only``) and write the report. Returns the results."""
    t0 = time.perf_counter()
    selected = [j for j in jobs() if not only or any(f.id in only for f in j.figures)]
    cache = ModelCache(settings)
    results: list[FigureResult] = []
    iterator = selected
    if settings.progress:
        from tqdm.auto import tqdm

        iterator = tqdm(selected, desc="reproduce", unit="experiment")
    for job in iterator:
        if settings.progress:
            iterator.set_postfix_str(job.name)
        meta, reason = run_job(job, settings, cache)
        run_dir = settings.out / "runs" / job.name
        for fig in job.figures:
            if only and fig.id not in only:
                continue
            result = FigureResult(fig.id, fig.caption, job.name, job.role, settings.models[job.role])
            if meta is None:
                result.error = reason
            else:
                copy_figure(run_dir / fig.source, settings.out / "figures" / f"{fig.id}.png")
                result.path = f"figures/{fig.id}.png"
                result.meta = meta
                if fig.compare:
                    result.comparison = fig.compare(run_dir)
            results.append(result)
    cache.loaded.clear()
    results.sort(key=lambda r: r.id)  # figure order (figure2a ... figure9d), not run order
    write_report(settings, results, total_s=time.perf_counter() - t0, versions=versions())
    return results


# ---------------------------------------------------------------- CLI


def parse_models(specs: list[str]) -> dict:
    models = dict(ROLES)
    for spec in specs:
        role, sep, model = spec.partition("=")
        if not sep or not model:
            raise InputError(f"--model takes ROLE=ID_OR_PATH, got {spec!r}")
        if role not in ROLES:
            raise InputError(f"unknown model role {role!r}; roles are: {', '.join(ROLES)}")
        models[role] = model
    return models


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="every figure of the paper, with a report (index.html, README.md)",
                       description=__doc__, formatter_class=_raw())
    p.add_argument("--out", required=True, help="output directory (figures/, runs/, index.html, README.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 induction trials, 5 ICL trials, 20 sentences, small UMAPs")
    p.add_argument("--model", action="append", default=[], metavar="ROLE=ID_OR_PATH",
                   help=f"substitute a model (repeatable); roles: {', '.join(ROLES)}")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help=f"corpus for ICL and geometry (default: {DEFAULT_CORPUS}); e.g. a local .jsonl.gz")
    p.add_argument("--only", default=None, help="comma-separated figure ids, e.g. figure7a,figure9b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _run(args) -> int:
    settings = Settings(out=Path(args.out), models=parse_models(args.model), corpus=args.corpus, quick=args.quick,
                        seed=args.seed, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        progress=not args.no_progress, command="attnlab " + shlex.join(args.argv))
    only = [f.strip() for f in args.only.split(",")] if args.only else None
    known = {f.id for j in jobs() for f in j.figures}
    if only and (unknown := sorted(set(only) - known)):
        raise InputError(f"unknown figure id(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    results = reproduce(settings, only)
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} of {len(results)} figures produced; report: {settings.out / 'index.html'}")
    for r in failed:
        print(f"  {r.id}: not produced: {r.error}")
    return 1 if failed else 0
