"""Records and configs of the geometry experiments (torch-free, read by the command line):
``attnlab geometry scaling`` (Figure 2), ``attnlab geometry umap`` (Figures 3-4), ``attnlab patterns``.

Scaling convention: queries are multiplied by c, keys divided by c and (protocol ``text``) translated so that
their centroid sits on the queries' (see ``geometry/scaling.py``). Layers and heads are 0-based everywhere.
Protocols: ``text`` (default) - our reading of the paper's words; ``notebook`` - the paper's notebook
computation, quirks included (``geometry/notebook.py``). Constants are always reported in attnlab's
convention (queries x c); the notebook's own constant is 1 / c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnlab.core.config import check_fields, option
from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.errors import InputError
from attnlab.core.runs import Experiment
from attnlab.icl.experiment import CORPUS_HELP, corpus_identity, prepare_corpus
from attnlab.induction.experiment import dtype_option, model_option, revision_option

PAPER_CONSTANTS = (0.2, 0.4, 0.8, 1.0, 1.25, 2.5, 5.0)
UMAP_CONSTANTS = (0.2, 0.4, 1.0, 1.25, 2.5, 5.0)
METRICS = ("weighted_corr", "scaled_weighted_corr", "norm_ratio")
METRIC_TITLES = {
    "weighted_corr": "weighted correlation",
    "scaled_weighted_corr": "weighted correlation, scaled by pair count",
    "norm_ratio": "Q/K norm ratio",
}
GEOMETRY_PROTOCOLS = ("text", "notebook")
KINDS = ("pattern", "message")


def check_constants(constants, what: str = "scaling constants") -> tuple:
    """Constants as floats: finite, > 0, and within [1e-6, 1e6] (c and 1/c are squared, and plotted on a log
    scale); a one-line error otherwise."""
    try:
        values = tuple(float(c) for c in (constants if isinstance(constants, (list, tuple)) else [constants]))
    except (TypeError, ValueError):
        raise InputError(f"{what} must be numbers, got {constants!r}") from None
    if not values:
        raise InputError(f"no {what} given; pass positive numbers, e.g. 0.2,0.4,0.8,1,1.25,2.5,5")
    if any(not math.isfinite(c) or c <= 0 for c in values):
        raise InputError(f"{what} must be finite and > 0 (queries are multiplied by c, keys divided by c); got "
                         f"{list(values)}")
    bad = [c for c in values if not 1e-6 <= c <= 1e6]
    if bad:
        raise InputError(f"{what} must lie in [1e-6, 1e6] (c and 1/c are squared), got {bad}")
    return values


@dataclass
class GeometryConfig:
    model: str = model_option("gpt2", "Hub id or local folder (gpt2, as in the paper)")
    corpus: str = option(DEFAULT_CORPUS, CORPUS_HELP)
    sentences: int = option(100, "number of sentences", minimum=1)
    constants: tuple = option(PAPER_CONSTANTS, "scaling constants c > 0, comma-separated (the paper's)", item=float)
    seed: int = option(0, "random seed (sentences, resamples)")
    min_tokens: int = option(8, "shortest usable sentence in tokens")
    max_tokens: int = option(64, "longest usable sentence in tokens")
    translate_keys: bool = option(True, "do not translate keys onto the query centroid", flag="--no-translate")
    continuous: bool = option(True, "skip the continuous (log c) optimum search", flag="--no-continuous")
    revision: str | None = revision_option()
    dtype: str = dtype_option()
    protocol: str = option("text", "text: our reading of the paper's words; notebook: the paper's notebook "
                                   "computation, quirks included", choices=GEOMETRY_PROTOCOLS)
    bootstrap: int = option(20, "sentence resamples for the stability of each optimum (0 skips)", minimum=0)

    def __post_init__(self):
        check_fields(self)
        if self.min_tokens < 2 or self.max_tokens < self.min_tokens:
            raise InputError(f"need 2 <= min_tokens <= max_tokens, got {self.min_tokens} and {self.max_tokens}")
        self.constants = check_constants(self.constants)


@dataclass
class UMAPConfig(GeometryConfig):
    layer: int = option(0, "layer, 0-based", required=True)
    head: int = option(0, "head, 0-based", required=True)
    umap_constants: tuple = option(UMAP_CONSTANTS, "constants shown, one panel each", item=float)
    metric: str = option("weighted_corr", "whose optimum is framed", choices=METRICS)
    max_points: int = option(1500, "queries (and keys) embedded at most", minimum=10)
    n_neighbors: int = option(15, "UMAP neighbours", minimum=2)
    min_dist: float = option(0.1, "UMAP minimum distance")
    bootstrap: int = option(0, "", cli=False)  # the UMAP needs only the optimum
    continuous: bool = option(False, "", cli=False)

    def __post_init__(self):
        super().__post_init__()
        self.umap_constants = check_constants(self.umap_constants, "UMAP constants")
        for name in ("layer", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be a whole number >= 0 (0-based), got {value!r}")


@dataclass
class PatternsConfig:
    model: str = model_option("bert-base-uncased")
    words: tuple = option(("couch", "dog", "run", "happy"), "comma-separated words, e.g. couch,dog,run,happy",
                          required=True)
    layers: str = option("all", "layers, e.g. 0-3 or 0,5,11")
    heads: str = option("all", "heads to report")
    top_k: int = option(15, "vocabulary tokens per row", minimum=1)
    kinds: tuple = option(KINDS, "pattern, message or both")
    sentence: str | None = option(None, "use each word's hidden state in this sentence at each layer's input "
                                        "instead of its embedding")
    layernorm: bool = option(False, "apply each layer's input LayerNorm to the vocabulary (and embedding inputs)")
    keep_special: bool = option(False, "keep special and [unused] tokens")
    no_subwords: bool = option(False, "drop BERT '##' pieces")
    no_bpe_fragments: bool = option(False, "drop GPT-2 tokens without a leading space")
    no_high_bias: bool = option(False, "drop tokens in the top-k of over half the rows")
    strict: bool = option(False, "refuse words that split into several pieces or are unknown")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        words = (self.words,) if isinstance(self.words, str) else self.words
        self.words = tuple(w.strip() for w in words if w and w.strip())
        if not self.words:
            raise InputError("words lists no word; give comma-separated words, e.g. couch,dog,run")
        self.kinds = tuple(k.strip() for k in ((self.kinds,) if isinstance(self.kinds, str) else self.kinds))
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise InputError(f"kinds takes {', '.join(KINDS)}, got {','.join(self.kinds)!r}")
        check_fields(self)


def _prepare_geometry(cfg, ctx) -> None:
    from attnlab.geometry.study import HF_DOC_LIMIT

    if ctx.docs is None and cfg.corpus.startswith("hf:"):
        from attnlab.core.corpus import load_corpus

        ctx.docs = load_corpus(cfg.corpus, limit=HF_DOC_LIMIT)
    prepare_corpus(cfg, ctx)


def _start_fit_worker(cfg) -> None:
    from attnlab.geometry import fitworker

    fitworker.start()  # a process that imports umap-learn on the other core while this one imports torch and loads


def describe_scaling(meta: dict) -> list[str]:
    lines = []
    for metric, rows in meta["optima"].items():
        values = [r[2] for r in rows if r[2] is not None]
        stable = [r for r in rows if r[2] is not None and r[3] is not None and r[3] >= 0.5]
        below = sum(v < 1 for v in values)
        lines.append(f"{METRIC_TITLES[metric]}: optimum found for {len(values)} of {len(rows)} heads ({below} below "
                     f"c = 1, {len(values) - below} at or above)" + (f"; {len(stable)} stable across sentence "
                                                                     "resamples" if meta["config"]["bootstrap"] else ""))
    missing = {m: n for m, n in meta.get("heads_missing", {}).items() if n}
    for metric, n in missing.items():
        lines.append(f"note: {n} heads have no {metric} optimum (no value at any constant, or an exact tie; "
                     "optima.csv says which - more sentences help)")
    return lines


def describe_umap(meta: dict) -> list[str]:
    cfg, opt = meta["config"], meta.get("optimum")
    where = f"L{cfg['layer']}H{cfg['head']}"
    return [f"umap {where}: optimal c = {opt:g} by {METRIC_TITLES[cfg['metric']]}" if opt is not None
            else f"umap {where}: no optimum by {METRIC_TITLES[cfg['metric']]} (see optima)"]


def describe_patterns(meta: dict) -> list[str]:
    used = ", ".join(f"{w} -> {p}" for w, p in meta.get("tokens_used", {}).items())
    return [f"patterns: tokens used {used}"]


SCALING = Experiment(
    name="geometry-scaling", command=("geometry", "scaling"), config=GeometryConfig,
    help="three metrics x constants for every head; Figure 2 heatmaps",
    description=__doc__.split("\n\n", 1)[1] + "\nOutputs: scaling.csv (layer, head, metric, constant, value, "
    "n_under_threshold, optimum, continuous_optimum, status), optima.csv (layer, head, metric, optimum, "
    "continuous_optimum, stability, status), sentences.json, figure2_<metric>.png (unstable cells hatched), "
    "meta.json.",
    identity=corpus_identity, prepare=_prepare_geometry,
    compute="attnlab.geometry.study:compute_scaling", save="attnlab.geometry.study:save_scaling",
    summary="attnlab.geometry.study:summary_scaling", plot="attnlab.figures.scaling:plot_scaling",
    describe=describe_scaling,
)

UMAP = Experiment(
    name="geometry-umap", command=("geometry", "umap"), config=UMAPConfig,
    help="joint UMAP embeddings of one head's queries and keys (Figures 3-4)",
    description=__doc__.split("\n\n", 1)[1] + "\nOutputs: umap_L<l>H<h>.png (a grid of joint UMAP embeddings, one "
    "panel per constant, the optimal one framed), umap_L<l>H<h>.npz (the embeddings), meta.json.",
    identity=corpus_identity, prepare=_prepare_geometry, warm_up=_start_fit_worker,
    check="attnlab.geometry.study:check_umap",
    compute="attnlab.geometry.study:compute_umap", save="attnlab.geometry.study:save_umap",
    summary="attnlab.geometry.study:summary_umap", plot="attnlab.figures.scaling:plot_umap",
    describe=describe_umap,
)

PATTERNS = Experiment(
    name="patterns", config=PatternsConfig,
    help="pattern/message projections compared with the vocabulary",
    description=("For each word (or each word's position in --sentence), layer and head: the top-k vocabulary tokens "
                 "by cosine similarity with the pattern p = x W_Q W_K^T (what the head looks for) and the message "
                 "m = x W_V W_O (what it writes).\n\nOutputs: patterns.csv (input, layer, head, kind, rank, token, "
                 "similarity), patterns.md, patterns.png, spectrum.csv (singular values and effective rank of the "
                 "W^P and W^M of the heads asked for), meta.json."),
    check="attnlab.geometry.patterns:check", compute="attnlab.geometry.patterns:compute_patterns",
    save="attnlab.geometry.patterns:save", summary="attnlab.geometry.patterns:summary",
    plot="attnlab.figures.patterns:plot", describe=describe_patterns,
)

EXPERIMENTS = [SCALING, UMAP, PATTERNS]
