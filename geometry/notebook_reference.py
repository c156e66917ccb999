"""A line-by-line transcription of the paper's notebook (``Attention Visualization/correlation_optimization.ipynb``
in chenxcynthia/transformer-interpretability): the slow reference that ``geometry/notebook.py`` must equal.

Cells transcribed (their loops and arithmetic unchanged; only bertviz's ``get_attention`` is replaced by the
queries and keys passed in, and the loops run per layer and head):

- cell 19: ``all_dist`` - distances of every query-key pair (queries / scale, keys * scale; every query with
  every key of its sentence, future keys included) of the first 25 sentences, appended for ALL scales into
  one list per head (the list is never reset between scales);
- cell 27: ``thresholds[i][j] = np.percentile(all_dist[i][j], 0.5)`` - one threshold per head;
- cell 29 (weighted correlation, Figure 2a): per query, its keys with distance below the head's threshold;
  if there are more than one, the weighted correlation of dot product and distance with weights
  ``(thresh - d)^2`` where ``thresh`` is the stale 12 left over from cell 28; the head's value at a scale is
  the mean over contributing queries (a scale where none contributed is never set, i.e. absent);
- cell 28 (the "scaled" variant, Figure 2b): the same with the fixed distance 12 as the cut-off, and the sum
  divided by ``token_count`` - contributing queries counted over ALL heads at that scale;
- cells 44-45 (norm ratio, Figure 2c): per sentence the mean |q| and mean |k| of its tokens; the ratio of the
  medians over sentences (``statistics.median``), at scale 1.

The notebook's loops run ``for i in range(num_heads): for j in range(num_layers)`` and index
``queries[i][j]``: for GPT-2's 12 x 12 that visits every (layer, head); here the loops are written per layer
and head so that models of other shapes work. The notebook never translates keys.

Input: ``sentences``, a list of ``(Q, K)`` with ``Q[layer][head]`` a ``[tokens, d]`` numpy float64 array.
Scales are the notebook's constants (queries DIVIDED by the scale); attnlab's c is 1 / scale.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import numpy as np
from numpy import linalg as LA


def distance(list1, list2):
    squares = [(p - q) ** 2 for p, q in zip(list1, list2)]
    return sum(squares) ** .5


def m(x, w):
    """Weighted Mean"""
    return np.sum(x * w) / np.sum(w)


def cov(x, y, w):
    """Weighted Covariance"""
    return np.sum(w * (x - m(x, w)) * (y - m(y, w))) / np.sum(w)


def weighted_corr(x, y, w):
    """Weighted Correlation"""
    return cov(x, y, w) / np.sqrt(cov(x, x, w) * cov(y, y, w))


def thresholds_cells_19_27(sentences, scaling_consts, num_layers, num_heads, threshold_sentences=25):
    all_dist = [[list() for j in range(num_heads)] for i in range(num_layers)]
    for scale in scaling_consts:
        for s in sentences[0:threshold_sentences]:
            queries, keys = s
            for i in range(num_layers):
                for j in range(num_heads):
                    query = queries[i][j]
                    key = keys[i][j]
                    for q in query:
                        for k in key:
                            q_scaled = [x / scale for x in q]
                            k_scaled = [x * scale for x in k]
                            all_dist[i][j].append(distance(q_scaled, k_scaled))
    thresholds = np.zeros([num_layers, num_heads])
    for i in range(num_layers):
        for j in range(num_heads):
            thresholds[i][j] = np.percentile(np.array(all_dist[i][j]), 0.5)
    return thresholds


def weighted_corr_cell_29(sentences, scaling_consts, thresholds, num_layers, num_heads, thresh=12):
    corr_scaling = [[defaultdict(float) for j in range(num_heads)] for i in range(num_layers)]
    for scale in scaling_consts:
        corr_count = np.zeros([num_layers, num_heads])
        for s in sentences:
            queries, keys = s
            for i in range(num_layers):
                for j in range(num_heads):
                    query = queries[i][j]
                    key = keys[i][j]
                    for q in query:
                        dp_scaled = []
                        dist_scaled = []
                        for k in key:
                            q_scaled = [x / scale for x in q]
                            k_scaled = [x * scale for x in k]
                            d = distance(q_scaled, k_scaled)
                            if d < thresholds[i][j]:
                                dp_scaled.append(np.dot(q_scaled, k_scaled))
                                dist_scaled.append(distance(q_scaled, k_scaled))
                        if len(dp_scaled) > 1:
                            weights = np.square(np.array([thresh] * len(dist_scaled)) - np.array(dist_scaled))
                            w_corr = weighted_corr(dp_scaled, dist_scaled, weights)
                            corr_scaling[i][j][scale] += w_corr
                            corr_count[i][j] += 1
        for i in range(num_layers):
            for j in range(num_heads):
                if corr_count[i][j] > 0:
                    corr_scaling[i][j][scale] = corr_scaling[i][j][scale] / corr_count[i][j]
    return corr_scaling


def scaled_corr_cell_28(sentences, scaling_consts, num_layers, num_heads, thresh=12):
    corr_scaling = [[defaultdict(float) for j in range(num_heads)] for i in range(num_layers)]
    for scale in scaling_consts:
        token_count = 0
        for s in sentences:
            queries, keys = s
            for i in range(num_layers):
                for j in range(num_heads):
                    query = queries[i][j]
                    key = keys[i][j]
                    for q in query:
                        dp_scaled = []
                        dist_scaled = []
                        for k in key:
                            q_scaled = [x / scale for x in q]
                            k_scaled = [x * scale for x in k]
                            d = distance(q_scaled, k_scaled)
                            if d < thresh:
                                dp_scaled.append(np.dot(q_scaled, k_scaled))
                                dist_scaled.append(distance(q_scaled, k_scaled))
                        if len(dp_scaled) > 1:
                            weights = np.square(np.array([thresh] * len(dist_scaled)) - np.array(dist_scaled))
                            w_corr = weighted_corr(dp_scaled, dist_scaled, weights)
                            corr_scaling[i][j][scale] += w_corr
                            token_count += 1
        if token_count > 0:
            for i in range(num_layers):
                for j in range(num_heads):
                    corr_scaling[i][j][scale] = corr_scaling[i][j][scale] / token_count
    return corr_scaling


def norm_ratio_cells_44_45(sentences, num_layers, num_heads):
    attn_norms = [[{"key_norms": [], "query_norms": []} for j in range(num_heads)] for i in range(num_layers)]
    for s in sentences:
        queries, keys = s
        for i in range(num_layers):
            for j in range(num_heads):
                query = queries[i][j]
                q_sum = 0
                count = 0
                for q in query:
                    q_sum += LA.norm(q)
                    count += 1
                key = keys[i][j]
                k_sum = 0
                count = 0
                for k in key:
                    k_sum += LA.norm(k)
                    count += 1
                attn_norms[i][j]["query_norms"].append(q_sum / count)
                attn_norms[i][j]["key_norms"].append(k_sum / count)
    med_ratio = np.zeros([num_layers, num_heads])
    for i in range(num_layers):
        for j in range(num_heads):
            k_med = statistics.median(attn_norms[i][j]["key_norms"])
            q_med = statistics.median(attn_norms[i][j]["query_norms"])
            med_ratio[i][j] = q_med / k_med
    return med_ratio


def optimal_scale(corr_scaling_head: dict):
    """Cell 32: ``min(corr_scaling[i][j], key=corr_scaling[i][j].get)`` - the most negative value's scale."""
    return min(corr_scaling_head, key=corr_scaling_head.get)
