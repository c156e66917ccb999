"""Induction maps (the paper's Figures 7-9): build a variant's trials and their null, score them, save the data.

The record is :data:`attnlab.induction.experiment.INDUCTION`; its figures are drawn by
:mod:`attnlab.figures.induction` from what :func:`save` and :func:`summary` leave.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attnlab.core.outputs import atomic_path, write_csv
from attnlab.core.resources import check_fits
from attnlab.induction.experiment import InductionConfig, protocol_note
from attnlab.induction.protocols import make_protocol, token_spec_for
from attnlab.induction.scores import InductionScores, TargetStats, induction_scores, target_stats, top_heads, verdict
from attnlab.induction.variants import RRTBatch, build_batch, build_null, check_length, get_variant

VIEW_TRIALS = 6  # trials whose full query attention rows are kept for the interactive view (plus, per head,
# the trial that contributes most)
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

    def _repr_html_(self) -> str:
        """Jupyter: each target's verdict and layers x heads map of mean attention (named heads framed)."""
        from attnlab.core.notebook import block, heat_table, paragraph
        from attnlab.induction.experiment import query_words, target_words
        from attnlab.induction.scores import VERDICT_RULE, verdict, verdict_line

        cfg = self.config
        from attnlab.core.names import model_label

        parts = [paragraph(f"{model_label(cfg.model)}: {cfg.variant} RRT, n = {self.seq_len}, {self.scores.n_trials} trials; "
                           f"attention from {query_words(self.causal)} to each target.")]
        for target, st in self.stats.items():
            v = verdict(st, cfg.min_lift)
            named = [tuple(int(x) for x in name[1:].split("H")) for name in v["heads"]]  # "L9H0" -> (9, 0)
            parts.append(heat_table(st.mean, f"{target}: {target_words(target, self.causal)}", ".3f", named,
                                    f"{verdict_line(target, v)}; chance {st.chance:.3g}"))
        parts.append(paragraph("Framed: the heads the verdict names (" + VERDICT_RULE.format(min_lift=cfg.min_lift) + ")."))
        return block("attnlab induction", *parts)


def check_trials_fit(trials: int, seq: int, n_layers: int, n_heads: int, n_targets: int) -> None:
    """Token ids (a few copies, trials and null) and the per-target scores must fit in memory."""
    per_trial = seq * 8 * 8 + n_layers * n_heads * n_targets * 4 * 4
    check_fits(trials * per_trial, f"{trials} trials of {seq} tokens", per_trial, "trials")


def _view_tokens(lm, batch, n: int, top: dict | None = None) -> dict:
    """The text the view shows: the first ``n`` trials' tokens, and every token of those trials and of the trials
    that contribute most to a head (``top``) as a small vocabulary (``view_vocab_ids`` -> ``view_vocab_tokens``)."""
    def text(ids):
        return lm.tokenizer.convert_ids_to_tokens(ids) if lm.tokenizer is not None else [str(i) for i in ids]

    ids = batch.input_ids[:n]
    tokens = [text(row.tolist()) for row in ids]
    masked = text(batch.masked_token[:n].tolist())
    trials = set(range(n)) | {int(t) for which, _ in (top or {}).values() for t in which.flatten().tolist()}
    chosen = sorted(trials)
    used = sorted(set(batch.input_ids[chosen].flatten().tolist()) | set(batch.masked_token[chosen].tolist()))
    return {"view_tokens": tokens, "view_masked": masked, "view_vocab_ids": used, "view_vocab_tokens": text(used)}


