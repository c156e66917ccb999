"""Query/key geometry (the paper's Figures 2-4): ``attnlab geometry scaling`` and ``attnlab geometry umap``.

Scaling convention: queries are multiplied by c, keys divided by c and translated so that their centroid
sits on the queries' (see ``geometry/scaling.py``). Layers and heads are 0-based everywhere.

``scaling`` outputs: scaling.csv (layer, head, metric, constant, value, n_under_threshold, optimum,
continuous_optimum, status), optima.csv (one row per head and metric), figure2_<metric>.png (three
layers x heads maps of the optimal c), meta.json.
``umap`` outputs: umap_L<l>H<h>.png (a grid of joint UMAP embeddings, one panel per constant, the optimal
one framed), umap_L<l>H<h>.npz (the embeddings), meta.json.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attnlab.core.corpus import DEFAULT_CORPUS, load_corpus
from attnlab.core.errors import InputError
from attnlab.core.models import load_model
from attnlab.core.outputs import atomic_path, finished, write_json, write_meta, write_text
from attnlab.experiments.common_args import add_runtime_args
from attnlab.geometry.qk import check_head, collect_qk, sample_sentences
from attnlab.geometry.scaling import (
    METRIC_TITLES, METRICS, PAPER_CONSTANTS, check_constants, continuous_optimum, scaling_metrics, transform_qk,
)

UMAP_CONSTANTS = (0.2, 0.4, 1.0, 1.25, 2.5, 5.0)
HF_DOC_LIMIT = 2000  # streamed datasets: documents to read before sampling sentences


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
    continuous: bool = True  # also search the optimum of c on a continuous log scale
    revision: str | None = None
    dtype: str = "float32"


@dataclass
class UMAPConfig(GeometryConfig):
    layer: int = 0
    head: int = 0
    umap_constants: tuple = UMAP_CONSTANTS
    metric: str = "weighted_corr"  # which metric's optimum is framed
    max_points: int = 1500  # per kind (queries, keys), sampled with the seed
    n_neighbors: int = 15
    min_dist: float = 0.1


def _collect(cfg: GeometryConfig, lm, docs, batch_size, progress):
    if docs is None:
        docs = load_corpus(cfg.corpus, limit=HF_DOC_LIMIT if cfg.corpus.startswith("hf:") else None)
    sample = sample_sentences(lm.tokenizer, docs, cfg.sentences, cfg.seed, cfg.min_tokens, cfg.max_tokens)
    return sample, collect_qk(lm, sample.token_ids, batch_size=batch_size, progress=progress)


def _load(cfg, lm, device):
    if lm is None:
        lm = load_model(cfg.model, device=device, dtype=cfg.dtype, revision=cfg.revision)
    return lm


def _per_head(metrics, continuous, n_heads):
    """(metric, head index g, layer, head, grid optimum, continuous optimum) for every metric and head."""
    for metric in METRICS:
        best = metrics.best(metric)
        for g in range(best.shape[0]):
            cont = continuous[metric][g].item() if continuous else float("nan")
            yield (metric, g, *divmod(g, n_heads), best[g].item(), cont)


def scaling_csv(metrics, continuous, n_heads) -> str:
    out = io.StringIO()
    out.write("layer,head,metric,constant,value,n_under_threshold,optimum,continuous_optimum,status\n")
    for metric, g, layer, head, best, cont in _per_head(metrics, continuous, n_heads):
        counts = metrics.n_under if metric == "weighted_corr" else metrics.pooled_counts
        for ci, c in enumerate(metrics.constants.tolist()):
            value = metrics.values[metric][g, ci].item()
            n_under = "" if metric == "norm_ratio" else counts[g, ci].item()
            status = "ok" if math.isfinite(value) else "too few pairs under threshold"
            out.write(f"{layer},{head},{metric},{c:g},{value:.8g},{n_under},{best:.6g},{cont:.6g},{status}\n")
    return out.getvalue()


def optima_csv(metrics, continuous, n_heads) -> str:
    out = io.StringIO()
    out.write("layer,head,metric,optimum,continuous_optimum\n")
    for metric, _, layer, head, best, cont in _per_head(metrics, continuous, n_heads):
        out.write(f"{layer},{head},{metric},{best:.6g},{cont:.6g}\n")
    return out.getvalue()


def run_scaling(cfg: GeometryConfig, out_dir, *, lm=None, docs=None, device="auto", batch_size=None,
                progress=False, reuse=True) -> dict:
    """Figure 2: the three metrics for every head and constant, the optimum per head, three heatmaps."""
    out_dir = Path(out_dir)
    constants = check_constants(cfg.constants)
    config = asdict(cfg)
    if reuse and (meta := finished(out_dir, config)):
        return meta
    t0 = time.perf_counter()
    lm = _load(cfg, lm, device)
    sample, qk = _collect(cfg, lm, docs, batch_size, progress)
    t1 = time.perf_counter()
    metrics = scaling_metrics(qk.queries, qk.keys, qk.lengths, constants, causal=qk.causal,
                              translate=cfg.translate_keys)
    t2 = time.perf_counter()
    continuous = (continuous_optimum(qk.queries, qk.keys, qk.lengths, causal=qk.causal,
                                     translate=cfg.translate_keys) if cfg.continuous else None)
    t3 = time.perf_counter()

    n_layers, n_heads = qk.n_layers, qk.n_heads
    write_text(out_dir / "scaling.csv", scaling_csv(metrics, continuous, n_heads))
    write_text(out_dir / "optima.csv", optima_csv(metrics, continuous, n_heads))
    outputs = ["scaling.csv", "optima.csv", "sentences.json"]
    write_json(out_dir / "sentences.json", {"texts": sample.texts, "candidates": sample.candidates})
    from attnlab.experiments.induction import model_label
    from attnlab.figures.scaling import optimum_heatmap

    missing = {}
    for metric in METRICS:
        best = metrics.best(metric).reshape(n_layers, n_heads)
        missing[metric] = int(torch.isnan(best).sum())
        name = f"figure2_{metric}.png"
        optimum_heatmap(best.numpy(), constants.tolist(),
                        f"Optimal scaling constant: {METRIC_TITLES[metric]}\n{model_label(cfg.model)}, "
                        f"{cfg.sentences} sentences, {metrics.n_pairs} query-key pairs per head", out_dir / name)
        outputs.append(name)
    return write_meta(out_dir, config, outputs, model=lm.meta, n_pairs=metrics.n_pairs,
                      heads_missing=missing,
                      timings={"collect_s": round(t1 - t0, 3), "metrics_s": round(t2 - t1, 3),
                               "continuous_s": round(t3 - t2, 3), "total_s": round(time.perf_counter() - t0, 3)})


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
             reuse=True) -> dict:
    """Figures 3-4: joint UMAP embeddings of one head's queries and keys at several constants."""
    from attnlab.geometry.embedding import joint_embedding, subsample

    out_dir = Path(out_dir)
    constants = check_constants(cfg.constants)
    check_constants(cfg.umap_constants)
    if cfg.metric not in METRICS:
        raise InputError(f"unknown metric {cfg.metric!r}; use one of {', '.join(METRICS)}")
    if cfg.max_points < 10:
        raise InputError(f"--max-points must be at least 10, got {cfg.max_points}")
    config = asdict(cfg)
    if reuse and (meta := finished(out_dir, config)):
        return meta
    t0 = time.perf_counter()
    lm = _load(cfg, lm, device)
    check_head(cfg.layer, cfg.head, lm.n_layers, lm.n_heads)  # before the forward pass
    sample, qk = _collect(cfg, lm, docs, batch_size, progress)
    # the optimum to frame; the scaled metric pools all heads, the others need only this one
    if cfg.metric == "scaled_weighted_corr":
        q_sel, k_sel, g = qk.queries, qk.keys, cfg.layer * qk.n_heads + cfg.head
    else:
        sl = (slice(None), slice(None), slice(cfg.layer, cfg.layer + 1), slice(cfg.head, cfg.head + 1))
        q_sel, k_sel, g = qk.queries[sl], qk.keys[sl], 0
    metrics = scaling_metrics(q_sel, k_sel, qk.lengths, constants, causal=qk.causal, translate=cfg.translate_keys)
    optimum = metrics.best(cfg.metric)[g].item()
    shown = displayed_constants(cfg.umap_constants, optimum)

    queries, keys = qk.head(cfg.layer, cfg.head)
    q_idx = subsample(len(queries), cfg.max_points, cfg.seed)
    k_idx = subsample(len(keys), cfg.max_points, cfg.seed + 1)
    # the translation uses the centroids of ALL tokens (as the metrics do), not only the plotted ones
    panels, arrays = [], {}
    iterator = shown
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(shown, desc="umap", unit="constant")
    for c in iterator:
        q_c, k_c = transform_qk(queries.double(), keys.double(), c, translate=cfg.translate_keys)
        emb = joint_embedding(q_c[q_idx].numpy(), k_c[k_idx].numpy(), seed=cfg.seed, n_neighbors=cfg.n_neighbors,
                              min_dist=cfg.min_dist)
        panels.append((c, emb, len(q_idx)))
        arrays[f"c_{c:g}"] = emb
    name = umap_name(cfg.layer, cfg.head)
    with atomic_path(out_dir / f"{name}.npz") as tmp:
        np.savez_compressed(tmp, constants=np.array(shown), n_queries=len(q_idx), **arrays)
    from attnlab.experiments.induction import model_label
    from attnlab.figures.scaling import umap_grid

    opt_text = f"{optimum:g}" if math.isfinite(optimum) else "none (too few pairs under threshold)"
    umap_grid(panels, optimum if math.isfinite(optimum) else None,
              f"{model_label(cfg.model)} layer {cfg.layer} head {cfg.head}: queries and keys, joint UMAP (cosine)\n"
              f"queries x c, keys / c + t; optimal c by {METRIC_TITLES[cfg.metric]} = {opt_text}",
              out_dir / f"{name}.png")
    return write_meta(out_dir, config, [f"{name}.png", f"{name}.npz"], model=lm.meta, optimum=optimum,
                      shown_constants=shown, n_queries=len(q_idx), n_keys=len(k_idx),
                      timings={"total_s": round(time.perf_counter() - t0, 3)})


