"""The ``ablate`` experiment's science: a task's metrics with chosen heads ablated (or each head alone).

Record: :data:`attnlab.circuits.experiment.ABLATE`; figures: :func:`attnlab.figures.heads.plot_ablation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab.circuits.ablation import ablate, parse_heads
from attnlab.circuits.experiment import AblationConfig
from attnlab.circuits.tasks import RRT_METRICS, rrt_metrics, rrt_task, scan_rrt
from attnlab.core.outputs import write_csv
from attnlab.core.stats import bootstrap_ci

HEADER = ["layer", "head", "mode", "task", "metric", "baseline", "ablated", "delta", "ci_low", "ci_high"]


@dataclass
class AblationResult:
    """``rows``: ablation.csv's rows (one per head or head set and metric: base, ablated, effect, 95% CI);
    ``delta``: {metric: [L, H] mean effect} for a scan, else None."""

    config: AblationConfig
    rows: list
    delta: dict | None


def _rows(layer, head, cfg, base: dict, ablated: dict):
    for metric in base:
        b, a = base[metric].numpy(), ablated[metric].numpy()
        lo, hi = bootstrap_ci(a - b, cfg.seed, n_boot=5000)
        yield [layer, head, cfg.mode, cfg.task, metric, f"{b.mean():.6g}", f"{a.mean():.6g}",
               f"{(a - b).mean():.6g}", f"{lo:.6g}", f"{hi:.6g}"]


def _icl_metric(lm, docs, cfg) -> dict:
    from attnlab.icl import icl_trials

    _, short, long = icl_trials(lm, docs, "masked-token", cfg.trials, cfg.seed)
    return {"icl_score": torch.as_tensor(short - long)}


def check(cfg: AblationConfig, lm, ctx) -> None:
    if not cfg.scan:
        parse_heads(cfg.heads, lm.n_layers, lm.n_heads)  # before any forward pass


def compute(cfg: AblationConfig, lm, ctx=None) -> AblationResult:
    """The configured ablation's effects on its task (nothing is written)."""
    docs = getattr(ctx, "docs", None)
    progress = getattr(ctx, "progress", False)
    if cfg.task == "rrt":
        task = rrt_task(lm, cfg.trials, cfg.seq_len, cfg.seed, cfg.end_sep)
        reference = (rrt_task(lm, cfg.trials, cfg.seq_len, cfg.seed + 1000, cfg.end_sep).ids_second
                     if cfg.mode == "mean" else None)
        base = rrt_metrics(lm, task)
        if cfg.scan:
            scanned = scan_rrt(lm, task, mode=cfg.mode, reference=reference, progress=progress)
            rows, delta = [], {m: np.full((lm.n_layers, lm.n_heads), np.nan) for m in RRT_METRICS}
            for (layer, head), metrics in scanned.items():
                rows += list(_rows(layer, head, cfg, base, metrics))
                for m in RRT_METRICS:
                    delta[m][layer, head] = float((metrics[m] - base[m]).mean())
            return AblationResult(cfg, rows, delta)
        with ablate(lm, cfg.heads, mode=cfg.mode, reference=reference):
            ablated = rrt_metrics(lm, task)
    else:
        base = _icl_metric(lm, docs, cfg)
        reference = None
        if cfg.mode == "mean":
            from attnlab.icl import LONG, draw_trials, tokenize_lengths

            enc = tokenize_lengths(lm.tokenizer, docs)
            reference = torch.tensor([enc[t.doc_index][:LONG] for t in draw_trials(enc, "masked-token", 8, cfg.seed + 1000)])
        with ablate(lm, cfg.heads, mode=cfg.mode, reference=reference):
            ablated = _icl_metric(lm, docs, cfg)
    heads = parse_heads(cfg.heads, lm.n_layers, lm.n_heads)
    layers, hs = ";".join(str(layer) for layer, _ in heads), ";".join(str(h) for _, h in heads)
    return AblationResult(cfg, list(_rows(layers, hs, cfg, base, ablated)), None)


def save(folder, result: AblationResult, ctx=None) -> list[str]:
    write_csv(folder / "ablation.csv", HEADER, result.rows)
    return ["ablation.csv"]


def summary(result: AblationResult, ctx=None) -> dict:
    if not result.config.scan:
        return {"effects": [dict(zip(HEADER, row)) for row in result.rows]}
    largest = {}
    for metric, delta in result.delta.items():
        flat = np.nan_to_num(np.abs(delta), nan=-1).ravel()
        order = np.argsort(-flat, kind="stable")[:5]
        largest[metric] = [{"head": f"L{g // delta.shape[1]}H{g % delta.shape[1]}",
                            "delta": float(f"{delta.ravel()[g]:.6g}")} for g in order]
    return {"effects": None, "largest_effects": largest}
