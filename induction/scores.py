"""Induction scores and what a conclusion needs beside them: chance, an empirical null, a CI, one verdict.

For every target of a variant and every head:

- ``mean``: attention from the query ([MASK]; causal: a repeated token) to the target, over trials;
- ``chance``: what uniform attention over the keys the query can see puts on one key - masked LMs
  ``1 / S`` (every key is visible), causal models ``1 / (query index + 1)`` - averaged over trials;
- ``null``: the same head's attention to the same positions on the variant's control sequences (the copies the
  query could read replaced by fresh tokens: no repeat), trial by trial;
- ``lift = mean - null``: what the repeat itself buys;
- ``ci_low, ci_high``: percentile bootstrap 95% CI of the mean over trials;
- ``top_trial_share``: the share of the sum carried by the single largest trial (1 / T when all trials agree).

:data:`VERDICT_RULE`: a head is named an induction head for a target when its lift is at least ``min_lift``,
its CI's lower bound exceeds the null and no single trial carries more than half of its sum.

:data:`AVOID_RULE`: the opposite finding, reported beside the verdict and never as an induction head: the repeat
takes attention *away* from the target (a trained masked organism's layer-1 heads put 0.005-0.010 on the previous
instance against nulls of 0.037-0.047 while copying; ``docs/organisms.md``). A lift near zero can hide this, so it is
stated with its own rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.extractor import extract_attention
from attnlab.core.stats import bootstrap_ci, top_share
from attnlab.induction.variants import RRTBatch

MAX_TOP_SHARE = 0.5
AVOID_RULE = ("turned away when mean <= null / 2, the 95% CI's upper bound < null, and null >= chance (without the "
              "repeat the head gave the target at least uniform attention)")
VERDICT_RULE = ("named when lift = mean - null >= {min_lift:g}, the 95% CI's lower bound > null, and no single trial "
                f"carries more than {MAX_TOP_SHARE:.0%} of the sum")


@dataclass
class InductionScores:
    """per_trial and null_per_trial: target -> ``[T, L, H]`` attention on the trials and on their control
    sequences; chance: ``[T]`` uniform attention's share per key for each trial's query (every key of the query
    visible); layer_chance: target -> ``[T, L]`` the same per layer, 0 where the layer hides the target (read from
    the masks the model applied: a sliding-window layer sees fewer keys); rows: the full query
    attention rows ``[k, L, H, S]`` of the first ``k`` trials when asked for (``keep_rows``), else None;
    top: target -> (``[L, H]`` the trial with the most attention on the target, ``[L, H, S]`` that trial's row
    of that head) - the trial that contributes most to each head's mean, for the view (with ``keep_rows``)."""

    per_trial: dict[str, torch.Tensor]
    null_per_trial: dict[str, torch.Tensor] | None
    chance: torch.Tensor
    rows: torch.Tensor | None = None
    top: dict | None = None
    layer_chance: dict | None = None

    @property
    def n_trials(self) -> int:
        return next(iter(self.per_trial.values())).shape[0]

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return {t: v.mean(0) for t, v in self.per_trial.items()}

    @property
    def sem(self) -> dict[str, torch.Tensor]:
        return {t: (v.std(0, unbiased=True) / math.sqrt(v.shape[0])) if v.shape[0] > 1
                else torch.full_like(v[0], float("nan")) for t, v in self.per_trial.items()}


@dataclass
class TargetStats:
    """Everything a conclusion about one target needs, per head ``[L, H]`` (chance is one number: uniform attention
    where the query sees every key; ``layer_chance`` ``[L]`` is each layer's, which differs in sliding-window
    layers)."""

    mean: np.ndarray
    sem: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    chance: float
    null: np.ndarray
    top_trial_share: np.ndarray
    layer_chance: np.ndarray | None = None

    def __post_init__(self):
        if self.layer_chance is None:
            self.layer_chance = np.full(self.mean.shape[0], self.chance)

    @property
    def lift(self) -> np.ndarray:
        return self.mean - self.null

    def named(self, min_lift: float) -> np.ndarray:
        """``[L, H]`` bool: the heads :data:`VERDICT_RULE` names."""
        with np.errstate(invalid="ignore"):
            return (self.lift >= min_lift) & (self.ci_low > self.null) & (self.top_trial_share <= MAX_TOP_SHARE)

    def avoided(self) -> np.ndarray:
        """``[L, H]`` bool: the heads :data:`AVOID_RULE` finds (the repeat at least halves their attention to the
        target, beyond the CI, where they gave it at least chance without the repeat)."""
        with np.errstate(invalid="ignore"):
            return ((self.mean <= self.null / 2) & (self.ci_high < self.null)
                    & (self.null >= self.layer_chance[:, None]))


