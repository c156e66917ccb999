"""How long probing takes: hidden states of 2,000 Simple Wikipedia sentences and a probe (plus its control task) for
every one of the embedded all-MiniLM-L6-v2's 7 layers (issue target: under 2 minutes on a 2-core CPU).

    python benchmarks/bench_probe.py [--task capitalised] [--sentences 2000]
"""

import argparse
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="capitalised")
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki"
                                            / "articles-400.jsonl.gz"))
    args = ap.parse_args()
    from attnlab.core.names import embedded_model_path
    from attnlab.core.runs import run_experiment
    from attnlab.probes.experiment import PROBE, ProbeConfig

    cfg = ProbeConfig(model=embedded_model_path(), labels=f"builtin:{args.task}", corpus=args.corpus,
                      sentences=args.sentences)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        meta = run_experiment(PROBE, cfg, out, device="cpu")
    total = time.perf_counter() - t
    c = meta["cost"]
    print(f"probe {args.task} on all-MiniLM-L6-v2: {c['sentences']} sentences, {c['units']} words, {c['tokens']} tokens, "
          f"{len(meta['layers'])} layers: {total:.1f} s in all (hidden states {c['hidden_s']:.1f} s)")


if __name__ == "__main__":
    main()
