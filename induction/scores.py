"""Induction scores: attention from the [MASK] query to each named target, per layer and head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.core.extractor import extract_attention
from attnlab.induction.variants import RRTBatch


@dataclass
class InductionScores:
    """per_trial: target -> [T, L, H]; mean and sem: target -> [L, H] (sem is NaN when T = 1); rows: the full
    [MASK] attention rows ``[k, L, H, S]`` of the first ``k`` trials when asked for (``keep_rows``), else None."""

    per_trial: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    sem: dict[str, torch.Tensor]
    rows: torch.Tensor | None = None

    @property
    def n_trials(self) -> int:
        return next(iter(self.per_trial.values())).shape[0]


def summarise(per_trial: dict[str, torch.Tensor]) -> InductionScores:
    mean = {t: v.mean(0) for t, v in per_trial.items()}
    sem = {
        t: (v.std(0, unbiased=True) / math.sqrt(v.shape[0])) if v.shape[0] > 1 else torch.full_like(v[0], float("nan"))
        for t, v in per_trial.items()
    }
    return InductionScores(per_trial, mean, sem)


def induction_scores(model, batch: RRTBatch, *, batch_size=None, progress=False,
                     trials_per_pass: int = 256, keep_rows: int = 0) -> InductionScores:
    """The [MASK] row of every layer and head, read at each target: ``per_trial[target] [T, L, H]``.

    Trials stream through the extractor ``trials_per_pass`` at a time and only the target entries are kept,
    so memory holds ``[T, L, H]`` per target, never the ``[T, L, H, S]`` rows - except the full rows of the
    first ``keep_rows`` trials (for the interactive view), taken from the first pass.
    """
    keep_rows = min(keep_rows, trials_per_pass)
    n = batch.input_ids.shape[0]
    parts = {name: [] for name in batch.targets}
    kept = None
    starts = range(0, n, trials_per_pass)
    if progress:
        from attnlab.core.progress import bar

        starts = bar(starts, desc="induction", unit="chunk", total=len(starts))
    for s in starts:
        e = min(s + trials_per_pass, n)
        rows = extract_attention(model, batch.input_ids[s:e], None, batch.mask_index[s:e, None],
                                 batch_size=batch_size)
        att = rows.attention[:, 0]  # [t, L, H, S]
        if s == 0 and keep_rows:
            kept = att[:keep_rows].clone()
        trial = torch.arange(e - s)
        for name, pos in batch.targets.items():
            parts[name].append(att[trial, :, :, pos[s:e]])  # [t, L, H]
    result = summarise({name: torch.cat(p) for name, p in parts.items()})
    result.rows = kept
    return result
