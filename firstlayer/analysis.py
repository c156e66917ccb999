"""The ``decompose`` experiment's steps: compute every part of the first-layer analysis on a model and a corpus,
save it, summarise it. The mathematics is in :mod:`attnlab.firstlayer.decompose`; the record in
:mod:`attnlab.firstlayer.experiment`; the figures in :mod:`attnlab.figures.firstlayer`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from attnlab.core.errors import InputError
from attnlab.core.extractor import extract_attention
from attnlab.core.outputs import atomic_path, csv_cell, write_csv
from attnlab.core.weights import layer_weights
from attnlab.firstlayer import decompose as D
from attnlab.firstlayer.experiment import DecomposeConfig


@dataclass
class DecomposeResult:
    config: DecomposeConfig
    causal: bool
    exact: bool  # False: a rotary family, where only the empirical pattern exists
    pattern: np.ndarray  # [H, N, N]
    method: str  # how the pattern was made
    dest_token: str
    classes: list[dict]
    notes: list[str] = field(default_factory=list)
    terms: list = field(default_factory=list)  # (head, term, mean, std, mean_abs)
    fit: list = field(default_factory=list)  # (head, r2, max_error, exact_max_error)
    linear_vs_exact: float | None = None  # max |pattern(linear LN) - pattern(exact LN)|
    normalisers: list = field(default_factory=list)  # (head, position, mean log Z, spread, n_eff, predicted)
    neurons: list = field(default_factory=list)  # (neuron, r, range, top+, top-)
    scale: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _token_id(tokenizer, word: str) -> tuple[int, str]:
    """The id of ``word`` as the model writes it mid-sentence (GPT-2's leading space included)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"dest_token {word!r} is no token of this vocabulary; choose another word")
    return ids[-1], tokenizer.convert_ids_to_tokens([ids[-1]])[0]


def _sequences(lm, docs, n: int, count: int, min_tokens: int = 32) -> list[list[int]]:
    """Up to ``count`` corpus texts as the model sees them (special tokens included), each cut to ``n`` tokens."""
    out = []
    for doc in docs:
        ids = lm.tokenizer(doc.text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        if len(ids) >= min_tokens:
            out.append(ids[:n])
        if len(out) >= count:
            break
    if len(out) < count:
        raise InputError(f"the corpus has {len(out)} texts of at least {min_tokens} tokens; the analysis needs "
                         f"{count} (texts + heldout) - use a larger corpus or lower texts")
    return out


def _real_scores(lm, layer: int, seq) -> torch.Tensor:
    """The model's own pre-softmax scores of one sequence at ``layer``: ``[H, S, S]`` (float64)."""
    rows = extract_attention(lm, torch.as_tensor([seq]), return_scores=True, layers=[layer])
    return rows.scores[0, :, 0].permute(1, 0, 2).double()


def _empirical(cfg, lm, docs, n: int, causal: bool) -> np.ndarray:
    """Rotary families: the attention averaged over content-shuffled texts ``[H, n, n]``."""
    seqs = [s for s in _sequences(lm, docs, n, cfg.texts, min_tokens=n) if len(s) == n]
    g = torch.Generator().manual_seed(cfg.seed)
    total = None
    for seq in seqs:
        shuffled = torch.as_tensor(seq)[torch.randperm(len(seq), generator=g)]
        att = extract_attention(lm, shuffled[None], layers=[cfg.layer]).attention[0, :, 0].permute(1, 0, 2)
        total = att.double() if total is None else total + att.double()
    return (total / len(seqs)).numpy()


class _Moments:
    """Per-head count, mean, sum of squared deviations and sum of absolute values of values streamed in ``[H, n]``
    blocks (Chan et al.'s pairwise update: exact, and stable where sum-of-squares formulas cancel)."""

    def __init__(self, n_heads: int):
        self.n = 0
        self.mean = self.m2 = self.abs_sum = torch.zeros(n_heads, dtype=torch.float64)

    def add(self, block) -> None:
        n_b = block.shape[1]
        mean_b = block.mean(1)
        m2_b = (block - mean_b[:, None]).square_().sum(1)
        delta, total = mean_b - self.mean, self.n + n_b
        self.m2 = self.m2 + m2_b + delta * delta * self.n * n_b / total
        self.mean = self.mean + delta * n_b / total
        self.abs_sum = self.abs_sum + block.abs().sum(1)
        self.n = total


def compute(cfg: DecomposeConfig, lm, ctx) -> DecomposeResult:
    t0 = time.perf_counter()
    if cfg.layer >= lm.n_layers:
        raise InputError(f"layer {cfg.layer} does not exist: the model has layers 0..{lm.n_layers - 1}")
    if lm.tokenizer is None:
        raise InputError(f"model '{lm.name}' has no tokenizer files; the analysis reads corpus text - save the "
                         "tokenizer beside the model (save_pretrained)")
    n = min(cfg.positions, lm.max_positions)
    causal = lm.is_causal
    thresholds = D.Thresholds(cfg.prev_window, cfg.prev_min, cfg.prev_max_cv, cfg.context_min_tokens,
                              cfg.decay_min_r2, cfg.duplicate_min)
    dest_id, dest_text = _token_id(lm.tokenizer, cfg.dest_token)
    notes = []
    if cfg.layer > 0:
        notes.append(f"layer {cfg.layer}: the embeddings are not this layer's whole input, so the split is of the direct "
                     "path only (its fit to the real scores below says how much that explains)")
    if lm.arch.stream is None:
        notes.append(f"{lm.model_type} rotates queries and keys by position (rotary): a score has no token/position "
                     "split, so only the empirical positional pattern is given (attention averaged over "
                     f"content-shuffled texts); classes from it, no duplicate-token test")
        pattern = _empirical(cfg, lm, ctx.docs, n, causal)
        classes = D.classify(torch.as_tensor(pattern), causal, np.full(lm.n_heads, np.nan), thresholds)
        return DecomposeResult(cfg, causal, False, pattern, "empirical: attention averaged over content-shuffled "
                               "texts", dest_text, classes, notes, timings={"total_s": time.perf_counter() - t0})
    aff, w = D.affine_of(lm, cfg.layer), layer_weights(lm, cfg.layer, dtype=torch.float64, device="cpu")
    seqs = _sequences(lm, ctx.docs, n, cfg.texts + cfg.heldout)
    fit_seqs, held = seqs[:cfg.texts], seqs[cfg.texts:]
    scale_p = D.scale_by_position(aff, fit_seqs, n)
    t1 = time.perf_counter()

    # the terms and how well the linearised sum reproduces the model's own scores
    real = [_real_scores(lm, cfg.layer, seq) for seq in fit_seqs]
    stats = {k: _Moments(lm.n_heads) for k in D.TERMS}  # streamed: the terms of 16 texts of 400 tokens are ~1 GB
    res, worst, exact_worst = (np.zeros(lm.n_heads) for _ in range(3))
    real_moments = _Moments(lm.n_heads)
    for seq, r in zip(fit_seqs, real):
        lin = D.sequence_terms(aff, w, seq, torch.as_tensor(scale_p))
        exact = sum(D.sequence_terms(aff, w, seq).values())
        approx = sum(lin.values())
        for k, v in lin.items():
            stats[k].add(v.reshape(lm.n_heads, -1))
        worst = np.maximum(worst, (approx - r).abs().amax((1, 2)).numpy())
        exact_worst = np.maximum(exact_worst, (exact - r).abs().amax((1, 2)).numpy())
        res += ((approx - r).square_()).sum((1, 2)).numpy()
        real_moments.add(r.reshape(lm.n_heads, -1))
    tot = real_moments.m2.numpy()
    r2 = 1 - res / np.maximum(tot, 1e-300)
    fit = [(h, float(r2[h]), float(worst[h]), float(exact_worst[h])) for h in range(lm.n_heads)]
    term_rows = []
    for k, m in stats.items():
        std = torch.sqrt(m.m2 / (m.n - 1))
        for h in range(lm.n_heads):
            term_rows.append((h, k, float(m.mean[h]), float(std[h]), float(m.abs_sum[h] / m.n)))
    t2 = time.perf_counter()

    # positional patterns, classes
    use_exact = cfg.layernorm == "exact"
    exact_pattern = D.positional_pattern(aff, w, dest_id, n, causal)
    linear_pattern = D.positional_pattern(aff, w, dest_id, n, causal, scale=scale_p)
    pattern = exact_pattern if use_exact else linear_pattern
    diff = float((exact_pattern - linear_pattern).abs().max())
    from attnlab.induction.protocols import token_spec_for

    pool = token_spec_for(lm).ordinary_ids
    g = torch.Generator().manual_seed(cfg.seed)
    sample = pool[torch.randperm(len(pool), generator=g)[:cfg.duplicate_sample]]
    duplicate = D.duplicate_scores(aff, w, sample, float(np.median(scale_p)))
    classes = D.classify(pattern, causal, duplicate, thresholds)
    t3 = time.perf_counter()

    # normalisation factors: the measurement and the independent model
    real_t = torch.stack([r for r in real if r.shape[-1] == real[0].shape[-1]]) if real else None
    norm_rows = []
    if real_t is not None and real_t.shape[0] >= 2:
        log_z, n_eff = D.normalisers(real_t, causal)
        bags = [D.make_bag(aff, w, h, fit_seqs, scale_p, causal, n) for h in range(lm.n_heads)]
        every = torch.cat([torch.as_tensor(s) for s in fit_seqs])
        for h in range(lm.n_heads):
            f, _ = bags[h].token_factor(aff, w, every)
            cv = float(f.std() / f.mean())
            spread = log_z[:, h].std(0)
            mean_eff = n_eff[:, h].mean(0)
            for p in range(0, log_z.shape[-1]):
                norm_rows.append((h, p, float(log_z[:, h, p].mean()), float(spread[p]), float(mean_eff[p]),
                                  cv / math.sqrt(float(mean_eff[p]))))
    else:
        bags = []
        notes.append("normalisation factors need at least two corpus texts of the same length; none measured")
    t4 = time.perf_counter()

    # the bag of tokens and the first-layer neurons
    contextual = [r["head"] for r in classes if r["class"] == "contextual"]
    neuron_rows, scale = [], {"attention_input": "per position: the median over corpus texts of the LayerNorm scale "
                                                 "(sigma of token + position + constant) at that position"}
    if not contextual:
        notes.append("no head is contextual by the rule, so there is no bag of tokens to read")
    elif lm.arch.mlp_in is None:
        notes.append(f"{lm.model_type}'s MLP input is not described by its family record; neurons skipped")
    else:
        ctx_bags = [bags[h] if bags else D.make_bag(aff, w, h, fit_seqs, scale_p, causal, n) for h in contextual]
        neuron_rows, s_mlp = _neurons(lm, cfg, aff, w, ctx_bags, held, pool)
        scale["mlp_input"] = f"one scale: the median over held-out positions of the MLP norm's sigma ({s_mlp:.4g})"
    t5 = time.perf_counter()
    return DecomposeResult(cfg, causal, True, pattern.numpy(), ("exact LayerNorm" if use_exact else
                                                                "linearised LayerNorm") + ": softmax over key positions "
                           "of the score on a sequence of one repeated token (no special tokens)", dest_text, classes,
                           notes, term_rows, fit, diff, norm_rows, neuron_rows, scale,
                           {"setup_s": t1 - t0, "terms_s": t2 - t1, "patterns_s": t3 - t2, "normalisers_s": t4 - t3,
                            "neurons_s": t5 - t4})


def _neurons(lm, cfg, aff, w, bags, held, pool, top: int = 5):
    """Per MLP neuron of the layer: the correlation of the bag-of-tokens approximation of its pre-activation with
    the real one on held-out text, the range of token contributions, and the top tokens each way."""
    from attnlab.circuits.ablation import head_outputs

    norm, (w_in, b_in) = lm.arch.mlp_in(lm.base, cfg.layer)
    w_in, b_in = w_in.double().cpu(), b_in.double().cpu()
    ctx_heads = {b.head for b in bags}
    real_pre, approx_pre, sigmas = [], [], []
    gamma, beta = norm.weight.detach().double().cpu(), norm.bias.detach().double().cpu()

    def mlp_norm(v):  # the model's own LayerNorm, in float64
        return torch.nn.functional.layer_norm(v, norm.normalized_shape, gamma, beta, norm.eps)

    with torch.inference_mode():
        for seq in held:
            ids = torch.as_tensor([seq]).to(lm.device)
            hidden = lm.base(input_ids=ids, output_hidden_states=True).hidden_states[cfg.layer][0].double().cpu()
            z = head_outputs(lm, ids)[cfg.layer][0].double().cpu()  # [S, H, d]
            per_head = torch.einsum("shd,hdD->shD", z, w.W_O)  # [S, H, D]
            mid = hidden + per_head.sum(1) + w.b_O
            approx = hidden + w.b_O + per_head[:, [h for h in range(lm.n_heads) if h not in ctx_heads]].sum(1)
            for bag in bags:
                approx = approx + bag.output(aff, w, torch.as_tensor(seq))
            real_pre.append(mlp_norm(mid) @ w_in + b_in)
            approx_pre.append(mlp_norm(approx) @ w_in + b_in)
            sigmas.append(torch.sqrt(mid.var(-1, unbiased=False) + norm.eps))
    real_pre, approx_pre = torch.cat(real_pre), torch.cat(approx_pre)
    rc, ac = real_pre - real_pre.mean(0), approx_pre - approx_pre.mean(0)
    corr = (rc * ac).sum(0) / torch.sqrt((rc ** 2).sum(0) * (ac ** 2).sum(0)).clamp_min(1e-300)
    s_mlp = float(torch.cat(sigmas).median())
    ext = D.extended_embeddings(aff, w, bags, pool)  # [V', D]
    k = min(top, len(pool))
    his, los = [], []  # per chunk of the pool, each neuron's top k tokens each way: ([F, k] values, [F, k] ids)
    for s in range(0, len(pool), 4096):
        chunk = ext[s:s + 4096]
        contrib = (gamma * (chunk - chunk.mean(-1, keepdim=True)) / s_mlp) @ w_in  # [c, F]
        per_neuron = contrib.T.contiguous()  # [F, c]: topk along contiguous rows is faster than down columns
        for found, largest in ((his, True), (los, False)):
            v, i = per_neuron.topk(min(k, len(chunk)), dim=-1, largest=largest)
            found.append((v, i + s))

    def merged(found, largest):  # [k, F] values and ids over the whole pool
        v, i = torch.cat([f[0] for f in found], -1), torch.cat([f[1] for f in found], -1)
        v, keep = v.topk(k, dim=-1, largest=largest)
        return v.T, i.gather(-1, keep).T

    best, worst = merged(his, True), merged(los, False)
    names = lambda idx: lm.tokenizer.convert_ids_to_tokens(pool[idx].tolist())  # noqa: E731
    rows = []
    spread = best[0][0] - worst[0][0]  # the largest contribution minus the smallest
    for neuron in range(w_in.shape[1]):
        rows.append((neuron, float(corr[neuron]), float(spread[neuron]), names(best[1][:, neuron]),
                     names(worst[1][:, neuron])))
    rows.sort(key=lambda r: -r[2])
    return rows, s_mlp


# ---------------------------------------------------------------- save, summary


def save(folder, result: DecomposeResult, ctx=None) -> list[str]:
    cfg = result.config
    out = ["classes.csv", "positional_patterns.npz"]
    n = result.pattern.shape[1]
    with atomic_path(folder / "positional_patterns.npz") as tmp:
        np.savez_compressed(tmp, pattern=result.pattern.astype(np.float32), dest_positions=np.arange(n),
                            dest_token=np.array(result.dest_token), method=np.array(result.method))
    keys = ["class", "prev_mass", "prev_cv", "n_eff", "decay_left", "decay_left_r2", "decay_right", "decay_right_r2",
            "duplicate_logit"]
    write_csv(folder / "classes.csv", ["layer", "head", *keys],
              ([cfg.layer, r["head"], *(csv_cell(r[k]) for k in keys)] for r in result.classes))
    if result.exact:
        write_csv(folder / "decomposition.csv", ["layer", "head", "term", "mean", "std", "mean_abs"],
                  ([cfg.layer, h, t, csv_cell(m), csv_cell(s), csv_cell(a)] for h, t, m, s, a in result.terms))
        write_csv(folder / "fit.csv", ["layer", "head", "r2_linearised", "max_error_linearised", "max_error_exact"],
                  ([cfg.layer, h, csv_cell(r2), csv_cell(e), csv_cell(x)] for h, r2, e, x in result.fit))
        out += ["decomposition.csv", "fit.csv"]
    if result.normalisers:
        write_csv(folder / "normalisers.csv", ["layer", "head", "position", "mean_log_z", "spread_log_z", "n_eff",
                                               "predicted_spread"],
                  ([cfg.layer, *(csv_cell(v) for v in row)] for row in result.normalisers))
        out.append("normalisers.csv")
    if result.neurons:
        write_csv(folder / "neurons.csv", ["layer", "neuron", "correlation", "contribution_range", "top_positive",
                                           "top_negative"],
                  ([cfg.layer, nrn, csv_cell(r), csv_cell(rng), " ".join(pos), " ".join(neg)]
                   for nrn, r, rng, pos, neg in result.neurons))
        out.append("neurons.csv")
    return out


def summary(result: DecomposeResult, ctx=None) -> dict:
    cfg = result.config
    classes = {f"L{cfg.layer}H{r['head']}": r["class"] for r in result.classes}
    out = {"causal": result.causal, "exact_split": result.exact, "pattern_method": result.method,
           "dest_token": result.dest_token, "classes": classes, "notes": result.notes, "layernorm_scales": result.scale,
           "thresholds": {k: getattr(cfg, k) for k in ("prev_window", "prev_min", "prev_max_cv", "context_min_tokens",
                                                        "decay_min_r2", "duplicate_min")},
           "timings": {k: round(v, 3) for k, v in result.timings.items()}}
    if result.exact:
        r2 = [f[1] for f in result.fit]
        out["fit"] = {"median_r2": float(np.median(r2)), "worst_head": f"L{cfg.layer}H{int(np.argmin(r2))}",
                      "worst_r2": float(min(r2)), "max_error_exact": max(f[3] for f in result.fit)}
        out["linear_vs_exact_pattern"] = result.linear_vs_exact
    if result.normalisers:
        rows = np.array([r[2:] for r in result.normalisers], dtype=float)
        heads = np.array([r[0] for r in result.normalisers])
        measured = [float(np.nanmean(rows[heads == h, 1])) for h in sorted(set(heads))]
        predicted = [float(np.nanmean(rows[heads == h, 3])) for h in sorted(set(heads))]
        ok = np.isfinite(measured) & np.isfinite(predicted)
        corr = float(np.corrcoef(np.array(measured)[ok], np.array(predicted)[ok])[0, 1]) if ok.sum() > 2 else None
        out["normalisers"] = {"spread_by_head": measured, "predicted_by_head": predicted,
                              "correlation_measured_vs_predicted": corr}
    if result.neurons:
        out["neurons"] = [{"neuron": n, "correlation": round(r, 4), "top_positive": pos[:3], "top_negative": neg[:3]}
                          for n, r, _, pos, neg in result.neurons[:10]]
        corr = np.array([r[1] for r in result.neurons])
        out["neuron_correlation_median"] = float(np.median(corr))
    return out
