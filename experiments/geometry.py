"""Query/key geometry (the paper's Figures 2-4): ``attnlab geometry scaling`` and ``attnlab geometry umap``.

Scaling convention: queries are multiplied by c, keys divided by c and (protocol ``text``) translated so that
their centroid sits on the queries' (see ``geometry/scaling.py``). Layers and heads are 0-based everywhere.

Protocols: ``text`` (default) - our reading of the paper's words (``geometry/scaling.py``); ``notebook`` - the
paper's notebook computation, quirks included (``geometry/notebook.py``). Constants are always reported in
attnlab's convention (queries x c); the notebook's own constant is 1 / c.

``scaling`` outputs: scaling.csv (layer, head, metric, constant, value, n_under_threshold, optimum,
continuous_optimum, status), optima.csv (layer, head, metric, optimum, continuous_optimum, stability, status),
figure2_<metric>.png (three layers x heads maps of the optimal c; unstable cells hatched), meta.json.
``umap`` outputs: umap_L<l>H<h>.png (a grid of joint UMAP embeddings, one panel per constant, the optimal
one framed), umap_L<l>H<h>.npz (the embeddings), meta.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.corpus import DEFAULT_CORPUS, load_corpus
from attnlab.core.errors import InputError
from attnlab.core.models import model_identity, model_label, resolve_model
from attnlab.core.outputs import begin_run, atomic_path, write_csv, write_json
from attnlab.core.provenance import corpus_fingerprint, digest
from attnlab.experiments.common_args import add_output_args, add_runtime_args, positive_int, print_wrote
from attnlab.geometry.qk import check_head, collect_qk, sample_sentences
from attnlab.geometry.scaling import (
    METRIC_TITLES, METRICS, PAPER_CONSTANTS, bootstrap_stability, check_constants, scaling_metrics, transform_qk,
)

UMAP_CONSTANTS = (0.2, 0.4, 1.0, 1.25, 2.5, 5.0)
HF_DOC_LIMIT = 2000  # streamed datasets: documents to read before sampling sentences
GEOMETRY_PROTOCOLS = ("text", "notebook")
UNSTABLE = 0.5  # cells whose optimum fewer than half of the resamples agree on are hatched in Figure 2


@dataclass
class GeometryConfig:
    model: str = "gpt2"
    corpus: str = DEFAULT_CORPUS
    sentences: int = 100
    constants: tuple = PAPER_CONSTANTS
    seed: int = 0
    min_tokens: int = 8
    max_tokens: int = 64
    translate_keys: bool = True
    continuous: bool = True  # also search the optimum of c on a continuous log scale (protocol text)
    revision: str | None = None
    dtype: str = "float32"
    protocol: str = "text"  # text: our reading of the paper's words; notebook: the notebook's computation
    bootstrap: int = 20  # sentence resamples for the stability of each head's optimum (0: skip)

    def __post_init__(self):
        if self.protocol not in GEOMETRY_PROTOCOLS:
            raise InputError(f"unknown geometry protocol {self.protocol!r}; use one of {', '.join(GEOMETRY_PROTOCOLS)}")
        if not isinstance(self.sentences, int) or self.sentences < 1:
            raise InputError(f"sentences must be a whole number of at least 1, got {self.sentences}")
        if self.min_tokens < 2 or self.max_tokens < self.min_tokens:
            raise InputError(f"need 2 <= min_tokens <= max_tokens, got {self.min_tokens} and {self.max_tokens}")
        if self.bootstrap < 0:
            raise InputError(f"bootstrap must be >= 0 resamples, got {self.bootstrap}")
        self.constants = tuple(float(c) for c in check_constants(self.constants).tolist())
        _check_plottable(self.constants)


@dataclass
class UMAPConfig(GeometryConfig):
    layer: int = 0
    head: int = 0
    umap_constants: tuple = UMAP_CONSTANTS
    metric: str = "weighted_corr"  # which metric's optimum is framed
    max_points: int = 1500  # per kind (queries, keys), sampled with the seed
    n_neighbors: int = 15
    min_dist: float = 0.1
    bootstrap: int = 0  # the UMAP needs only the optimum

    def __post_init__(self):
        super().__post_init__()
        self.umap_constants = tuple(float(c) for c in check_constants(self.umap_constants).tolist())
        _check_plottable(self.umap_constants)
        if self.metric not in METRICS:
            raise InputError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.max_points < 10:
            raise InputError(f"max_points must be at least 10, got {self.max_points}")


def _check_plottable(constants) -> None:
    """Constants so large or small that c^2 overflows (or the log-scale axis cannot hold them) are refused
    up front, not after the CSVs are written."""
    bad = [c for c in constants if not 1e-6 <= c <= 1e6]
    if bad:
        raise InputError(f"scaling constants must lie in [1e-6, 1e6] (c and 1/c are squared), got {bad}")


# ---------------------------------------------------------------- shared q/k collection


class GeometryCache:
    """What several geometry jobs on the same model and sentences share within one process (``reproduce``):
    one q/k collection per (model, corpus, sentence settings), one metrics computation per protocol/constants."""

    def __init__(self):
        self.samples: dict = {}
        self.metrics: dict = {}

    def find_metrics(self, data_key: str, cfg, continuous: bool):
        """Metrics computed for these data and settings, or None; a result with the continuous search also
        serves a request without it."""
        base = (data_key, cfg.protocol, cfg.constants, cfg.translate_keys)
        return self.metrics.get((*base, continuous)) or (None if continuous else self.metrics.get((*base, True)))


def _data_key(cfg: GeometryConfig, lm) -> str:
    return digest([model_identity(cfg.model, cfg.revision, lm), cfg.corpus, cfg.sentences, cfg.seed,
                   cfg.min_tokens, cfg.max_tokens, cfg.dtype])


def _collect(cfg: GeometryConfig, lm, key: str, docs, batch_size, progress, cache: GeometryCache | None):
    """(sentences, queries and keys) for ``key`` (:func:`_data_key`), collected once per cache."""
    if cache is not None and key in cache.samples:
        return cache.samples[key]
    if cfg.max_tokens > lm.max_positions:
        raise InputError(f"max_tokens {cfg.max_tokens} exceeds the model's {lm.max_positions} positions; lower "
                         f"max_tokens to at most {lm.max_positions}")
    if docs is None:
        docs = load_corpus(cfg.corpus, limit=HF_DOC_LIMIT if cfg.corpus.startswith("hf:") else None)
    sample = sample_sentences(lm.tokenizer, docs, cfg.sentences, cfg.seed, cfg.min_tokens, cfg.max_tokens)
    result = sample, collect_qk(lm, sample.token_ids, batch_size=batch_size, progress=progress)
    if cache is not None:
        cache.samples[key] = result
    return result


def compute_metrics(qk, cfg: GeometryConfig, *, continuous: bool = False, index=None):
    """The protocol's metrics on the collected queries and keys (optionally a resample ``index`` of sentences)."""
    q, k, lengths = qk.queries, qk.keys, qk.lengths
    if index is not None:
        q, k, lengths = q[index], k[index], lengths[index]
    if cfg.protocol == "notebook":
        from attnlab.geometry.notebook import notebook_metrics

        return notebook_metrics(q, k, lengths, cfg.constants)
    return scaling_metrics(q, k, lengths, cfg.constants, causal=qk.causal, translate=cfg.translate_keys,
                           continuous=continuous)


