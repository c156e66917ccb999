"""``attnlab heads``: weight-based, pattern-based and causal scores of every head, and the figure that ties them.

heads.csv (layer, head, score, value), one row per head and score:
    ov_copying                 sum(eig)/sum(|eig|) of the full OV circuit (circuits/scores.py)
    <detector>                 chance-corrected attention-pattern detectors on clean RRT sequences X X with one
                               [MASK]: previous_token, next_token, self, duplicate_token, induction (prefix
                               matching), suffix_matching, cls, sep, mask (score minus uniform attention's)
    dla                        direct logit attribution to the masked token at the [MASK] of the rrt task
                               (masked LMs only; circuits/attribution.py)
    ablation_copying_gain      change of the rrt copying gain when the head alone is zeroed (masked LMs, with
                               ablation on; circuits/tasks.py)
composition.csv (layer1, head1, layer2, head2, kind, score, baseline, corrected): Q/K/V composition of every
earlier head with every later head, random-matrix baseline subtracted.
heads.png: one layers x heads map per score. story.png (after Olsson et al.): per head, prefix matching (x)
against OV copying (y), coloured by the ablation delta (else DLA).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from attnlab.circuits.scores import DETECTORS, composition_scores, detector_scores, ov_copying_scores
from attnlab.core.errors import InputError
from attnlab.core.extractor import extract_attention
from attnlab.core.models import model_label, resolve_model
from attnlab.core.outputs import begin_run, write_csv
from attnlab.core.weights import head_weights
from attnlab.experiments.common_args import add_output_args, add_runtime_args, positive_int, print_wrote
from attnlab.induction.protocols import make_protocol, token_spec_for
from attnlab.induction.variants import build_batch, get_variant


@dataclass
class HeadsConfig:
    model: str = "bert-base-uncased"
    trials: int = 16  # rrt trials for DLA and the ablation scan
    detector_trials: int = 4  # sequences whose full attention maps feed the detectors
    seq_len: int = 50
    ablation: bool = True
    seed: int = 0
    revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.trials < 2 or self.detector_trials < 1 or self.seq_len < 3:
            raise InputError("heads needs trials >= 2, detector_trials >= 1 and seq_len >= 3")


@dataclass
class HeadsResult:
    """``scores``: {name: [L, H] numpy} for every head; ``composition``: (layer1, head1, layer2, head2, kind,
    score, baseline, corrected) rows; ``notes``: what was skipped and why."""

    scores: dict
    composition: list
    notes: list


def compute_heads(cfg: HeadsConfig, lm, progress: bool = False) -> HeadsResult:
    """Weight-based, pattern-based and (BERT-style masked LMs) causal scores of every head; nothing is written."""
    w = head_weights(lm, device="cpu")
    emb = lm.base.get_input_embeddings().weight.detach().float().cpu()
    scores = {"ov_copying": ov_copying_scores(w.W_V, w.W_O, emb).numpy()}
    protocol = make_protocol("clean", token_spec_for(lm))
    batch = build_batch(get_variant("standard"), protocol, cfg.detector_trials, cfg.seq_len, cfg.seed,
                        max_positions=lm.max_positions)
    att = extract_attention(lm, batch.input_ids).attention  # [B, S, L, H, S]: every query row
    spec = protocol.spec
    detected = detector_scores(att, batch.input_ids, {"cls": spec.cls_id, "sep": spec.sep_id, "mask": spec.mask_id})
    for name in DETECTORS:
        scores[name] = detected[name][2].numpy()
    notes = []
    has_head = lm.has_lm_head and lm.lm_head() is not None
    bert_style = lm.arch.bert_layers is not None  # DLA and the scan follow a post-LN BERT-style (masked LM) encoder
    if has_head and bert_style:
        from attnlab.circuits.attribution import direct_logit_attribution
        from attnlab.circuits.tasks import rrt_metrics, rrt_task, scan_rrt

        task = rrt_task(lm, cfg.trials, cfg.seq_len, cfg.seed)
        scores["dla"] = direct_logit_attribution(lm, task.ids_second, task.pos_second, task.token).mean(0).numpy()
        if cfg.ablation:
            base = rrt_metrics(lm, task)["copying_gain"]
            scanned = scan_rrt(lm, task, progress=progress)
            delta = np.zeros((lm.n_layers, lm.n_heads))
            for (layer, head), m in scanned.items():
                delta[layer, head] = float((m["copying_gain"] - base).mean())
            scores["ablation_copying_gain"] = delta
    elif not has_head:
        notes.append("no masked-LM head: dla and ablation_copying_gain need one and were skipped")
    else:
        notes.append(f"dla and ablation_copying_gain follow a BERT-style masked-LM encoder layer by layer; "
                     f"{lm.model_type} is not one, so they were skipped (the weight and pattern scores are complete)")
    return HeadsResult(scores, composition_scores(w), notes)


def run_heads(cfg: HeadsConfig, out_dir, *, lm=None, device="auto", reuse=True, progress=False) -> dict:
    run, config, key, identity, meta = begin_run(out_dir, "heads", cfg, lm, reuse)
    if meta:
        return meta
    t0 = time.perf_counter()
    if lm is None:
        from attnlab.core.models import load_model
        from attnlab.core.errors import MissingHeadError

        try:  # the causal scores need the MLM head; the weight and pattern scores do not
            lm = load_model(cfg.model, masked_lm=True, device=device, dtype=cfg.dtype, revision=cfg.revision)
        except MissingHeadError:
            lm = load_model(cfg.model, device=device, dtype=cfg.dtype, revision=cfg.revision)
    lm = resolve_model(lm, cfg, device)
    identity["model"] = lm.fingerprint
    result = compute_heads(cfg, lm, progress)
    stage = run.stage()
    rows = [[layer, head, name, f"{values[layer, head]:.6g}"] for name, values in result.scores.items()
            for layer in range(lm.n_layers) for head in range(lm.n_heads)]
    write_csv(stage / "heads.csv", ["layer", "head", "score", "value"], rows)
    write_csv(stage / "composition.csv", ["layer1", "head1", "layer2", "head2", "kind", "score", "baseline", "corrected"],
              ([*r[:5], f"{r[5]:.6g}", f"{r[6]:.6g}", f"{r[7]:.6g}"] for r in result.composition))
    from attnlab.figures.heads import score_maps, story_figure

    label = model_label(cfg.model)
    score_maps(result.scores, f"Head scores: {label}", stage / "heads.png")
    story_figure(result.scores, f"{label}: does an induction-like head also copy, and is it used?",
                 stage / "story.png")
    top = {name: _top(values) for name, values in result.scores.items()}
    comp = sorted(result.composition, key=lambda r: -r[7])[:10]
    return run.commit(key, config, ["heads.csv", "composition.csv", "heads.png", "story.png"], identity,
                      model=lm.meta, notes=result.notes, top_heads=top,
                      top_composition=[{"from": f"L{r[0]}H{r[1]}", "to": f"L{r[2]}H{r[3]}", "kind": r[4],
                                        "corrected": round(r[7], 4)} for r in comp],
                      timings={"total_s": round(time.perf_counter() - t0, 3)})


def _top(values, k: int = 5) -> list:
    flat = np.nan_to_num(values, nan=-np.inf).ravel()
    order = np.argsort(flat)[::-1][:k]
    return [[int(i // values.shape[1]), int(i % values.shape[1]), float(values.ravel()[i])] for i in order]


def add_parser(sub) -> None:
    p = sub.add_parser("heads", help="weight, pattern and causal scores of every head (heads.csv, story.png)",
                       description=__doc__.split("composition.csv")[0])
    p.add_argument("--model", default="bert-base-uncased")
    p.add_argument("--revision", default=None)
    p.add_argument("--trials", type=positive_int, default=16, help="rrt trials for DLA and the ablation scan")
    p.add_argument("--seq-len", type=positive_int, default=50)
    p.add_argument("--no-ablation", action="store_true", help="skip the per-head ablation scan")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = HeadsConfig(model=args.model, trials=args.trials, seq_len=args.seq_len, ablation=not args.no_ablation,
                      seed=args.seed, revision=args.revision, dtype=args.dtype)
    meta = run_heads(cfg, args.out, device=args.device, reuse=not args.force, progress=not args.no_progress)
    print_wrote(meta, args.out)
    for note in meta.get("notes") or []:
        print(f"note: {note}")
    return 0