# ---------------------------------------------------------------- CLI


def parse_constants(text: str) -> tuple:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise InputError(f"constants must be comma-separated numbers, got {text!r}") from exc
    check_constants(values)
    return values


def _common(p) -> None:
    p.add_argument("--model", default="gpt2", help="Hub id or local folder (default: gpt2, as in the paper)")
    p.add_argument("--revision", default=None)
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="a .jsonl/.jsonl.gz with a 'text' field, a folder of .txt files, or "
                        f"hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] (default: {DEFAULT_CORPUS})")
    p.add_argument("--sentences", type=int, default=100, help="number of sentences (default: 100)")
    p.add_argument("--constants", default=",".join(f"{c:g}" for c in PAPER_CONSTANTS),
                   help="scaling constants c > 0, comma-separated (default: the paper's)")
    p.add_argument("--min-tokens", type=int, default=8, help="shortest usable sentence in tokens (default: 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="longest usable sentence in tokens (default: 64)")
    p.add_argument("--no-translate", action="store_true", help="do not translate keys onto the query centroid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_runtime_args(p)


def add_parser(sub) -> None:
    g = sub.add_parser("geometry", help="query/key geometry: optimal scaling constants, UMAP embeddings",
                       description=__doc__.split("``scaling`` outputs")[0])
    gsub = g.add_subparsers(dest="geometry_command", metavar="SUBCOMMAND")
    s = gsub.add_parser("scaling", help="three metrics x constants for every head; Figure 2 heatmaps")
    _common(s)
    s.add_argument("--no-continuous", action="store_true", help="skip the continuous (log c) optimum search")
    s.set_defaults(func=_run_scaling)
    u = gsub.add_parser("umap", help="joint UMAP embeddings of one head's queries and keys (Figures 3-4)")
    _common(u)
    u.add_argument("--layer", type=int, required=True, help="layer, 0-based")
    u.add_argument("--head", type=int, required=True, help="head, 0-based")
    u.add_argument("--umap-constants", default=",".join(f"{c:g}" for c in UMAP_CONSTANTS),
                   help="constants shown, one panel each (default: %(default)s)")
    u.add_argument("--metric", default="weighted_corr", choices=METRICS, help="whose optimum is framed")
    u.add_argument("--max-points", type=int, default=1500, help="queries (and keys) embedded at most")
    u.set_defaults(func=_run_umap)
    g.set_defaults(func=lambda args: (g.print_help(), 2)[1])


def _base_kwargs(args) -> dict:
    return dict(model=args.model, corpus=args.corpus, sentences=args.sentences,
                constants=parse_constants(args.constants), seed=args.seed, min_tokens=args.min_tokens,
                max_tokens=args.max_tokens, translate_keys=not args.no_translate, revision=args.revision,
                dtype=args.dtype)


def _run_scaling(args) -> int:
    cfg = GeometryConfig(**_base_kwargs(args), continuous=not args.no_continuous)
    meta = run_scaling(cfg, args.out, device=args.device, batch_size=args.batch_size, progress=not args.no_progress)
    state = "reused finished run in" if meta.get("reused") else "wrote"
    print(f"{state} {args.out}: " + ", ".join(meta["outputs"]))
    for metric, n in meta["heads_missing"].items():
        if n:
            print(f"note: {n} heads have no {metric} optimum (too few query-key pairs under the threshold; "
                  "use more --sentences)")
    return 0


def _run_umap(args) -> int:
    cfg = UMAPConfig(**_base_kwargs(args), layer=args.layer, head=args.head,
                     umap_constants=parse_constants(args.umap_constants), metric=args.metric,
                     max_points=args.max_points)
    meta = run_umap(cfg, args.out, device=args.device, batch_size=args.batch_size, progress=not args.no_progress)
    state = "reused finished run in" if meta.get("reused") else "wrote"
    print(f"{state} {args.out}: " + ", ".join(meta["outputs"]) + f" (optimal c = {meta['optimum']:g})")
    return 0