def _cached_metrics(qk, cfg, cache, data_key, continuous):
    if cache is not None and (hit := cache.find_metrics(data_key, cfg, continuous)) is not None:
        return hit
    metrics = compute_metrics(qk, cfg, continuous=continuous)
    if cache is not None:
        cache.metrics[(data_key, cfg.protocol, cfg.constants, cfg.translate_keys, continuous)] = metrics
    return metrics


# ---------------------------------------------------------------- results as rows


def row_status(metrics, metric: str, g: int, ci: int) -> str:
    value = metrics.values[metric][g, ci].item()
    if math.isfinite(value):
        if metrics.protocol == "notebook" and metric == "scaled_weighted_corr" and metrics.pooled_counts[g, ci] == 0:
            return "no query of this head within distance 12 (the notebook's default 0)"
        return "ok"
    if metrics.protocol == "notebook":
        return ("no query with 2+ keys under the head's threshold" if metric == "weighted_corr"
                else "no query of any head with 2+ keys within distance 12")
    if metric == "scaled_weighted_corr" and metrics.pooled_counts[g, ci] == 0:
        return "no pair of this head under the pooled threshold"
    return "too few pairs under threshold"


def _per_head(metrics, stability, n_heads):
    """(metric, g, layer, head, optimum, continuous optimum, stability, status) for every metric and head."""
    for metric in METRICS:
        best = metrics.best(metric)
        status = metrics.status(metric)
        cont = metrics.continuous[metric] if metrics.continuous else None
        stab = stability.get(metric) if stability else None
        for g in range(best.shape[0]):
            yield (metric, g, *divmod(g, n_heads), best[g].item(),
                   cont[g].item() if cont is not None else float("nan"),
                   stab[g].item() if stab is not None else float("nan"), status[g])


