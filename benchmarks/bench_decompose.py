"""How long the first-layer analysis takes for a bert-base-size model (issue target: under 60 s on a 2-core CPU).

A random-init BERT with bert-base-uncased's config (12 heads, d_model 768, 512 positions, the 30,522-token
vocabulary) costs what the real one costs. Random heads are rarely contextual, so the worst case is measured: every
head is treated as contextual, and the contextual-neuron part reads the whole vocabulary through all of them.

    python benchmarks/bench_decompose.py [--positions 512] [--corpus ../shared/data/simplewiki/articles-400.jsonl.gz]
"""

import argparse
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki"
                                            / "articles-400.jsonl.gz"))
    args = ap.parse_args()
    from transformers import BertConfig, BertModel

    from attnlab.core.corpus import load_corpus
    from attnlab.core.models import load_tokenizer, wrap_model
    from attnlab.core.names import embedded_model_path
    from attnlab.core.runs import RunContext
    from attnlab.firstlayer import analysis, decompose
    from attnlab.firstlayer.experiment import DecomposeConfig

    torch.manual_seed(0)
    lm = wrap_model(BertModel(BertConfig()), tokenizer=load_tokenizer(embedded_model_path()), name="random bert-base")
    real_classify = decompose.classify

    def all_contextual(*a, **k):  # the worst case: the bag of every head through every neuron
        return [dict(r, **{"class": "contextual"}) for r in real_classify(*a, **k)]

    analysis.D.classify = all_contextual
    docs = load_corpus(args.corpus)
    cfg = DecomposeConfig(model="random bert-base", corpus=args.corpus, positions=args.positions)
    t = time.perf_counter()
    result = analysis.compute(cfg, lm, RunContext(docs=docs))
    total = time.perf_counter() - t
    print(f"decompose, layer 0 of a bert-base-size model, {args.positions} positions, {lm.vocab_size} tokens, "
          f"{len(result.neurons)} neurons, every head contextual: {total:.1f} s "
          f"({torch.get_num_threads()} threads)")
    for k, v in result.timings.items():
        print(f"  {k:14s} {v:6.1f} s")


if __name__ == "__main__":
    main()