def target_stats(per_trial, null_per_trial, chance, seed: int, layer_chance=None) -> TargetStats:
    """:class:`TargetStats` of one target from ``[T, L, H]`` attention (and its null), ``[T]`` chance and
    (optional) ``[T, L]`` per-layer chance."""
    x = np.asarray(per_trial, dtype=np.float64)
    t = x.shape[0]
    lo, hi = bootstrap_ci(x, seed)
    sem = x.std(0, ddof=1) / math.sqrt(t) if t > 1 else np.full(x.shape[1:], np.nan)
    null = np.asarray(null_per_trial, dtype=np.float64).mean(0) if null_per_trial is not None else \
        np.full(x.shape[1:], np.nan)
    by_layer = None if layer_chance is None else np.asarray(layer_chance, dtype=np.float64).mean(0)
    return TargetStats(x.mean(0), sem, lo, hi, float(np.mean(np.asarray(chance, dtype=np.float64))), null,
                       top_share(x), by_layer)


def chance_levels(batch: RRTBatch, causal: bool) -> torch.Tensor:
    """``[T]``: the attention a uniform head puts on any one key visible to the query (no padding here)."""
    if causal:
        return 1.0 / (batch.mask_index.double() + 1.0)
    return torch.full((batch.input_ids.shape[0],), 1.0 / batch.input_ids.shape[1], dtype=torch.float64)


def _read_targets(model, ids, batch: RRTBatch, *, batch_size, progress, trials_per_pass, keep_rows, desc):
    keep_rows = min(keep_rows, trials_per_pass)
    n = ids.shape[0]
    parts = {name: [] for name in batch.targets}
    chance = {name: [] for name in batch.targets}  # [t, L] per pass: uniform attention's share on the target
    kept = None
    top: dict = {}  # target -> (best value [L, H], its trial [L, H], its row [L, H, S])
    starts = range(0, n, trials_per_pass)
    if progress:
        from attnlab.core.progress import bar

        starts = bar(starts, desc=desc, unit="chunk", total=len(starts))
    for s in starts:
        e = min(s + trials_per_pass, n)
        rows = extract_attention(model, ids[s:e], None, batch.mask_index[s:e, None], batch_size=batch_size)
        att = rows.attention[:, 0]  # [t, L, H, S]
        visible = rows.visible[:, 0].double()  # [t, L, S]
        if s == 0 and keep_rows:
            kept = att[:keep_rows].clone()
        trial = torch.arange(e - s)
        for name, pos in batch.targets.items():
            values = att[trial, :, :, pos[s:e]]  # [t, L, H]
            parts[name].append(values)
            chance[name].append(visible[trial, :, pos[s:e]] / visible.sum(-1).clamp_min(1))  # [t, L]
            if keep_rows:  # strictly greater: the earliest trial wins ties, as an argmax over all trials would
                best, which = values.max(0)
                row = att.gather(0, which[None, :, :, None].expand(1, *att.shape[1:]))[0]  # [L, H, S]
                if name not in top:
                    top[name] = (best, which + s, row.clone())
                else:
                    old_best, old_which, old_row = top[name]
                    better = best > old_best
                    top[name] = (torch.where(better, best, old_best), torch.where(better, which + s, old_which),
                                 torch.where(better[..., None], row, old_row))
    top = {name: (which, row) for name, (_, which, row) in top.items()} if keep_rows else None
    return {name: torch.cat(p) for name, p in parts.items()}, kept, top, {n: torch.cat(c) for n, c in chance.items()}