def _num(x: float, fmt: str = ".6g") -> str:
    return format(x, fmt) if math.isfinite(x) else ""


def scaling_rows(metrics, stability, n_heads):
    for metric, g, layer, head, best, cont, _, _ in _per_head(metrics, stability, n_heads):
        counts = metrics.n_under if metric == "weighted_corr" else metrics.pooled_counts
        for ci, c in enumerate(metrics.constants.tolist()):
            value = metrics.values[metric][g, ci].item()
            n_under = "" if metric == "norm_ratio" else counts[g, ci].item()
            yield [layer, head, metric, f"{c:g}", _num(value, ".8g"), n_under, _num(best), _num(cont),
                   row_status(metrics, metric, g, ci)]


def optima_rows(metrics, stability, n_heads):
    for metric, _, layer, head, best, cont, stab, status in _per_head(metrics, stability, n_heads):
        yield [layer, head, metric, _num(best), _num(cont), _num(stab, ".4g"), status]


SCALING_HEADER = ["layer", "head", "metric", "constant", "value", "n_under_threshold", "optimum",
                  "continuous_optimum", "status"]
OPTIMA_HEADER = ["layer", "head", "metric", "optimum", "continuous_optimum", "stability", "status"]


def optima_summary(metrics, stability, n_heads) -> dict:
    """{metric: [[layer, head, optimum|None, stability|None], ...]} for meta.json (what reproduce reads)."""
    out = {}
    for metric, _, layer, head, best, _, stab, _ in _per_head(metrics, stability, n_heads):
        out.setdefault(metric, []).append([layer, head, best if math.isfinite(best) else None,
                                           stab if math.isfinite(stab) else None])
    return out


