"""How stable each head's optimum is over sentence resamples, and the fast resampled metrics behind it.

A resample draws the sentences with replacement; the optimum is recomputed on it and compared with the reported
one. Recomputing every metric from scratch costs one full pass over every query-key pair per resample (the
``text`` protocol's pass is ~0.9 s for MiniLM and 100 sentences, so 20 resamples took 15 s). But a resample only
reweights pairs: a sentence drawn m times contributes its pairs m times, and the metrics only look at the
smallest distances (a 0.5th-percentile threshold). :class:`ResampledMetrics` therefore keeps, from one pass, each
head's and constant's few hundred smallest distances ("candidates") and recomputes a resample from those alone:

- the resample's key translation moves every distance of a head at constant c by at most
  ``delta = |c (mean_q - mean_q') - (mean_k - mean_k') / c|`` (the triangle inequality; primes: the resample's
  centroids), so a pair outside the candidates (full-data distance >= T, the largest candidate's) has resampled
  distance >= T - delta;
- when the resample's threshold rank is reached among the drawn candidates below T - delta, no other pair can
  enter the threshold or lie under it, and the metrics computed from the candidates (with multiplicities) are
  the full metrics. Where that check fails the resample is recomputed in full: the answer never depends on it.

Equal to the full recomputation to rounding (``tests/test_geometry.py`` compares them), with one exception by
design: where the only pairs under a threshold are copies of one pair (a sentence drawn several times), their
correlation is missing here, while the full recomputation's copies differ in the last bit and give +-1. Shapes as in
:mod:`attnlab.geometry.scaling` (G heads layer-major, C constants, P pairs, N sentences, T tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.geometry.scaling import (MIN_PAIRS, PERCENTILE, ScalingMetrics, _flat_heads, _lerp, _percentile_order,
                                      check_constants, head_chunks, median, norm_ratio_values, pair_index,
                                      scaled_distances, scaled_weighted_correlation, scaling_metrics, token_mask,
                                      weighted_pearson)

SPARE = 16  # candidates kept: SPARE x the threshold's rank on the full data (~8% of the pairs), plus MARGIN
MARGIN = 64


def bootstrap_stability(compute, n_sentences: int, reported: dict, *, resamples: int, seed: int) -> dict:
    """Share of sentence resamples (drawn with replacement, seeded) whose optimum equals the reported one.

    compute(index [N'] of sentences) -> ScalingMetrics; reported: {metric: [G] optimum (NaN: none)}.
    Returns {metric: [G]} in [0, 1]; NaN where the reported optimum is NaN or ``resamples`` is 0.
    """
    g = torch.Generator().manual_seed(seed + 7919)
    agree = {m: torch.zeros_like(v) for m, v in reported.items()}
    for _ in range(resamples):
        idx = torch.randint(0, n_sentences, (n_sentences,), generator=g)
        m = compute(idx)
        for metric, best in reported.items():
            agree[metric] += (m.best(metric) == best).double()
    return {metric: torch.where(torch.isnan(best) | (resamples == 0), torch.nan, agree[metric] / max(resamples, 1))
            for metric, best in reported.items()}


@dataclass
class _Pairs:
    """Query-key pairs of given heads, flattened to any shape ``[...]``: where their per-token terms are (flat
    indices into a ``[T, G]`` table), their head, sentence and raw dot product."""

    flat_q: torch.Tensor
    flat_k: torch.Tensor
    head: torch.Tensor
    sentence: torch.Tensor
    dot: torch.Tensor


class ResampledMetrics:
    """``self(index) -> ScalingMetrics`` of the ``text`` protocol on the sentences ``index`` (with repeats), equal to
    ``scaling_metrics(queries[index], keys[index], lengths[index], constants)`` to rounding, from one pass.

    queries, keys: ``[N, S, L, H, d]`` (zeros beyond ``lengths [N]``). ``fallbacks`` counts the cells (head and
    constant) and pooled thresholds that had to be recomputed from every pair.
    """

    def __init__(self, queries, keys, lengths, constants, *, causal: bool, translate: bool = True,
                 percentile: float = PERCENTILE, min_pairs: int = MIN_PAIRS, memory_mb: float = 512,
                 spare: int = SPARE, margin: int = MARGIN):
        self.queries, self.keys, self.lengths = queries, keys, torch.as_tensor(lengths, dtype=torch.long)
        self.constants = check_constants(constants)
        self.causal, self.translate = causal, translate
        self.percentile, self.min_pairs = percentile, min_pairs
        self.fallbacks, self.spare, self.margin = 0, spare, margin
        q, k = _flat_heads(queries), _flat_heads(keys)
        valid = token_mask(self.lengths, q.shape[1])  # [N, S]
        n_sent, width = valid.shape
        self.n_heads = g_all = q.shape[2]
        token_id = torch.full((n_sent, width), -1, dtype=torch.long)  # tokens numbered in q[valid]'s order
        token_id[valid] = torch.arange(int(valid.sum()))
        self.token_sentence = valid.nonzero()[:, 0]  # [T]
        self.q_tok, self.k_tok = q[valid].double(), k[valid].double()  # [T, G, d]
        self.q_norm, self.k_norm = self.q_tok.norm(dim=-1), self.k_tok.norm(dim=-1)  # [T, G], as median_norms
        self.q_sq, self.k_sq = self.q_norm ** 2, self.k_norm ** 2
        self.q_sum = torch.zeros(n_sent, g_all, q.shape[-1], dtype=torch.float64).index_add_(
            0, self.token_sentence, self.q_tok)  # [N, G, d] per-sentence sums: resampled centroids from counts
        self.k_sum = torch.zeros_like(self.q_sum).index_add_(0, self.token_sentence, self.k_tok)
        self.mean_q, self.mean_k = self.q_tok.mean(0), self.k_tok.mean(0)  # [G, d]: pair_terms' translation
        index = pair_index(self.lengths, causal)
        self.n_pairs = n_pairs = index[0].numel()
        self.pairs_per_sentence = torch.bincount(index[0], minlength=n_sent)
        self.pair_q, self.pair_k = token_id[index[0], index[1]], token_id[index[0], index[2]]  # [P] token numbers
        self.pair_sentence = index[0]
        self.dot = torch.empty(g_all, n_pairs, dtype=torch.float64)  # [G, P] raw q.k (the fallback's)
        # one pass: the smallest distances per head and constant [G, C, keep], and of all heads per constant
        n_c = len(self.constants)
        self.keep = min(n_pairs, self.spare * (_percentile_order(n_pairs, percentile)[1] + 1) + self.margin)
        self.keep_pooled = min(g_all * n_pairs,
                               self.spare * (_percentile_order(g_all * n_pairs, percentile)[1] + 1) + self.margin)
        cand_d = torch.empty(g_all, n_c, self.keep, dtype=torch.float64)
        cand_p = torch.empty(g_all, n_c, self.keep, dtype=torch.long)
        pooled_d = torch.empty(n_c, 0, dtype=torch.float64)
        pooled_i = torch.empty(n_c, 0, dtype=torch.long)  # head * P + pair
        per_chunk = max(1, min(16, int(memory_mb * 2**20 // (n_c * n_pairs * 8 * 4))))
        for g0, g1, terms in head_chunks(queries, keys, self.lengths, causal=causal, translate=translate,
                                         heads_per_chunk=per_chunk, index=index):
            dist = scaled_distances(terms, self.constants)  # [g, C, P]
            cand_d[g0:g1], cand_p[g0:g1] = torch.topk(dist, self.keep, dim=-1, largest=False, sorted=True)
            self.dot[g0:g1] = terms.dot
            flat = dist.permute(1, 0, 2).reshape(n_c, -1)
            d, i = torch.topk(flat, min(self.keep_pooled, flat.shape[1]), dim=-1, largest=False)
            pooled_d, pooled_i = torch.cat([pooled_d, d], 1), torch.cat([pooled_i, i + g0 * n_pairs], 1)
            pooled_d, order = torch.topk(pooled_d, min(self.keep_pooled, pooled_d.shape[1]), dim=-1, largest=False)
            pooled_i = pooled_i.gather(1, order)
            del dist, terms
        # a pair outside the candidates is at least this far (inf: every pair is a candidate)
        self.bound = cand_d[..., -1] if self.keep < n_pairs else torch.full((g_all, n_c), torch.inf, dtype=torch.float64)
        self.pooled_bound = (pooled_d.max(1).values if self.keep_pooled < g_all * n_pairs
                             else torch.full((n_c,), torch.inf, dtype=torch.float64))
        self.cells = self._pairs(torch.arange(g_all)[:, None, None].expand_as(cand_p), cand_p)  # [G, C, keep]
        self.pooled = self._pairs(pooled_i // n_pairs, pooled_i % n_pairs)  # [C, keep_pooled]

    def _pairs(self, head, pair) -> _Pairs:
        g_all = self.n_heads
        return _Pairs(self.pair_q[pair] * g_all + head, self.pair_k[pair] * g_all + head, head,
                      self.pair_sentence[pair], self.dot[head, pair])

    def full(self, index):
        return scaling_metrics(self.queries[index], self.keys[index], self.lengths[index], self.constants,
                               causal=self.causal, translate=self.translate, percentile=self.percentile,
                               min_pairs=self.min_pairs)

    def __call__(self, index) -> ScalingMetrics:
        index = torch.as_tensor(index, dtype=torch.long)
        counts = torch.bincount(index, minlength=len(self.lengths))  # [N] how often each sentence was drawn
        n_pairs = int((counts * self.pairs_per_sentence).sum())
        if n_pairs == 0:
            return self.full(index)  # raises the plain error
        c, g_all = self.constants, self.n_heads
        mean_q, mean_k = self._centroids(counts)
        if self.translate:  # the largest move of any distance, per head and constant [G, C]
            shift = (c[None, :, None] * (self.mean_q - mean_q)[:, None]
                     - (self.mean_k - mean_k)[:, None] / c[None, :, None])
            delta = shift.norm(dim=-1)
        else:
            delta = torch.zeros(g_all, len(c), dtype=torch.float64)
        terms = self._token_terms(mean_q, mean_k)
        c2 = c ** 2
        dist, mult = self._distances(terms, self.cells, c2[None, :, None], counts)  # [G, C, keep]
        thr, under, ok = self._threshold(dist, mult, n_pairs, self.bound - delta)
        corr, n_under = self._correlation(dist, mult, self.cells.dot, thr, under)
        if not ok.all():  # these cells' thresholds may involve other pairs: recompute them from every pair
            g_f, c_f = (~ok).nonzero(as_tuple=True)
            self.fallbacks += len(g_f)
            every = self._pairs(g_f[:, None].expand(-1, self.n_pairs), torch.arange(self.n_pairs).expand(len(g_f), -1))
            d_f, m_f = self._distances(terms, every, c2[c_f][:, None], counts)
            t_f, u_f, _ = self._threshold(d_f, m_f, n_pairs, None)
            corr[g_f, c_f], n_under[g_f, c_f] = self._correlation(d_f, m_f, every.dot, t_f, u_f)
        # the pooled threshold: per constant over every head's pairs
        pdist, pmult = self._distances(terms, self.pooled, c2[:, None], counts)  # [C, keep_pooled]
        _, punder, pok = self._threshold(pdist, pmult, g_all * n_pairs, self.pooled_bound - delta.max(0).values)
        pooled = torch.zeros(len(c), g_all, dtype=torch.long).scatter_add_(1, self.pooled.head, punder * pmult)
        for ci in (~pok).nonzero()[:, 0].tolist():  # recompute from every pair of every head
            self.fallbacks += 1
            every = self._pairs(torch.arange(g_all).repeat_interleave(self.n_pairs), torch.arange(self.n_pairs).repeat(g_all))
            d_f, m_f = self._distances(terms, every, c2[ci], counts)
            _, u_f, _ = self._threshold(d_f, m_f, g_all * n_pairs, None)
            pooled[ci] = torch.zeros(g_all, dtype=torch.long).scatter_add_(0, every.head, u_f * m_f)
        token_counts = counts[self.token_sentence]
        mq = median(self.q_norm.repeat_interleave(token_counts, 0))
        mk = median(self.k_norm.repeat_interleave(token_counts, 0))
        values = {"weighted_corr": corr, "scaled_weighted_corr": scaled_weighted_correlation(corr, pooled.T),
                  "norm_ratio": norm_ratio_values(mq, mk, c)}
        return ScalingMetrics(c, values, n_under, pooled.T, mq, mk, n_pairs, None)

    def _centroids(self, counts):
        """The resample's query and key centroids ``[G, d]`` each (every drawn token, repeats counted)."""
        n_tokens = (counts * self.lengths).sum()
        w = counts.double()[:, None, None]
        return (w * self.q_sum).sum(0) / n_tokens, (w * self.k_sum).sum(0) / n_tokens

    def _token_terms(self, mean_q, mean_k):
        """Per token and head, flat ``[T * G]``: |q - m_q'|^2, |k - m_k'|^2, and the cross term's parts
        q.m_k' - m_q'.m_k' and m_q'.k (so that (q - m_q').(k - m_k') = q.k - both)."""
        if not self.translate:
            zero = torch.zeros(self.q_sq.numel(), dtype=torch.float64)
            return self.q_sq.reshape(-1), self.k_sq.reshape(-1), zero, zero
        qmq = torch.einsum("tgd,gd->tg", self.q_tok, mean_q)
        qmk = torch.einsum("tgd,gd->tg", self.q_tok, mean_k)
        kmq = torch.einsum("tgd,gd->tg", self.k_tok, mean_q)
        kmk = torch.einsum("tgd,gd->tg", self.k_tok, mean_k)
        q_sq = self.q_sq - 2 * qmq + (mean_q * mean_q).sum(-1)
        k_sq = self.k_sq - 2 * kmk + (mean_k * mean_k).sum(-1)
        q_cross = qmk - (mean_q * mean_k).sum(-1)
        return q_sq.reshape(-1), k_sq.reshape(-1), q_cross.reshape(-1), kmq.reshape(-1)

    @staticmethod
    def _distances(terms, pairs: _Pairs, c2, counts):
        """Resampled distances of ``pairs`` ``[...]`` at squared constants ``c2`` (broadcast to them) and each pair's
        multiplicity (0: its sentence was not drawn; its distance is then +inf).

        d'^2 = c^2 |q - m_q'|^2 + |k - m_k'|^2 / c^2 - 2 (q.k - q.m_k' - m_q'.k + m_q'.m_k'), from per-token terms."""
        q_sq, k_sq, q_cross, k_cross = terms
        shape = pairs.flat_q.shape
        fq, fk = pairs.flat_q.reshape(-1), pairs.flat_k.reshape(-1)
        d2 = q_sq.index_select(0, fq).view(shape).mul_(c2)
        d2 += k_sq.index_select(0, fk).view(shape).div_(c2)
        d2 += (q_cross.index_select(0, fq) + k_cross.index_select(0, fk)).view(shape).mul_(2)
        d2 -= 2 * pairs.dot
        mult = counts.index_select(0, pairs.sentence.reshape(-1)).view(shape)
        return d2.clamp_min_(0).sqrt_().masked_fill_(mult == 0, torch.inf), mult

    def _correlation(self, dist, mult, dot, thr, under):
        """Metric 1 from candidate distances ``[..., K]`` with multiplicities: (corr, n_under) ``[...]``."""
        w = torch.where(under, (thr[..., None] - dist) ** 2, 0.0) * mult
        n_under = (under * mult).sum(-1)
        corr = weighted_pearson(dot, torch.where(mult > 0, dist, 0.0), w)
        return torch.where(n_under >= self.min_pairs, corr, torch.nan), n_under

    def _threshold(self, dist, mult, n_total: int, bound):
        """The percentile threshold ``[...]`` of the resample (``n_total`` pairs, repeats counted) from candidate
        distances ``[..., K]`` with multiplicities, which candidates lie under it, and where that is provably the
        full data's answer: the rank is reached among drawn candidates closer than ``bound [...]`` (None: every
        pair is here)."""
        lo, hi, t = _percentile_order(n_total, self.percentile)
        # the rank is reached within the hi + 1 closest drawn candidates (each counts at least once)
        ordered, order = torch.topk(dist, min(hi + 1, dist.shape[-1]), dim=-1, largest=False, sorted=True)
        cum = mult.gather(-1, order).cumsum(-1)
        rank = torch.tensor([lo, hi]).expand(*cum.shape[:-1], 2).contiguous()
        at = torch.searchsorted(cum, rank, right=True)  # first candidate whose cumulative count passes the rank
        reached = at[..., 1] < cum.shape[-1]
        v = ordered.gather(-1, at.clamp_max(cum.shape[-1] - 1))
        thr = _lerp(v[..., 0], v[..., 1], t)
        if bound is None:
            return thr, dist < thr[..., None], reached
        # rounding of two ways of computing a distance (an infinite bound: every pair is a candidate)
        margin = 1e-7 * (torch.where(torch.isfinite(bound), bound.abs(), 0.0) + v[..., 1]) + 1e-12
        return thr, dist < thr[..., None], reached & (v[..., 1] <= bound - margin)
