"""``attnlab ablate``: does the model *use* a head? Ablate it and measure a task.

Tasks: ``rrt`` (masked LMs; see ``circuits/tasks.py``): the in-context copying gain (cross-entropy of a token
masked in the first copy minus in the second), the second copy's cross-entropy and top-1 accuracy;
``icl``: the ICL score (masked-token protocol: loss with 50 tokens of context minus with 500).
Modes: ``zero``, or ``mean`` (each head's mean output over a reference batch: fresh RRT trials with another
seed for rrt, the 500-token contexts for icl).

Outputs: ablation.csv (layer, head, mode, task, metric, baseline, ablated, delta, ci_low, ci_high; the CI is
a paired bootstrap over trials of ablated - baseline), with ``--scan`` one row per head and metric plus
ablation_<metric>.png (layers x heads map of the delta), meta.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.circuits.ablation import MODES, ablate, parse_heads
from attnlab.circuits.tasks import RRT_METRICS, rrt_metrics, rrt_task, scan_rrt
from attnlab.core.corpus import DEFAULT_CORPUS, load_corpus
from attnlab.core.errors import InputError
from attnlab.core.models import model_label, resolve_model
from attnlab.core.outputs import begin_run, write_csv
from attnlab.core.provenance import corpus_fingerprint
from attnlab.experiments.common_args import add_output_args, add_runtime_args, positive_int, print_wrote

TASKS = ("rrt", "icl")
HEADER = ["layer", "head", "mode", "task", "metric", "baseline", "ablated", "delta", "ci_low", "ci_high"]


@dataclass
class AblationConfig:
    model: str = "bert-base-uncased"
    heads: str = ""  # "L9H0,L10H9"; empty with scan=True
    scan: bool = False
    mode: str = "zero"
    task: str = "rrt"
    trials: int = 50
    seq_len: int = 200  # rrt: length n of the random block
    corpus: str = DEFAULT_CORPUS  # icl
    seed: int = 0
    revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if self.mode not in MODES[:2]:
            raise InputError(f"mode {self.mode!r} is not available here; use zero or mean (resample: the Python API)")
        if self.scan == bool(self.heads.strip()):
            raise InputError("give either heads (e.g. L9H0,L10H9) or scan, not both and not neither")
        if self.scan and self.task != "rrt":
            raise InputError("scan runs the rrt task (its prefix reuse needs one fixed batch); use task rrt")
        if self.trials < 2:
            raise InputError(f"trials must be at least 2 (a confidence interval needs two), got {self.trials}")


def paired_ci(diff: np.ndarray, seed: int, n_boot: int = 5000) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean of paired differences (seeded)."""
    rng = np.random.default_rng(seed + 1)
    means = diff[rng.integers(len(diff), size=(n_boot, len(diff)))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def _rows(layer, head, cfg, base: dict, ablated: dict):
    for metric in base:
        b, a = base[metric].numpy(), ablated[metric].numpy()
        lo, hi = paired_ci(a - b, cfg.seed)
        yield [layer, head, cfg.mode, cfg.task, metric, f"{b.mean():.6g}", f"{a.mean():.6g}",
               f"{(a - b).mean():.6g}", f"{lo:.6g}", f"{hi:.6g}"]


def _icl_metric(lm, docs, cfg) -> dict:
    from attnlab.icl import icl_trials

    _, short, long = icl_trials(lm, docs, "masked-token", cfg.trials, cfg.seed)
    return {"icl_score": torch.as_tensor(short - long)}


@dataclass
class AblationResult:
    """``rows``: ablation.csv's rows (one per head or head set and metric: base, ablated, effect, 95% CI);
    ``delta``: {metric: [L, H] mean effect} for a scan, else None."""

    rows: list
    delta: dict | None


def compute_ablation(cfg: AblationConfig, lm, docs=None, progress=False) -> AblationResult:
    """The configured ablation's effects on its task (nothing is written)."""
    if cfg.task == "rrt":
        task = rrt_task(lm, cfg.trials, cfg.seq_len, cfg.seed)
        reference = rrt_task(lm, cfg.trials, cfg.seq_len, cfg.seed + 1000).ids_second if cfg.mode == "mean" else None
        base = rrt_metrics(lm, task)
        if cfg.scan:
            scanned = scan_rrt(lm, task, mode=cfg.mode, reference=reference, progress=progress)
            rows, delta = [], {m: np.full((lm.n_layers, lm.n_heads), np.nan) for m in RRT_METRICS}
            for (layer, head), metrics in scanned.items():
                rows += list(_rows(layer, head, cfg, base, metrics))
                for m in RRT_METRICS:
                    delta[m][layer, head] = float((metrics[m] - base[m]).mean())
            return AblationResult(rows, delta)
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
    return AblationResult(list(_rows(layers, hs, cfg, base, ablated)), None)


def run_ablation(cfg: AblationConfig, out_dir, *, lm=None, docs=None, device="auto", reuse=True, progress=False) -> dict:
    run, config, key, identity, meta = begin_run(out_dir, "ablate", cfg, lm, reuse,
                                                 corpus=corpus_fingerprint(cfg.corpus, docs) if cfg.task == "icl" else "-")
    if meta:
        return meta
    t0 = time.perf_counter()
    lm = resolve_model(lm, cfg, device, masked_lm=True)
    identity["model"] = lm.fingerprint
    if not cfg.scan:
        parse_heads(cfg.heads, lm.n_layers, lm.n_heads)  # before any forward pass
    if cfg.task == "icl" and docs is None:
        docs = load_corpus(cfg.corpus)
    result = compute_ablation(cfg, lm, docs, progress)
    stage = run.stage()
    write_csv(stage / "ablation.csv", HEADER, result.rows)
    outputs = ["ablation.csv"]
    if result.delta is not None:
        from attnlab.figures.heatmap import head_heatmap

        for metric, delta in result.delta.items():
            extent = float(np.nanmax(np.abs(delta))) or 1e-9
            name = f"ablation_{metric}.png"
            head_heatmap(delta, f"{model_label(cfg.model)}: change in {metric.replace('_', ' ')} when each head is "
                         f"{'zeroed' if cfg.mode == 'zero' else 'mean-ablated'} alone\nrrt task, {cfg.trials} trials "
                         "(red: the metric rises, blue: it falls)", stage / name, cmap="RdBu_r", vmin=-extent,
                         vmax=extent, cbar_label=f"delta {metric}", annot=True)
            outputs.append(name)
    return run.commit(key, config, outputs, identity, model=lm.meta,
                      effects=None if cfg.scan else [dict(zip(HEADER, row)) for row in result.rows],
                      timings={"total_s": round(time.perf_counter() - t0, 3)})


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="ablate heads (or scan every head) and measure a task",
                       description=__doc__.split("Outputs:")[0])
    p.add_argument("--model", default="bert-base-uncased", help="masked LM: Hub id or folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--heads", default="", help="heads to ablate together, e.g. L9H0,L10H9")
    p.add_argument("--scan", action="store_true", help="ablate every head alone (task rrt)")
    p.add_argument("--mode", default="zero", choices=MODES[:2])
    p.add_argument("--task", default="rrt", choices=TASKS)
    p.add_argument("--trials", type=positive_int, default=50)
    p.add_argument("--seq-len", type=positive_int, default=200, help="rrt: length n of the random block")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="icl: the corpus (as for `attnlab icl`)")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = AblationConfig(model=args.model, heads=args.heads, scan=args.scan, mode=args.mode, task=args.task,
                         trials=args.trials, seq_len=args.seq_len, corpus=args.corpus, seed=args.seed,
                         revision=args.revision, dtype=args.dtype)
    meta = run_ablation(cfg, args.out, device=args.device, reuse=not args.force, progress=not args.no_progress)
    print_wrote(meta, args.out)
    for row in meta.get("effects") or []:
        print(f"  {row['metric']}: {row['baseline']} -> {row['ablated']} (delta {row['delta']}, 95% CI "
              f"{row['ci_low']} .. {row['ci_high']})")
    return 0