def run_scaling(cfg: GeometryConfig, out_dir, *, lm=None, docs=None, device="auto", batch_size=None,
                progress=False, reuse=True, cache: GeometryCache | None = None) -> dict:
    """Figure 2: the three metrics for every head and constant, the optimum per head (with its bootstrap
    stability), three heatmaps. ``lm``: a loaded model, a loader callable, or None (load ``cfg.model``)."""
    run, config, key, identity, meta = begin_run(out_dir, "geometry-scaling", cfg, lm, reuse,
                                                 corpus=corpus_fingerprint(cfg.corpus, docs))
    if meta:
        return meta
    t0 = time.perf_counter()
    lm = resolve_model(lm, cfg, device)
    identity["model"] = lm.fingerprint
    data_key = _data_key(cfg, lm)
    sample, qk = _collect(cfg, lm, data_key, docs, batch_size, progress, cache)
    t1 = time.perf_counter()
    continuous = cfg.continuous and cfg.protocol == "text"
    metrics = _cached_metrics(qk, cfg, cache, data_key, continuous)
    t2 = time.perf_counter()
    reported = {m: metrics.best(m) for m in METRICS}
    stability = bootstrap_stability(lambda idx: compute_metrics(qk, cfg, index=idx), len(qk.lengths), reported,
                                    resamples=cfg.bootstrap, seed=cfg.seed) if cfg.bootstrap else None
    t3 = time.perf_counter()

    stage = run.stage()
    write_csv(stage / "scaling.csv", SCALING_HEADER, scaling_rows(metrics, stability, qk.n_heads))
    write_csv(stage / "optima.csv", OPTIMA_HEADER, optima_rows(metrics, stability, qk.n_heads))
    outputs = ["scaling.csv", "optima.csv", "sentences.json"]
    write_json(stage / "sentences.json", {"texts": sample.texts, "candidates": sample.candidates})
    from attnlab.figures.scaling import optimum_heatmap

    missing = {}
    n_layers, n_heads = qk.n_layers, qk.n_heads
    for metric in METRICS:
        best = metrics.best(metric).reshape(n_layers, n_heads)
        missing[metric] = int(torch.isnan(best).sum())
        stab = stability[metric].reshape(n_layers, n_heads).numpy() if stability else None
        name = f"figure2_{metric}.png"
        note = (f"\nhatched: unstable (< {UNSTABLE:.0%} of {cfg.bootstrap} sentence resamples agree); grey: none"
                if stability else "")
        optimum_heatmap(best.numpy(), cfg.constants,
                        f"Optimal scaling constant: {METRIC_TITLES[metric]} (protocol {cfg.protocol})\n"
                        f"{model_label(cfg.model)}, {cfg.sentences} sentences, {metrics.n_pairs} query-key pairs "
                        f"per head{qk_note(lm, short=True)}{note}", stage / name, stability=stab,
                        unstable_below=UNSTABLE)
        outputs.append(name)
    return run.commit(key, config, outputs, identity, model=lm.meta, n_pairs=metrics.n_pairs, qk=qk_note(lm),
                      heads_missing=missing, optima=optima_summary(metrics, stability, qk.n_heads),
                      timings={"collect_s": round(t1 - t0, 3), "metrics_s": round(t2 - t1, 3),
                               "stability_s": round(t3 - t2, 3), "total_s": round(time.perf_counter() - t0, 3)})


def qk_note(lm, short: bool = False) -> str:
    """What the queries and keys are: on rotary families the post-rotary vectors the model dots."""
    if lm.arch.positions != "rotary":
        return "" if short else "queries and keys as the model computed them (absolute positions)"
    if short:
        return "; post-rotary q/k (what the model dots)"
    return ("post-rotary queries and keys: the vectors the model actually dots, position rotation included "
            f"({lm.model_type} uses rotary position embeddings)")


def displayed_constants(constants, optimum: float | None) -> list[float]:
    """The panels: ``constants``, with the optimum swapped in for its nearest neighbour (log scale) if absent."""
    shown = [float(c) for c in constants]
    if optimum is None or not math.isfinite(optimum) or any(math.isclose(c, optimum) for c in shown):
        return shown
    nearest = min(range(len(shown)), key=lambda i: abs(math.log(shown[i] / optimum)))
    shown[nearest] = optimum
    return sorted(shown)


def umap_name(layer: int, head: int) -> str:
    return f"umap_L{layer}H{head}"


