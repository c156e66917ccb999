"""Induction scores: attention from the [MASK] query to each named target, per layer and head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.core.extractor import extract_attention
from attnlab.induction.variants import RRTBatch


@dataclass
class InductionScores:
    """per_trial: target -> [T, L, H]; mean and sem: target -> [L, H] (sem is NaN when T = 1)."""

    per_trial: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    sem: dict[str, torch.Tensor]

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


def induction_scores(model, batch: RRTBatch, *, batch_size=None, progress=False) -> InductionScores:
    """One batched pass per chunk: the [MASK] row of every layer and head, read at each target."""
    rows = extract_attention(model, batch.input_ids, None, batch.mask_index[:, None],
                             batch_size=batch_size, progress=progress)
    att = rows.attention[:, 0]  # [T, L, H, S]
    trial = torch.arange(att.shape[0])
    per_trial = {name: att[trial, :, :, pos] for name, pos in batch.targets.items()}  # [T, L, H]
    return summarise(per_trial)
