"""The geometry experiments' science (Figures 2-4): collect queries and keys of corpus sentences, the three
metrics per head and constant with their optima and stability, and the joint UMAP of one head.

Records: :data:`attnlab.geometry.experiment.SCALING` and ``UMAP``; figures: :mod:`attnlab.figures.scaling`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.errors import InputError
from attnlab.core.models import model_identity
from attnlab.core.outputs import atomic_path, write_csv, write_json
from attnlab.core.provenance import digest
from attnlab.geometry.experiment import METRICS, GeometryConfig, UMAPConfig
from attnlab.geometry.qk import check_head, collect_qk, sample_sentences
from attnlab.geometry.scaling import scaling_metrics, transform_qk
from attnlab.geometry.stability import ResampledMetrics, bootstrap_stability

HF_DOC_LIMIT = 2000  # streamed datasets: documents to read before sampling sentences
UNSTABLE = 0.5  # cells whose optimum fewer than half of the resamples agree on are hatched in Figure 2


# ---------------------------------------------------------------- shared q/k collection


class GeometryCache:
    """What several geometry runs on the same model and sentences share within one process (``reproduce``):
    one q/k collection per (model, corpus, sentence settings), one metrics computation per protocol/constants."""

    def __init__(self):
        self.samples: dict = {}
        self.metrics: dict = {}

    def find_metrics(self, data_key: str, cfg, continuous: bool):
        """Metrics computed for these data and settings, or None; a result with the continuous search also
        serves a request without it."""
        base = (data_key, cfg.protocol, cfg.constants, cfg.translate_keys)
        return self.metrics.get((*base, continuous)) or (None if continuous else self.metrics.get((*base, True)))


def data_key(cfg: GeometryConfig, lm) -> str:
    return digest([model_identity(cfg.model, cfg.revision, lm), cfg.corpus, cfg.sentences, cfg.seed,
                   cfg.min_tokens, cfg.max_tokens, cfg.dtype])


def collect(cfg: GeometryConfig, lm, key: str, docs, batch_size, progress, cache: GeometryCache | None):
    """(sentences, queries and keys) for ``key`` (:func:`data_key`), collected once per cache."""
    if cache is not None and key in cache.samples:
        return cache.samples[key]
    if cfg.max_tokens > lm.max_positions:
        raise InputError(f"max_tokens {cfg.max_tokens} exceeds the model's {lm.max_positions} positions; lower "
                         f"max_tokens to at most {lm.max_positions}")
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


def cached_metrics(qk, cfg, cache, key, continuous):
    if cache is not None and (hit := cache.find_metrics(key, cfg, continuous)) is not None:
        return hit
    metrics = compute_metrics(qk, cfg, continuous=continuous)
    if cache is not None:
        cache.metrics[(key, cfg.protocol, cfg.constants, cfg.translate_keys, continuous)] = metrics
    return metrics


def qk_note(lm, short: bool = False) -> str:
    """What the queries and keys are: on rotary families the post-rotary vectors the model dots."""
    if lm.arch.positions != "rotary":
        return "" if short else "queries and keys as the model computed them (absolute positions)"
    if short:
        return "; post-rotary q/k (what the model dots)"
    return ("post-rotary queries and keys: the vectors the model actually dots, position rotation included "
            f"({lm.model_type} uses rotary position embeddings)")


# ---------------------------------------------------------------- scaling (Figure 2)


@dataclass
class ScalingResult:
    """The metrics of every head and constant, the optima's stability over sentence resamples (or None), and
    the sentences they came from."""

    metrics: object  # ScalingMetrics / NotebookMetrics
    stability: dict | None
    sample: object  # SentenceSample
    n_layers: int
    n_heads: int
    qk: str
    qk_short: str
    timings: dict


    def _repr_html_(self) -> str:
        """Jupyter: every metric's optimal constant c per head (queries x c, keys / c)."""
        from attnlab.core.notebook import block, heat_table, paragraph
        from attnlab.geometry.experiment import METRICS

        parts = [paragraph(f"{len(self.sample.texts)} sentences; {self.qk}; optimal c per head, queries x c and "
                           "keys / c ('-': no optimum).")]
        for metric in METRICS:
            best = self.metrics.best(metric).reshape(self.n_layers, self.n_heads).numpy()
            parts.append(heat_table(best, f"optimal c by {metric}", ".3g"))
        return block("attnlab geometry scaling", *parts)