def run_umap(cfg: UMAPConfig, out_dir, *, lm=None, docs=None, device="auto", batch_size=None, progress=False,
             reuse=True, cache: GeometryCache | None = None) -> dict:
    """Figures 3-4: joint UMAP embeddings of one head's queries and keys at several constants. With a
    ``cache`` shared with :func:`run_scaling`, the q/k collection and the optimum are taken from it."""
    from attnlab.geometry.embedding import joint_embedding, subsample

    run, config, key, identity, meta = begin_run(out_dir, "geometry-umap", cfg, lm, reuse,
                                                 corpus=corpus_fingerprint(cfg.corpus, docs))
    if meta:
        return meta
    t0 = time.perf_counter()
    lm = resolve_model(lm, cfg, device)
    identity["model"] = lm.fingerprint
    check_head(cfg.layer, cfg.head, lm.n_layers, lm.n_heads)  # before the forward pass
    data_key = _data_key(cfg, lm)
    sample, qk = _collect(cfg, lm, data_key, docs, batch_size, progress, cache)
    g = cfg.layer * qk.n_heads + cfg.head
    if (cache is not None and cache.find_metrics(data_key, cfg, False) is not None) or cfg.metric == "scaled_weighted_corr" or cfg.protocol == "notebook":
        optimum = _cached_metrics(qk, cfg, cache, data_key, False).best(cfg.metric)[g].item()
    else:  # only this head is needed: its metric does not pool over heads
        sl = (slice(None), slice(None), slice(cfg.layer, cfg.layer + 1), slice(cfg.head, cfg.head + 1))
        optimum = scaling_metrics(qk.queries[sl], qk.keys[sl], qk.lengths, cfg.constants, causal=qk.causal,
                                  translate=cfg.translate_keys).best(cfg.metric)[0].item()
    shown = displayed_constants(cfg.umap_constants, optimum)

    queries, keys = qk.head(cfg.layer, cfg.head)
    q_idx = subsample(len(queries), cfg.max_points, cfg.seed)
    k_idx = subsample(len(keys), cfg.max_points, cfg.seed + 1)
    # the translation uses the centroids of ALL tokens (as the metrics do), not only the plotted ones
    panels, arrays = [], {}
    iterator = shown
    if progress:
        from attnlab.core.progress import bar

        iterator = bar(shown, desc=f"umap L{cfg.layer}H{cfg.head}", unit="constant")
    translate = cfg.translate_keys and cfg.protocol == "text"
    for c in iterator:
        q_c, k_c = transform_qk(queries.double(), keys.double(), c, translate=translate)
        emb = joint_embedding(q_c[q_idx].numpy(), k_c[k_idx].numpy(), seed=cfg.seed, n_neighbors=cfg.n_neighbors,
                              min_dist=cfg.min_dist)
        panels.append((c, emb, len(q_idx)))
        arrays[f"c_{c:g}"] = emb
    stage = run.stage()
    name = umap_name(cfg.layer, cfg.head)
    # token text of every embedded point, in qk.head()'s order (sentences, then positions): the hover view
    flat = [t for ids in sample.token_ids for t in ids]
    text = lm.tokenizer.convert_ids_to_tokens(flat) if lm.tokenizer is not None else [str(t) for t in flat]
    text = np.array(text, dtype=np.str_)
    with atomic_path(stage / f"{name}.npz") as tmp:
        np.savez_compressed(tmp, constants=np.array(shown), n_queries=len(q_idx), query_tokens=text[q_idx],
                            key_tokens=text[k_idx], **arrays)
    from attnlab.figures.scaling import umap_grid

    opt_text = f"{optimum:g}" if math.isfinite(optimum) else "none"
    umap_grid(panels, optimum if math.isfinite(optimum) else None,
              f"{model_label(cfg.model)} layer {cfg.layer} head {cfg.head}: queries and keys, joint UMAP (cosine)\n"
              f"queries x c, keys / c{' + t' if translate else ''}; optimal c by {METRIC_TITLES[cfg.metric]} "
              f"(protocol {cfg.protocol}) = {opt_text}{qk_note(lm, short=True)}", stage / f"{name}.png")
    return run.commit(key, config, [f"{name}.png", f"{name}.npz"], identity, model=lm.meta, qk=qk_note(lm),
                      optimum=optimum if math.isfinite(optimum) else None,
                      shown_constants=shown, n_queries=len(q_idx), n_keys=len(k_idx),
                      timings={"total_s": round(time.perf_counter() - t0, 3)})


# ---------------------------------------------------------------- CLI


def parse_constants(text: str) -> tuple:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"constants must be comma-separated numbers, got {text!r}") from None
    return values  # validated by the config (GeometryConfig / UMAPConfig)


