"""The ``heads`` experiment's science: weight-based, pattern-based and causal scores of every head.

Record: :data:`attnlab.circuits.experiment.HEADS`; figures: :func:`attnlab.figures.heads.plot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from attnlab.circuits.experiment import HeadsConfig
from attnlab.circuits.scores import DETECTORS, composition_scores, detector_scores, ov_copying_scores
from attnlab.core.errors import InputError
from attnlab.core.extractor import extract_attention
from attnlab.core.outputs import csv_cell, write_csv
from attnlab.core.resources import check_fits
from attnlab.core.weights import head_weights, token_embedding, unembedding
from attnlab.induction.protocols import make_protocol, token_spec_for
from attnlab.induction.variants import build_batch, get_variant

PATHS_HEADER = ["receiver", "sender", "path", "clean", "patched", "lost", "ci_low", "ci_high", "top_trial_share",
                "layer_lost", "restored", "restored_ci_low", "restored_ci_high", "restored_top_trial_share", "named_by",
                "named"]
COMPOSITION_HEADER = ["layer1", "head1", "layer2", "head2", "kind", "score", "baseline", "baseline_se", "corrected"]


@dataclass
class HeadsResult:
    """``scores``: {name: [L, H] numpy} for every head; ``composition``: (layer1, head1, layer2, head2, kind,
    score, baseline, corrected) rows and ``baseline``: {kind: {mean, se, samples, median_corrected}};
    ``chance``: each detector's uniform-attention level (a number, or one per layer where the layers see different
    keys: sliding-window layers); ``sources``: which embedding and unembedding the OV
    scores used; ``notes``: what was skipped and why; ``paths``: path patching rows
    (:meth:`attnlab.circuits.paths.PathResult.table`), empty when no receiver was traced."""

    scores: dict
    composition: list
    baseline: dict
    chance: dict
    sources: dict
    notes: list
    paths: list = field(default_factory=list)


    def _repr_html_(self) -> str:
        """Jupyter: every score as a layers x heads map, with its chance level."""
        from attnlab.core.notebook import block, heat_table

        parts = [heat_table(np.asarray(v, dtype=float), name, ".3f",
                            note=f"uniform attention gives {_chance_text(self.chance[name])}" if name in self.chance
                            else "")
                 for name, v in self.scores.items()]
        return block("attnlab heads", *parts)

def _specials(protocol) -> dict:
    spec = protocol.spec
    return {"cls": spec.cls_id, "sep": spec.sep_id, "mask": None if protocol.causal else protocol.mask_id}


def pattern_scores(lm, trials: int, n: int, seed: int, names: list[str], end_sep: bool = True) -> dict:
    """The detectors ``names`` (:func:`~attnlab.circuits.scores.detector_scores`: ``{name: (raw, chance, corrected
    [L, H])}``) on every query row of ``trials`` clean RRT sequences X X, |X| = ``n`` (masked LMs: without the
    final [SEP] when not ``end_sep``)."""
    protocol = make_protocol("clean", token_spec_for(lm), end_sep)
    batch = build_batch(get_variant("standard"), protocol, trials, n, seed, max_positions=lm.max_positions)
    rows = extract_attention(lm, batch.input_ids)  # attention [B, S, L, H, S]: every query row
    return detector_scores(rows.attention, batch.input_ids, _specials(protocol), causal=lm.is_causal, names=names,
                           visible=rows.visible)


def check(cfg: HeadsConfig, lm, ctx=None) -> None:
    """Before anything is built: the sequences fit the model, and the detectors' full attention maps fit in memory."""
    from attnlab.induction.variants import check_length

    protocol = make_protocol("clean", token_spec_for(lm), cfg.end_sep)
    s = check_length(get_variant("standard"), protocol, cfg.seq_len, lm.max_positions)
    per_seq = s * s * lm.n_layers * lm.n_heads * 4 * 2
    check_fits(cfg.detector_trials * per_seq, f"full attention maps of {cfg.detector_trials} sequences of {s} tokens",
               per_seq, "detector_trials")


