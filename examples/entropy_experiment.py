"""A new experiment in one file (the worked example of docs/experiments.md): how spread out each head's attention
from the [MASK] is, on standard RRT sequences, in nats - beside the entropy of uniform attention (its chance level).

    attnlab --plugin examples/entropy_experiment.py entropy --model bert-base-uncased --out runs/entropy

The science is three small functions; the record names them. Run folders, reuse keys (this file's source
included), staging, the lock, meta.json, the command line and its help all come from attnlab's one runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnlab.core.config import option
from attnlab.core.runs import Experiment, register_experiment


@dataclass
class EntropyConfig:
    model: str = option("bert-base-uncased", "masked LM: Hub id or local folder")
    trials: int = option(16, "random sequences", minimum=1)
    seq_len: int = option(50, "length n of the random block X", minimum=3)
    seed: int = option(0, "random seed")
    revision: str | None = option(None, "Hub revision; Hub ids only")
    dtype: str = option("float32", "model dtype", choices=("float32", "bfloat16", "float16"))


def compute(cfg: EntropyConfig, lm, ctx) -> dict:
    """Entropy of every head's [MASK] row, per trial: ``{"entropy": [T, L, H], "uniform": float}``."""
    from attnlab import extract_attention
    from attnlab.induction import get_variant, make_protocol, token_spec_for
    from attnlab.induction.variants import build_batch

    protocol = make_protocol("clean", token_spec_for(lm))
    batch = build_batch(get_variant("standard"), protocol, cfg.trials, cfg.seq_len, cfg.seed,
                        max_positions=lm.max_positions)
    rows = extract_attention(lm, batch.input_ids, None, batch.mask_index[:, None]).attention[:, 0]  # [T, L, H, S]
    entropy = -(rows * rows.clamp_min(1e-30).log()).sum(-1)  # [T, L, H]
    return {"entropy": entropy.double().numpy(), "uniform": math.log(batch.input_ids.shape[1])}


def save(folder, result: dict, ctx) -> list[str]:
    from attnlab.core.outputs import write_csv

    mean = result["entropy"].mean(0)
    write_csv(folder / "entropy.csv", ["layer", "head", "entropy_nats", "uniform_nats"],
              ([layer, head, f"{mean[layer, head]:.6g}", f"{result['uniform']:.6g}"]
               for layer in range(mean.shape[0]) for head in range(mean.shape[1])))
    return ["entropy.csv"]


def summary(result: dict, ctx) -> dict:
    mean = result["entropy"].mean(0)
    layer, head = divmod(int(mean.argmin()), mean.shape[1])
    return {"sharpest": {"head": f"L{layer}H{head}", "entropy": float(mean[layer, head])},
            "uniform_entropy": result["uniform"]}


def describe(meta: dict) -> list[str]:
    s = meta["sharpest"]
    return [f"entropy: sharpest head {s['head']} {s['entropy']:.3f} nats (uniform attention: "
            f"{meta['uniform_entropy']:.3f})"]


ENTROPY = register_experiment(Experiment(
    name="entropy", config=EntropyConfig, compute=compute, save=save, summary=summary, describe=describe,
    help="entropy of each head's attention from [MASK] on RRT sequences (an example plugin)",
))