def compute_scaling(cfg: GeometryConfig, lm, ctx) -> ScalingResult:
    t0 = time.perf_counter()
    key = data_key(cfg, lm)
    sample, qk = collect(cfg, lm, key, ctx.docs, ctx.batch_size, ctx.progress, ctx.cache)
    t1 = time.perf_counter()
    continuous = cfg.continuous and cfg.protocol == "text"
    metrics = cached_metrics(qk, cfg, ctx.cache, key, continuous)
    t2 = time.perf_counter()
    reported = {m: metrics.best(m) for m in METRICS}
    stability = None
    if cfg.bootstrap:  # the text protocol recomputes a resample from its smallest distances (stability.py)
        resampled = (ResampledMetrics(qk.queries, qk.keys, qk.lengths, cfg.constants, causal=qk.causal,
                                      translate=cfg.translate_keys) if cfg.protocol == "text"
                     else (lambda idx: compute_metrics(qk, cfg, index=idx)))
        stability = bootstrap_stability(resampled, len(qk.lengths), reported, resamples=cfg.bootstrap, seed=cfg.seed)
    t3 = time.perf_counter()
    return ScalingResult(metrics, stability, sample, qk.n_layers, qk.n_heads, qk_note(lm), qk_note(lm, short=True),
                         {"collect_s": round(t1 - t0, 3), "metrics_s": round(t2 - t1, 3),
                          "stability_s": round(t3 - t2, 3)})


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


def save_scaling(folder, result: ScalingResult, ctx=None) -> list[str]:
    write_csv(folder / "scaling.csv", SCALING_HEADER, scaling_rows(result.metrics, result.stability, result.n_heads))
    write_csv(folder / "optima.csv", OPTIMA_HEADER, optima_rows(result.metrics, result.stability, result.n_heads))
    write_json(folder / "sentences.json", {"texts": result.sample.texts, "candidates": result.sample.candidates})
    return ["scaling.csv", "optima.csv", "sentences.json"]


def summary_scaling(result: ScalingResult, ctx=None) -> dict:
    metrics = result.metrics
    missing = {m: int(torch.isnan(metrics.best(m)).sum()) for m in METRICS}
    return {"n_pairs": metrics.n_pairs, "qk": result.qk, "qk_short": result.qk_short, "heads_missing": missing,
            "layers": result.n_layers, "heads": result.n_heads, "unstable_below": UNSTABLE,
            "optima": optima_summary(metrics, result.stability, result.n_heads), "timings": dict(result.timings)}


# ---------------------------------------------------------------- UMAP (Figures 3-4)


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