def compute(cfg: HeadsConfig, lm, ctx=None) -> HeadsResult:
    """Weight-based, pattern-based and (BERT-style masked LMs) causal scores of every head; nothing is written."""
    notes = []
    w = head_weights(lm, device="cpu")
    scores, sources = {}, {}
    w_e, sources["embedding"] = token_embedding(lm)
    w_u, sources["unembedding"] = unembedding(lm)
    if w_u is not None:
        scores["ov_copying"] = ov_copying_scores(w.W_V, w.W_O, w_e.float().cpu(), w_u.float().cpu()).numpy()
    else:
        notes.append(f"ov_copying needs the model's unembedding: {sources['unembedding']} (load a checkpoint with "
                     "its LM head)")
    protocol = make_protocol("clean", token_spec_for(lm), cfg.end_sep)
    variant = get_variant("standard")
    specials = _specials(protocol)
    check(cfg, lm)
    detected = pattern_scores(lm, cfg.detector_trials, cfg.seq_len, cfg.seed,
                              [d for d in DETECTORS if d != "induction_at_mask"], cfg.end_sep)
    # the [MASK] detector's and path patching's own, larger set of trials, one query row each
    task_batch = build_batch(variant, protocol, cfg.trials, cfg.seq_len, cfg.seed, max_positions=lm.max_positions)
    if not lm.is_causal:  # induction at the [MASK]
        q = task_batch.mask_index[:, None]
        rows = extract_attention(lm, task_batch.input_ids, None, q)  # attention [T, 1, L, H, S]
        detected.update(detector_scores(rows.attention, task_batch.input_ids, specials, causal=False,
                                        query_positions=q, visible=rows.visible,
                                        names=["induction_at_mask"]))
    chance = {}
    for name in DETECTORS:
        if name in detected and torch.isfinite(detected[name][1]).any():
            scores[name] = detected[name][2].numpy()
            chance[name] = layer_chance(detected[name][1])
    has_head = lm.has_lm_head and lm.lm_head() is not None
    bert_style = lm.arch.bert_layers is not None  # DLA follows a post-LN BERT-style (masked LM) encoder
    if has_head:
        from attnlab.circuits.tasks import rrt_metrics, rrt_task, scan_rrt

        # masked LMs: one masked token; decoders: X X
        task = rrt_task(lm, cfg.trials, cfg.seq_len, cfg.seed, cfg.end_sep)
        if bert_style and not lm.is_causal:
            from attnlab.circuits.attribution import direct_logit_attribution

            scores["dla"] = direct_logit_attribution(lm, task.ids_second, task.pos_second, task.token).mean(0).numpy()
        else:
            notes.append(f"dla follows a BERT-style masked-LM encoder layer by layer; {lm.model_type} is not one, so "
                         "it was skipped")
        if cfg.ablation:  # each head zeroed alone (decoders and other encoders: one forward pass per head)
            base = rrt_metrics(lm, task)["copying_gain"]
            scanned = scan_rrt(lm, task, progress=getattr(ctx, "progress", False))
            delta = np.zeros((lm.n_layers, lm.n_heads))
            for (layer, head), m in scanned.items():
                delta[layer, head] = float((m["copying_gain"] - base).mean())
            scores["ablation_copying_gain"] = delta
    else:
        notes.append("no LM head: dla and ablation_copying_gain need one and were skipped")
    for name, values in scores.items():
        # a layer that never sees a detector's template (a sliding window narrower than a duplicate's distance) has
        # no score there: NaN by design, and only there
        blind = [c is None for c in chance[name]] if isinstance(chance.get(name), list) else [False] * len(values)
        if not np.isfinite(values[~np.array(blind)]).all():
            raise InputError(f"model '{lm.name}' gave non-finite {name} scores; its weights may hold NaN or inf")
    rows, baseline = composition_scores(w, seed=cfg.seed)
    paths = _paths(cfg, lm, scores, task_batch, notes) if cfg.paths else []
    return HeadsResult(scores, rows, baseline, chance, sources, notes, paths)


#: an induction-like head whose paths are traced scores at least this much over chance on its detector
MIN_RECEIVER = 0.1


def _paths(cfg: HeadsConfig, lm, scores: dict, batch, notes: list) -> list[dict]:
    """Path patching (:mod:`attnlab.circuits.paths`) into the ``cfg.paths`` strongest induction-like heads, on the
    RRT trials ``batch``."""
    from attnlab.circuits.paths import FEEDER_RULE, induction_paths_input, trace_paths

    detector = "prefix_matching" if lm.is_causal else "induction_at_mask"
    if detector not in scores:
        notes.append(f"paths: the {detector} detector gave no score, so no key or query path was traced")
        return []
    values = np.array(scores[detector], dtype=float)
    values[0] = -np.inf  # a first-layer head has no earlier head to be fed by
    order = [int(i) for i in np.argsort(-values, axis=None, kind="stable")[:cfg.paths]]
    receivers = [divmod(i, lm.n_heads) for i in order if values.ravel()[i] >= MIN_RECEIVER]
    if not receivers:
        notes.append(f"paths: no head past layer 0 has a {detector} score of {MIN_RECEIVER} over chance, so no key or "
                     "query path was traced")
        return []
    result = trace_paths(lm, *induction_paths_input(batch, lm.is_causal), receivers)
    rows = result.table(cfg.seed)
    notes.append(f"paths: receivers {', '.join(f'L{a}H{b}' for a, b in receivers)} (the strongest by {detector}); "
                 f"{FEEDER_RULE}")
    return rows