def compute(cfg: InductionConfig, lm, ctx=None, *, keep_rows: int = VIEW_TRIALS) -> InductionResult:
    """Build the variant's trials and their null for ``lm`` and score them (nothing is written)."""
    variant = get_variant(cfg.variant)
    variant.check_model(lm)
    protocol = make_protocol(cfg.protocol, token_spec_for(lm), cfg.end_sep)
    n = variant.n_for(cfg.protocol, cfg.seq_len)
    seq = check_length(variant, protocol, n, lm.max_positions)  # before anything big is built
    check_trials_fit(cfg.trials, seq, lm.n_layers, lm.n_heads, len(variant.targets))
    batch = build_batch(variant, protocol, cfg.trials, n, cfg.seed, max_positions=lm.max_positions)
    null_ids = build_null(variant, protocol, batch, n, cfg.seed)
    t1 = time.perf_counter()
    scores = induction_scores(lm, batch, null_ids=null_ids, batch_size=getattr(ctx, "batch_size", None),
                              progress=getattr(ctx, "progress", False), keep_rows=keep_rows)
    stats = {t: target_stats(scores.per_trial[t].numpy(), scores.null_per_trial[t].numpy(), scores.chance.numpy(),
                             cfg.seed, scores.layer_chance[t].numpy()) for t in scores.per_trial}
    kept = 0 if scores.rows is None else scores.rows.shape[0]
    return InductionResult(cfg, batch, null_ids, scores, stats, n, seq, lm.is_causal,
                           _view_tokens(lm, batch, kept, scores.top),
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
                       _g(st.ci_low[lh]), _g(st.ci_high[lh]), _g(st.layer_chance[layer]), _g(st.null[lh]),
                       _g(st.lift[lh]), _g(st.top_trial_share[lh]), int(named[lh]), result.scores.n_trials, share]


def save(folder: Path, result: InductionResult, ctx=None) -> list[str]:
    """scores.csv and trials.npz of ``result`` into ``folder``."""
    batch, scores = result.batch, result.scores
    write_csv(folder / "scores.csv", SCORES_HEADER, score_rows(result))
    arrays = {"input_ids": batch.input_ids.numpy(), "null_input_ids": result.null_ids.numpy(),
              "mask_index": batch.mask_index.numpy(), "masked_token": batch.masked_token.numpy(),
              "chance": scores.chance.numpy()}
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
        arrays["view_vocab_ids"] = np.array(result.tokens["view_vocab_ids"], dtype=np.int64)
        arrays["view_vocab_tokens"] = np.array(result.tokens["view_vocab_tokens"], dtype=np.str_)
    for target, (which, row) in (scores.top or {}).items():  # per head: the trial that contributes most
        arrays[f"top_trial_{target}"] = which.numpy().astype(np.int64)
        arrays[f"top_rows_{target}"] = row.numpy().astype(np.float16)
    with atomic_path(folder / "trials.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return ["scores.csv", "trials.npz"]


def _rounded(x) -> list:
    """[L, H] array -> nested lists with 6 significant digits (NaN -> None), for meta.json."""
    return [[None if not np.isfinite(v) else float(f"{v:.6g}") for v in row] for row in np.asarray(x).tolist()]


def summary(result: InductionResult, ctx=None) -> dict:
    """meta.json's account of the run: the maps (mean, SEM, null, lift), the verdict and the top heads per target."""
    cfg = result.config
    note = protocol_note(asdict(cfg), result.causal)
    maps, verdicts, tops = {}, {}, {}
    for target, st in result.stats.items():
        maps[target] = {"mean": _rounded(st.mean), "sem": _rounded(st.sem), "null": _rounded(st.null),
                        "lift": _rounded(st.lift), "chance": float(f"{st.chance:.6g}")}
        if np.abs(st.layer_chance - st.chance).max() > 1e-9:  # sliding-window layers: each layer's own chance
            maps[target]["layer_chance"] = [float(f"{c:.6g}") for c in st.layer_chance]
        verdicts[target] = verdict(st, cfg.min_lift)
        tops[target] = top_heads(st, st.named(cfg.min_lift))
    return {"seq_len": result.seq_len, "sequence_tokens": result.sequence_tokens, "protocol_note": note,
            "causal": result.causal, "share_r0": result.share_r0, "n_trials": result.scores.n_trials,
            "maps": maps, "verdict": verdicts, "top_heads": tops, "timings": dict(result.timings)}