@dataclass
class UMAPResult:
    """One embedding ``[n_q + n_k, 2]`` per shown constant, the optimum that frames one, and each point's token."""

    layer: int
    head: int
    optimum: float
    shown: list[float]
    embeddings: dict  # "c_<c>" -> [n_q + n_k, 2]
    n_queries: int
    n_keys: int
    query_tokens: np.ndarray
    key_tokens: np.ndarray
    qk: str
    qk_short: str
    timings: dict


    def _repr_html_(self) -> str:
        """Jupyter: the framed (optimal) panel, queries green and keys orange."""
        import matplotlib.pyplot as plt

        from attnlab.core.notebook import block, figure_png

        c = min(self.shown, key=lambda x: abs(np.log(x / self.optimum))) if self.optimum and self.optimum > 0 \
            else self.shown[len(self.shown) // 2]
        emb = self.embeddings[f"c_{c:g}"]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(emb[self.n_queries:, 0], emb[self.n_queries:, 1], s=3, c="#d95f02", alpha=0.6, label="keys")
        ax.scatter(emb[:self.n_queries, 0], emb[:self.n_queries, 1], s=3, c="#1b9e77", alpha=0.6, label="queries")
        ax.set_xticks([]), ax.set_yticks([]), ax.legend(fontsize=8, markerscale=3)
        ax.set_title(f"L{self.layer}H{self.head}, c = {c:g}", fontsize=10)
        return block("attnlab geometry umap", figure_png(fig))

def check_umap(cfg: UMAPConfig, lm, ctx) -> None:
    check_head(cfg.layer, cfg.head, lm.n_layers, lm.n_heads)  # before the forward pass


def umap_subsample(cfg: UMAPConfig, qk):
    """The plotted queries and keys of the head: indices into ``qk.head(layer, head)``'s rows (seeded)."""
    from attnlab.geometry.embedding import subsample

    queries, keys = qk.head(cfg.layer, cfg.head)
    return subsample(len(queries), cfg.max_points, cfg.seed), subsample(len(keys), cfg.max_points, cfg.seed + 1)


def umap_panels(cfg: UMAPConfig, qk, shown):
    """Yield ``(c, queries [n_q, d], keys [n_k, d])`` float64 numpy per displayed constant: the plotted points,
    scaled and translated. The translation uses the centroids of ALL tokens (as the metrics do)."""
    queries, keys = qk.head(cfg.layer, cfg.head)
    q_idx, k_idx = umap_subsample(cfg, qk)
    translate = cfg.translate_keys and cfg.protocol == "text"
    for c in shown:
        q_c, k_c = transform_qk(queries.double(), keys.double(), c, translate=translate)
        yield c, q_c[q_idx].numpy(), k_c[k_idx].numpy()


def compute_umap(cfg: UMAPConfig, lm, ctx) -> UMAPResult:
    """Joint UMAP embeddings of one head's queries and keys at several constants. With a ``ctx.cache`` shared
    with the scaling run, the q/k collection and the optimum are taken from it."""
    from attnlab.geometry.embedding import panel_embeddings

    t0 = time.perf_counter()
    cache = ctx.cache
    key = data_key(cfg, lm)
    sample, qk = collect(cfg, lm, key, ctx.docs, ctx.batch_size, ctx.progress, cache)
    t1 = time.perf_counter()
    g = cfg.layer * qk.n_heads + cfg.head
    if ((cache is not None and cache.find_metrics(key, cfg, False) is not None) or cfg.metric == "scaled_weighted_corr"
            or cfg.protocol == "notebook"):
        optimum = cached_metrics(qk, cfg, cache, key, False).best(cfg.metric)[g].item()
    else:  # only this head is needed: its metric does not pool over heads
        sl = (slice(None), slice(None), slice(cfg.layer, cfg.layer + 1), slice(cfg.head, cfg.head + 1))
        optimum = scaling_metrics(qk.queries[sl], qk.keys[sl], qk.lengths, cfg.constants, causal=qk.causal,
                                  translate=cfg.translate_keys).best(cfg.metric)[0].item()
    shown = displayed_constants(cfg.umap_constants, optimum)
    t2 = time.perf_counter()
    panels = list(umap_panels(cfg, qk, shown))
    if ctx.progress:
        print(f"umap L{cfg.layer}H{cfg.head}: {len(shown)} constants, {len(panels[0][1]) + len(panels[0][2])} points "
              "each", file=sys.stderr, flush=True)
    layouts = panel_embeddings([(q, k) for _, q, k in panels], seed=cfg.seed, n_neighbors=cfg.n_neighbors,
                               min_dist=cfg.min_dist)
    embeddings = {f"c_{c:g}": layout for c, layout in zip(shown, layouts)}
    q_idx, k_idx = umap_subsample(cfg, qk)
    timings = {"collect_s": round(t1 - t0, 3), "optimum_s": round(t2 - t1, 3),
               "umap_s": round(time.perf_counter() - t2, 3)}
    # token text of every embedded point, in qk.head()'s order (sentences, then positions): the hover view
    flat = [t for ids in sample.token_ids for t in ids]
    text = lm.tokenizer.convert_ids_to_tokens(flat) if lm.tokenizer is not None else [str(t) for t in flat]
    text = np.array(text, dtype=np.str_)
    return UMAPResult(cfg.layer, cfg.head, optimum, shown, embeddings, len(q_idx), len(k_idx), text[q_idx], text[k_idx], qk_note(lm),
                      qk_note(lm, short=True), timings)


def save_umap(folder, result: UMAPResult, ctx=None) -> list[str]:
    name = f"{umap_name(result.layer, result.head)}.npz"
    with atomic_path(folder / name) as tmp:
        np.savez_compressed(tmp, constants=np.array(result.shown), n_queries=result.n_queries,
                            query_tokens=result.query_tokens, key_tokens=result.key_tokens, **result.embeddings)
    return [name]


def summary_umap(result: UMAPResult, ctx=None) -> dict:
    optimum = result.optimum if math.isfinite(result.optimum) else None
    return {"qk": result.qk, "qk_short": result.qk_short, "optimum": optimum, "shown_constants": result.shown,
            "n_queries": result.n_queries, "n_keys": result.n_keys, "timings": dict(result.timings)}