def save(folder, result: HeadsResult, ctx=None) -> list[str]:
    """heads.csv (layer, head, score, value; an empty value where the head's layer never sees the detector's
    template) and composition.csv of ``result`` into ``folder``."""
    layers, heads = next(iter(result.scores.values())).shape
    # empty where a layer never sees the detector's template (csv_cell: an empty field for NaN)
    rows = [[layer, head, name, csv_cell(float(values[layer, head]))] for name, values in result.scores.items()
            for layer in range(layers) for head in range(heads)]
    write_csv(folder / "heads.csv", ["layer", "head", "score", "value"], rows)
    se = {kind: b["se"] for kind, b in result.baseline.items()}
    write_csv(folder / "composition.csv", COMPOSITION_HEADER,
              ([*r[:5], f"{r[5]:.6g}", f"{r[6]:.6g}", f"{se[r[4]]:.3g}", f"{r[7]:.6g}"] for r in result.composition))
    if not result.paths:
        return ["heads.csv", "composition.csv"]
    write_csv(folder / "paths.csv", PATHS_HEADER, ([csv_cell(r[c]) for c in PATHS_HEADER] for r in result.paths))
    return ["heads.csv", "composition.csv", "paths.csv"]


def _top(values, k: int = 5) -> list:
    flat = np.nan_to_num(values, nan=-np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    return [[int(i // values.shape[1]), int(i % values.shape[1]), float(values.ravel()[i])] for i in order]


def layer_chance(chance) -> float | list:
    """A detector's chance ``[L]`` as one number where every layer sees the same keys, else one per layer (None
    where a layer never sees the template: a sliding window narrower than its distance)."""
    values = [float(c) for c in np.asarray(chance, dtype=np.float64)]
    finite = [c for c in values if np.isfinite(c)]
    if len(finite) == len(values) and max(finite) - min(finite) <= 1e-12:
        return finite[0]
    return [c if np.isfinite(c) else None for c in values]


def _chance_text(chance) -> str:
    if not isinstance(chance, list):
        return f"{chance:.3g}"
    return "per layer " + ", ".join("-" if c is None else f"{c:.3g}" for c in chance)


def _rounded(chance):
    return [None if c is None else float(f"{c:.6g}") for c in chance] if isinstance(chance, list) else \
        float(f"{chance:.6g}")


def summary(result: HeadsResult, ctx=None) -> dict:
    comp = sorted(result.composition, key=lambda r: -r[7])[:10]
    return {"notes": result.notes, "top_heads": {name: _top(v) for name, v in result.scores.items()},
            "chance": {name: _rounded(c) for name, c in result.chance.items()},
            "ov_sources": result.sources,
            "composition_baseline": {k: {key: (float(f"{v:.6g}") if isinstance(v, float) else v)
                                         for key, v in b.items()} for k, b in result.baseline.items()},
            "top_composition": [{"from": f"L{r[0]}H{r[1]}", "to": f"L{r[2]}H{r[3]}", "kind": r[4],
                                 "corrected": round(r[7], 4)} for r in comp],
            "feeders": feeders(result.paths)}


def feeders(rows: list[dict]) -> dict:
    """``{receiver: {path: {"named": [senders], "strongest": row, "most_sufficient": row}}}`` from path patching rows:
    the named senders, those the receiver needs (most lost first) before those that back each other up (most
    restored first); the row that loses most when ablated, and the one that restores most alone in its layer."""
    def rounded(row):
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}

    def key(name):
        return lambda r: -np.nan_to_num(r[name], nan=-np.inf)

    out: dict = {}
    for row in rows:
        out.setdefault(row["receiver"], {}).setdefault(row["path"], []).append(row)
    for receiver, paths in out.items():
        for path, mine in paths.items():
            necessary = [r["sender"] for r in sorted(mine, key=key("lost")) if "necessary" in r["named_by"]]
            sufficient = [r["sender"] for r in sorted(mine, key=key("restored"))
                          if r["named"] and r["sender"] not in necessary]
            paths[path] = {"named": necessary + sufficient, "strongest": rounded(min(mine, key=key("lost"))),
                           "most_sufficient": rounded(min(mine, key=key("restored")))}
    return out
