"""Scaling metrics (Figure 2): vectorised vs the paper's per-pair loops, and the full 144-head workload.

(1) Ratio: ``geometry/scaling_reference.py`` (a port of the paper's per-pair Python loops) against
    ``scaling_metrics`` on the SAME queries and keys: every head x constant, weighted correlation (the
    reference) vs all three metrics (the fast path does more work). Target >= 100x.
(2) Figure 2's metrics for 144 heads x 100 sentences x 7 constants of a random-init bert-base (the real
    model's cost; q/k collection is excluded from the timing). Target <= 60 s on this CPU. Also times the
    continuous (log c) optimum search, which is beyond the paper.

Sentences: the shared Simple English Wikipedia sample when it is there, else random token sequences with
the same length range (8..64 tokens).
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from attnlab.core.models import wrap_model
from attnlab.geometry import scaling_reference as R
from attnlab.geometry.qk import collect_qk
from attnlab.geometry.scaling import (
    PAPER_CONSTANTS, _golden_refine, continuous_grid, continuous_optimum, head_chunks, scaling_metrics,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki" / "articles-400.jsonl.gz"


def sentences(n: int, seed: int):
    try:
        from attnlab.core.corpus import load_corpus
        from attnlab.core.models import embedded_model_path, load_tokenizer
        from attnlab.geometry.qk import sample_sentences

        tok = load_tokenizer(embedded_model_path())  # bert-base-uncased's vocabulary
        return sample_sentences(tok, load_corpus(str(CORPUS)), n, seed).token_ids, "simplewiki"
    except Exception:  # no corpus or tokenizer here: random tokens, same lengths
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(8, 65, (n,), generator=g)
        return [torch.randint(1000, 30000, (int(n_),), generator=g).tolist() for n_ in lengths], "random tokens"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=100)
    ap.add_argument("--ref-heads", type=int, default=4, help="heads the slow reference runs on")
    ap.add_argument("--ref-sentences", type=int, default=40, help="sentences the slow reference runs on")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = wrap_model(BertModel(BertConfig()).eval())
    ids, source = sentences(args.sentences, seed=0)
    qk = collect_qk(lm, ids)
    print(f"{len(ids)} sentences ({source}), {int(qk.lengths.sum())} tokens, random-init bert-base, "
          f"{torch.get_num_threads()} threads")

    # (1) same Q/K for both: the first ref-heads heads of layer 0 on the first ref-sentences sentences
    n, h = args.ref_sentences, args.ref_heads
    q, k, lengths = qk.queries[:n, :, :1, :h], qk.keys[:n, :, :1, :h], qk.lengths[:n]
    q, k = q[:, : int(lengths.max())], k[:, : int(lengths.max())]
    per_head = [[(q[i, :ln, 0, j].double().numpy(), k[i, :ln, 0, j].double().numpy())
                 for i, ln in enumerate(lengths.tolist())] for j in range(h)]
    t = time.perf_counter()
    for head in per_head:
        for c in PAPER_CONSTANTS:
            R.weighted_correlation(head, c, causal=False)
    slow = time.perf_counter() - t
    t = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        scaling_metrics(q, k, lengths, causal=False)
    fast = (time.perf_counter() - t) / repeats
    pairs = int((lengths ** 2).sum())
    print(f"(1) {h} heads x {n} sentences ({pairs} pairs/head) x {len(PAPER_CONSTANTS)} constants: "
          f"per-pair loops {slow:.2f} s, vectorised {fast * 1e3:.1f} ms; ratio {slow / fast:.0f}x (target >= 100x)")

    # (2) the full workload
    t = time.perf_counter()
    m = scaling_metrics(qk.queries, qk.keys, qk.lengths, causal=False)
    full = time.perf_counter() - t
    print(f"(2) 144 heads x {len(ids)} sentences ({m.n_pairs} pairs/head) x {len(PAPER_CONSTANTS)} constants, "
          f"all three metrics: {full:.2f} s (target <= 60 s)")
    t = time.perf_counter()
    continuous_optimum(qk.queries, qk.keys, qk.lengths, causal=False)
    print(f"    continuous optimum (25-point log grid + golden section): {time.perf_counter() - t:.2f} s")

    # (3) one pass over each head chunk's pair terms (paper grid + dense grid + golden search) vs the earlier
    # three passes (paper grid; dense grid; golden search building the pair terms again), same process
    t = time.perf_counter()
    one = scaling_metrics(qk.queries, qk.keys, qk.lengths, causal=False, continuous=True)
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    scaling_metrics(qk.queries, qk.keys, qk.lengths, causal=False)
    grid = continuous_grid()
    dense = scaling_metrics(qk.queries, qk.keys, qk.lengths, grid, causal=False)
    refined = torch.empty(m.n_under.shape[0], dtype=torch.float64)
    for g0, g1, terms in head_chunks(qk.queries, qk.keys, qk.lengths, causal=False, translate=True,
                                     heads_per_chunk=16):
        refined[g0:g1] = _golden_refine(terms, grid, dense.values["weighted_corr"][g0:g1], 24, 0.5, 3)
    t_three = time.perf_counter() - t
    assert torch.equal(torch.nan_to_num(refined), torch.nan_to_num(one.continuous["weighted_corr"]))
    print(f"(3) grids + continuous search: one pass {t_one:.2f} s vs three passes {t_three:.2f} s "
          f"({t_three / t_one:.2f}x); same optima")


if __name__ == "__main__":
    main()
