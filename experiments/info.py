"""``attnlab info``: what a model is, as attnlab sees it (layers, heads, positions, source)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from attnlab.experiments.common_args import add_runtime_args

    p = sub.add_parser("info", help="load a model and print its shape and provenance",
                       description="Load a model the way every experiment does and print what attnlab sees. "
                                   "Supported families: `attnlab info --model M` names the model's; the list is in "
                                   "docs/families.md.")
    p.add_argument("--model", required=True, help="Hub id (e.g. bert-base-uncased, gpt2) or a local folder (required)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit); Hub ids only (default: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32)")
    p.add_argument("--masked-lm", action="store_true", help="also load (and check for) the LM head (default: off)")
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from attnlab.core.models import load_model

    lm = load_model(args.model, masked_lm=args.masked_lm, device=args.device, dtype=args.dtype,
                    revision=args.revision)
    info = dict(lm.meta, layers=lm.n_layers, heads=lm.n_heads, d_model=lm.d_model, d_head=lm.d_head,
                max_positions=lm.max_positions, vocab_size=lm.vocab_size)
    print(json.dumps(info, indent=2))
    return 0