def _common(p) -> None:
    p.add_argument("--model", default="gpt2", help="Hub id or local folder (default: gpt2, as in the paper)")
    p.add_argument("--revision", default=None)
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="a .jsonl/.jsonl.gz with a 'text' field, a folder of .txt files, or "
                        f"hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] (default: {DEFAULT_CORPUS})")
    p.add_argument("--sentences", type=positive_int, default=100, help="number of sentences (default: 100)")
    p.add_argument("--protocol", default="text", choices=GEOMETRY_PROTOCOLS,
                   help="text (default): our reading of the paper's words; notebook: the paper's notebook "
                        "computation, quirks included (README)")
    p.add_argument("--constants", default=",".join(f"{c:g}" for c in PAPER_CONSTANTS),
                   help="scaling constants c > 0, comma-separated (default: the paper's)")
    p.add_argument("--min-tokens", type=int, default=8, help="shortest usable sentence in tokens (default: 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="longest usable sentence in tokens (default: 64)")
    p.add_argument("--no-translate", action="store_true", help="do not translate keys onto the query centroid")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    add_runtime_args(p)


def add_parser(sub) -> None:
    g = sub.add_parser("geometry", help="query/key geometry: optimal scaling constants, UMAP embeddings",
                       description=__doc__.split("``scaling`` outputs")[0])
    gsub = g.add_subparsers(dest="geometry_command", metavar="SUBCOMMAND")
    s = gsub.add_parser("scaling", help="three metrics x constants for every head; Figure 2 heatmaps")
    _common(s)
    s.add_argument("--no-continuous", action="store_true", help="skip the continuous (log c) optimum search")
    s.add_argument("--bootstrap", type=int, default=20,
                   help="sentence resamples for the stability of each optimum (default: 20; 0 skips)")
    s.set_defaults(func=_run_scaling)
    u = gsub.add_parser("umap", help="joint UMAP embeddings of one head's queries and keys (Figures 3-4)")
    _common(u)
    u.add_argument("--layer", type=int, required=True, help="layer, 0-based")
    u.add_argument("--head", type=int, required=True, help="head, 0-based")
    u.add_argument("--umap-constants", default=",".join(f"{c:g}" for c in UMAP_CONSTANTS),
                   help="constants shown, one panel each (default: %(default)s)")
    u.add_argument("--metric", default="weighted_corr", choices=METRICS, help="whose optimum is framed")
    u.add_argument("--max-points", type=positive_int, default=1500, help="queries (and keys) embedded at most")
    u.set_defaults(func=_run_umap)
    g.set_defaults(func=lambda args: (g.print_help(), 2)[1])


def _base_kwargs(args) -> dict:
    return dict(model=args.model, corpus=args.corpus, sentences=args.sentences,
                constants=parse_constants(args.constants), seed=args.seed, min_tokens=args.min_tokens,
                max_tokens=args.max_tokens, translate_keys=not args.no_translate, revision=args.revision,
                dtype=args.dtype, protocol=args.protocol)


def _run_scaling(args) -> int:
    cfg = GeometryConfig(**_base_kwargs(args), continuous=not args.no_continuous, bootstrap=args.bootstrap)
    meta = run_scaling(cfg, args.out, device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
                       reuse=not args.force)
    print_wrote(meta, args.out)
    for metric, n in meta["heads_missing"].items():
        if n:
            print(f"note: {n} heads have no {metric} optimum (no value at any constant, or an exact tie; "
                  "optima.csv says which - more sentences help)")
    return 0


def _run_umap(args) -> int:
    cfg = UMAPConfig(**_base_kwargs(args), layer=args.layer, head=args.head,
                     umap_constants=parse_constants(args.umap_constants), metric=args.metric,
                     max_points=args.max_points)
    meta = run_umap(cfg, args.out, device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
                    reuse=not args.force)
    opt = meta["optimum"]
    print_wrote(meta, args.out, f" (optimal c = {opt:g})" if opt is not None else " (no optimum: see optima)")
    return 0