def induction_scores(model, batch: RRTBatch, *, null_ids: torch.Tensor | None = None, batch_size=None,
                     progress=False, trials_per_pass: int = 256, keep_rows: int = 0) -> InductionScores:
    """The query's row of every layer and head, read at each target, on the trials and (``null_ids [T, S]``) on
    their control sequences: ``per_trial[target] [T, L, H]``, ``null_per_trial[target] [T, L, H]``.

    Trials stream through the extractor ``trials_per_pass`` at a time and only the target entries are kept,
    so memory holds ``[T, L, H]`` per target, never the ``[T, L, H, S]`` rows - except the full rows of the
    first ``keep_rows`` trials (for the interactive view), taken from the first pass, and per head and target the
    row of the trial that contributes most (``top``).
    """
    from attnlab.core.models import as_loaded

    lm = as_loaded(model)
    kwargs = dict(batch_size=batch_size, progress=progress, trials_per_pass=trials_per_pass)
    per_trial, kept, top, layer_chance = _read_targets(lm, batch.input_ids, batch, keep_rows=keep_rows,
                                                       desc="induction", **kwargs)
    null = None
    if null_ids is not None:
        null, _, _, _ = _read_targets(lm, null_ids, batch, keep_rows=0, desc="induction null", **kwargs)
    return InductionScores(per_trial, null, chance_levels(batch, lm.is_causal), kept, top, layer_chance)


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def verdict(stats: TargetStats, min_lift: float) -> dict:
    """One target's verdict for meta.json: the named heads (strongest lift first), the chance level, the rule,
    and the strongest head by mean with its numbers (what the terminal and report say when none is named)."""
    named = stats.named(min_lift)
    order = [tuple(map(int, ix)) for ix in zip(*np.nonzero(named))]
    order.sort(key=lambda lh: -stats.lift[lh])
    flat = np.nan_to_num(stats.mean, nan=-np.inf)
    best = tuple(int(i) for i in np.unravel_index(int(np.argmax(flat)), flat.shape))

    def entry(lh):
        return {"head": head_name(*lh), "mean": _num(stats.mean[lh]), "lift": _num(stats.lift[lh]),
                "null": _num(stats.null[lh]), "ci": [_num(stats.ci_low[lh]), _num(stats.ci_high[lh])],
                "top_trial_share": _num(stats.top_trial_share[lh])}

    avoid = [tuple(map(int, ix)) for ix in zip(*np.nonzero(stats.avoided()))]
    avoid.sort(key=lambda lh: stats.mean[lh] / stats.null[lh])  # most avoided first
    return {"heads": [head_name(*lh) for lh in order], "named": [entry(lh) for lh in order],
            "chance": _num(stats.chance), "rule": VERDICT_RULE.format(min_lift=min_lift), "strongest": entry(best),
            "avoided": [entry(lh) for lh in avoid], "avoid_rule": AVOID_RULE}


def verdict_line(target: str, v: dict) -> str:
    """``after: L9H0 (0.41, lift 0.40), ...`` or ``after: none - strongest L5H3 0.0070 vs chance 0.0025``."""
    if v["named"]:
        heads = ", ".join(f"{e['head']} ({e['mean']:.3g}, lift {e['lift']:.3g})" for e in v["named"][:5])
        more = f" and {len(v['named']) - 5} more" if len(v["named"]) > 5 else ""
        return f"{target}: {heads}{more}" + turned_away(v)
    s = v["strongest"]
    null = f", null {s['null']:.3g}" if s.get("null") is not None else ""
    return f"{target}: none - strongest {s['head']} {s['mean']:.4g} vs chance {v['chance']:.3g}{null}" + turned_away(v)


def turned_away(v: dict) -> str:
    """``; avoided by L1H0 (0.005 vs null 0.043), ...``: heads the repeat turns away from the target (AVOID_RULE)."""
    avoided = v.get("avoided") or []
    if not avoided:
        return ""
    heads = ", ".join(f"{e['head']} ({e['mean']:.2g} vs null {e['null']:.2g})" for e in avoided[:3])
    more = f" and {len(avoided) - 3} more" if len(avoided) > 3 else ""
    return f"; the repeat turns {heads}{more} away from it"


def top_heads(stats: TargetStats, named: np.ndarray, k: int = 10) -> list[dict]:
    """The ``k`` heads with the largest mean (the paper's ranking), each with everything that qualifies it."""
    flat = np.nan_to_num(stats.mean, nan=-np.inf).ravel()
    n_heads = stats.mean.shape[1]
    out = []
    for g in np.argsort(-flat, kind="stable")[:k]:
        lh = (int(g) // n_heads, int(g) % n_heads)
        out.append({"layer": lh[0], "head": lh[1], "mean": _num(stats.mean[lh]), "sem": _num(stats.sem[lh]),
                    "ci": [_num(stats.ci_low[lh]), _num(stats.ci_high[lh])], "null": _num(stats.null[lh]),
                    "lift": _num(stats.lift[lh]), "top_trial_share": _num(stats.top_trial_share[lh]),
                    "named": bool(named[lh])})
    return out


def _num(x) -> float | None:
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None
