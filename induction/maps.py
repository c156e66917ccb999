"""Induction maps (the paper's Figures 7-9): build a variant's trials and their null, score them, save the data.

The record is :data:`attnlab.induction.experiment.INDUCTION`; its figures are drawn by
:mod:`attnlab.figures.induction` from what :func:`save` and :func:`summary` leave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnlab.core.outputs import atomic_path, write_csv
from attnlab.core.resources import check_fits
from attnlab.induction.experiment import CAUSAL_NOTE, PROTOCOL_NOTES, InductionConfig
from attnlab.induction.protocols import make_protocol, token_spec_for
from attnlab.induction.scores import InductionScores, TargetStats, induction_scores, target_stats, top_heads, verdict
from attnlab.induction.variants import RRTBatch, build_batch, build_null, check_length, get_variant

VIEW_TRIALS = 3  # trials whose full query attention rows are kept for the interactive view
SCORES_HEADER = ["model", "variant", "protocol", "target", "layer", "head", "mean", "sem", "ci_low", "ci_high",
                 "chance", "null_mean", "lift", "top_trial_share", "named", "n_trials", "share_r0"]


@dataclass
class InductionResult:
    """What :func:`compute` found: the trials it built, their null, the scores, and the statistics of each
    target (:class:`~attnlab.induction.scores.TargetStats`)."""

    config: InductionConfig
    batch: RRTBatch
    null_ids: "np.ndarray"
    scores: InductionScores
    stats: dict[str, TargetStats]
    seq_len: int  # n, the random block's length
    sequence_tokens: int  # tokens per sequence, special tokens included
    causal: bool
    tokens: dict  # what the view needs: the first trials' tokens and the masked token's text
    timings: dict

    @property
    def share_r0(self) -> float | None:
        quirk = self.batch.quirk
        return None if quirk is None else float(quirk.float().mean())


def check_trials_fit(trials: int, seq: int, n_layers: int, n_heads: int, n_targets: int) -> None:
    """Token ids (a few copies, trials and null) and the per-target scores must fit in memory."""
    per_trial = seq * 8 * 8 + n_layers * n_heads * n_targets * 4 * 4
    check_fits(trials * per_trial, f"{trials} trials of {seq} tokens", per_trial, "trials")


def _view_tokens(lm, batch, n: int) -> dict:
    ids = batch.input_ids[:n]
    if lm.tokenizer is not None:
        tokens = [lm.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
        masked = lm.tokenizer.convert_ids_to_tokens(batch.masked_token[:n].tolist())
    else:
        tokens = [[str(i) for i in row.tolist()] for row in ids]
        masked = [str(i) for i in batch.masked_token[:n].tolist()]
    return {"view_tokens": tokens, "view_masked": masked}


def compute(cfg: InductionConfig, lm, ctx=None, *, keep_rows: int = VIEW_TRIALS) -> InductionResult:
    """Build the variant's trials and their null for ``lm`` and score them (nothing is written)."""
    variant = get_variant(cfg.variant)
    variant.check_model(lm)
    protocol = make_protocol(cfg.protocol, token_spec_for(lm))
    n = variant.n_for(cfg.protocol, cfg.seq_len)
    seq = check_length(variant, protocol, n, lm.max_positions)  # before anything big is built
    check_trials_fit(cfg.trials, seq, lm.n_layers, lm.n_heads, len(variant.targets))
    batch = build_batch(variant, protocol, cfg.trials, n, cfg.seed, max_positions=lm.max_positions)
    null_ids = build_null(variant, protocol, batch, n, cfg.seed)
    t1 = time.perf_counter()
    scores = induction_scores(lm, batch, null_ids=null_ids, batch_size=getattr(ctx, "batch_size", None),
                              progress=getattr(ctx, "progress", False), keep_rows=keep_rows)
    stats = {t: target_stats(scores.per_trial[t].numpy(), scores.null_per_trial[t].numpy(), scores.chance.numpy(),
                             cfg.seed) for t in scores.per_trial}
    kept = 0 if scores.rows is None else scores.rows.shape[0]
    return InductionResult(cfg, batch, null_ids, scores, stats, n, seq, lm.is_causal, _view_tokens(lm, batch, kept),
                           {"extract_s": round(time.perf_counter() - t1, 3)})


def _g(x) -> str:
    return "" if not np.isfinite(x) else f"{float(x):.8g}"


def score_rows(result: InductionResult):
    cfg = result.config
    share = "" if result.share_r0 is None else f"{result.share_r0:.6g}"
    for target, st in result.stats.items():
        named = st.named(cfg.min_lift)
        for layer in range(st.mean.shape[0]):
            for head in range(st.mean.shape[1]):
                lh = (layer, head)
                yield [cfg.model, cfg.variant, cfg.protocol, target, layer, head, _g(st.mean[lh]), _g(st.sem[lh]),
                       _g(st.ci_low[lh]), _g(st.ci_high[lh]), _g(st.chance), _g(st.null[lh]), _g(st.lift[lh]),
                       _g(st.top_trial_share[lh]), int(named[lh]), result.scores.n_trials, share]


def save(folder: Path, result: InductionResult, ctx=None) -> list[str]:
    """scores.csv and trials.npz of ``result`` into ``folder``."""
    batch, scores = result.batch, result.scores
    write_csv(folder / "scores.csv", SCORES_HEADER, score_rows(result))
    arrays = {"input_ids": batch.input_ids.numpy(), "null_input_ids": result.null_ids.numpy(),
              "mask_index": batch.mask_index.numpy(), "chance": scores.chance.numpy()}
    if batch.quirk is not None:
        arrays["quirk"] = batch.quirk.numpy()
    for target, pos in batch.targets.items():
        arrays[f"target_index_{target}"] = pos.numpy()
        arrays[f"attention_{target}"] = scores.per_trial[target].numpy()
        arrays[f"null_attention_{target}"] = scores.null_per_trial[target].numpy()
    if scores.rows is not None:
        arrays["view_rows"] = scores.rows.numpy().astype(np.float16)
        arrays["view_tokens"] = np.array(result.tokens["view_tokens"], dtype=np.str_)
        arrays["view_masked"] = np.array(result.tokens["view_masked"], dtype=np.str_)
    with atomic_path(folder / "trials.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return ["scores.csv", "trials.npz"]


def _rounded(x) -> list:
    """[L, H] array -> nested lists with 6 significant digits (NaN -> None), for meta.json."""
    return [[None if not np.isfinite(v) else float(f"{v:.6g}") for v in row] for row in np.asarray(x).tolist()]


def summary(result: InductionResult, ctx=None) -> dict:
    """meta.json's account of the run: the maps (mean, SEM, null, lift), the verdict and the top heads per target."""
    cfg = result.config
    note = CAUSAL_NOTE if result.causal else PROTOCOL_NOTES.get(cfg.protocol, cfg.protocol)
    maps, verdicts, tops = {}, {}, {}
    for target, st in result.stats.items():
        maps[target] = {"mean": _rounded(st.mean), "sem": _rounded(st.sem), "null": _rounded(st.null),
                        "lift": _rounded(st.lift), "chance": float(f"{st.chance:.6g}")}
        verdicts[target] = verdict(st, cfg.min_lift)
        tops[target] = top_heads(st, st.named(cfg.min_lift))
    return {"seq_len": result.seq_len, "sequence_tokens": result.sequence_tokens, "protocol_note": note,
            "causal": result.causal, "share_r0": result.share_r0, "n_trials": result.scores.n_trials,
            "maps": maps, "verdict": verdicts, "top_heads": tops, "timings": dict(result.timings)}
