"""The Figure 3/4 UMAP grids: attnlab's settings against umap-learn's defaults, quality and time.

attnlab (``geometry/embedding.py``): exact cosine neighbours from matrix products handed to umap-learn
(``precomputed_knn``), 200 epochs, each constant's layout warm-started from its inner neighbour's (outwards from the
middle constant, the two sides in two threads), numba's on-disk cache. umap-learn's defaults (what the previous release ran): ``UMAP(metric="cosine", n_neighbors=15,
min_dist=0.1, random_state=seed)``, spectral initialisation, 500 epochs for small data.

For every panel (head x constant) this prints sklearn's ``trustworthiness`` (k = 10, cosine, the metric UMAP
embeds) of both embeddings of the SAME points and seed, the difference (target: attnlab >= default - 0.01), each
default fit's time and attnlab's time for the six; then the wall time of one whole grid as a user runs it, ``attnlab geometry umap`` in a fresh
process (target <= 15 s, process start-up and imports included).

Points: all-MiniLM-L6-v2 (the embedded model) on 100 sentences of the shared Simple English Wikipedia sample,
the heads the offline ``reproduce`` picks for Figures 3 and 4 (L5H7, L0H5), 1,500 queries and 1,500 keys.

    python benchmarks/bench_umap.py [--heads 5:7,0:5] [--no-default]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki" / "articles-400.jsonl.gz"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="5:7,0:5", help="layer:head,... (default: the offline reproduce's picks)")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--no-default", action="store_true", help="skip umap-learn's defaults (the slow side)")
    args = ap.parse_args()
    if not Path(args.corpus).exists():
        sys.exit(f"bench_umap: corpus {args.corpus} not found; pass --corpus")

    import torch
    from sklearn.manifold import trustworthiness

    from attnlab.core.corpus import load_corpus
    from attnlab.core.models import embedded_model_path, load_model
    from attnlab.geometry.embedding import cached_numba, panel_embeddings
    from attnlab.geometry.experiment import UMAPConfig
    from attnlab.geometry.study import collect, data_key, displayed_constants, umap_panels
    from attnlab.geometry.scaling import scaling_metrics

    model = embedded_model_path()
    lm = load_model(model, device="cpu")
    heads = [tuple(int(x) for x in h.split(":")) for h in args.heads.split(",")]
    base = UMAPConfig(model=model, corpus=args.corpus, metric="scaled_weighted_corr", max_points=1500)
    sample, qk = collect(base, lm, data_key(base, lm), load_corpus(args.corpus), 32, False, None)
    metrics = scaling_metrics(qk.queries, qk.keys, qk.lengths, base.constants, causal=qk.causal)
    print(f"all-MiniLM-L6-v2, {len(sample.token_ids)} sentences, {int(qk.lengths.sum())} tokens; "
          f"{torch.get_num_threads()} torch threads\n")
    print(f"{'panel':14s} {'points':>6s} {'T default':>9s} {'T attnlab':>9s} {'diff':>7s} {'s default':>9s}")
    worst, t_new, t_old = np.inf, 0.0, 0.0
    for layer, head in heads:
        cfg = UMAPConfig(**{**base.__dict__, "layer": layer, "head": head})
        optimum = metrics.best(cfg.metric)[layer * qk.n_heads + head].item()
        panels = list(umap_panels(cfg, qk, displayed_constants(cfg.umap_constants, optimum)))
        t = time.perf_counter()
        layouts = panel_embeddings([(q, k) for _, q, k in panels], seed=cfg.seed)
        t_new += (dt_new := time.perf_counter() - t)
        print(f"L{layer}H{head}: attnlab's six fits (two threads) {dt_new:.2f} s")
        for (c, q, k), layout in zip(panels, layouts):
            points = np.concatenate([q, k])
            tw_new = trustworthiness(points, layout, n_neighbors=10, metric="cosine")
            line = f"L{layer}H{head} c={c:<6.3g} {len(points):6d} "
            if args.no_default:
                print(line + f"{'-':>9s} {tw_new:9.4f}")
                continue
            with cached_numba():
                import umap

                t = time.perf_counter()
                default = umap.UMAP(n_components=2, metric="cosine", n_neighbors=15, min_dist=0.1,
                                    random_state=cfg.seed).fit_transform(points)
                t_old += (dt_old := time.perf_counter() - t)
            tw_old = trustworthiness(points, default, n_neighbors=10, metric="cosine")
            worst = min(worst, tw_new - tw_old)
            print(line + f"{tw_old:9.4f} {tw_new:9.4f} {tw_new - tw_old:+7.4f} {dt_old:9.2f}")
    if not args.no_default:
        print(f"\nfits: default {t_old:.1f} s, attnlab {t_new:.1f} s (ratio {t_new / t_old:.2f}); worst trustworthiness "
              f"difference {worst:+.4f} ({'PASS' if worst >= -0.01 else 'FAIL'}: within 0.01 of the default)")

    # one grid as a user runs it: a fresh process, imports and model load included
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    for layer, head in heads:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "attnlab.experiments.cli", "geometry", "umap", "--model", model, "--corpus",
                   args.corpus, "--layer", str(layer), "--head", str(head), "--metric", "scaled_weighted_corr",
                   "--out", out, "--no-progress"]
            t = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t
        status = "PASS" if run.returncode == 0 and wall <= 15 else "FAIL"
        print(f"attnlab geometry umap --layer {layer} --head {head} (fresh process, six constants): {wall:.1f} s "
              f"wall, exit {run.returncode} ({status}: <= 15 s)" + ("" if run.returncode == 0 else
                                                                   "\n" + run.stderr[-400:]))


if __name__ == "__main__":
    main()
