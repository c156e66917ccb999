"""How long the tuned lens takes to train for a MiniLM-size masked LM (issue target: under 5 minutes on a 2-core CPU).

A random-init BERT masked LM with all-MiniLM-L6-v2's shape (6 layers, d_model 384, 12 heads, the 30,522-token
vocabulary and the MLM head) costs what such a model costs; the defaults of `attnlab lens --tuned` (8,192 training
tokens of Simple Wikipedia, 200 steps of 256 tokens).

    python benchmarks/bench_lens.py [--steps 200] [--train-tokens 8192]
"""

import argparse
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-tokens", type=int, default=8192)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki"
                                            / "articles-400.jsonl.gz"))
    args = ap.parse_args()
    from transformers import BertConfig, BertForMaskedLM

    from attnlab.core.corpus import load_corpus
    from attnlab.core.models import load_tokenizer, wrap_model
    from attnlab.core.names import embedded_model_path
    from attnlab.text.experiment import LensConfig
    from attnlab.text.lens import train_tuned_lens

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    lm = wrap_model(BertForMaskedLM(cfg), tokenizer=load_tokenizer(embedded_model_path()), name="random MiniLM-size")
    lens_cfg = LensConfig(model="random", text="x", tuned=True, train_tokens=args.train_tokens, steps=args.steps)
    t = time.perf_counter()
    _, stats = train_tuned_lens(lm, load_corpus(args.corpus), lens_cfg)
    print(f"tuned lens, MiniLM-size masked LM, {stats['train_tokens']} training tokens, {args.steps} steps: "
          f"{time.perf_counter() - t:.1f} s ({torch.get_num_threads()} threads); held-out KL "
          f"{stats['heldout_kl_before']:.3f} -> {stats['heldout_kl_after']:.3f}")


if __name__ == "__main__":
    main()
