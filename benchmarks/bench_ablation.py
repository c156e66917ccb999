"""Head-ablation scan cost: prefix reuse vs L x H full forward passes (issue #14 target <= 0.6 on the CPU).

A random-init BERT masked LM with bert-base-uncased's config (the real model's cost), the rrt task (clean
standard RRT, n = --seq-len, --trials trials; two masked versions per trial). The baseline is measured in the
same process: the median time of one plain forward pass over both versions (with the MLM head at the masked
positions, as the metric needs) times L x H. The scan ablates every head alone, reusing the layer inputs.

    python benchmarks/bench_ablation.py [--trials 2] [--seq-len 100]
"""

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from attnlab.circuits.tasks import rrt_metrics, rrt_task, scan_rrt
from attnlab.core.models import wrap_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = wrap_model(BertForMaskedLM(BertConfig()).eval())
    task = rrt_task(lm, args.trials, args.seq_len, seed=0)
    rrt_metrics(lm, task)  # warm-up
    plain = []
    for _ in range(5):
        t = time.perf_counter()
        rrt_metrics(lm, task)
        plain.append(time.perf_counter() - t)
    one = statistics.median(plain)
    t = time.perf_counter()
    scan_rrt(lm, task)
    scan = time.perf_counter() - t
    heads = lm.n_layers * lm.n_heads
    print(f"bert-base random MLM, {args.trials} trials x 2 versions of {task.ids_second.shape[1]} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"plain forward (both versions, MLM head at the mask): {one * 1e3:.0f} ms; x {heads} heads = "
          f"{one * heads:.1f} s")
    print(f"scan with prefix reuse: {scan:.1f} s; ratio {scan / (one * heads):.2f} (target <= 0.6; "
          f"(L + 1) / (2 L) = {(lm.n_layers + 1) / (2 * lm.n_layers):.2f} is the layer count alone)")


if __name__ == "__main__":
    main()
