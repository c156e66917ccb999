"""``attnlab info``: what a model is, as attnlab sees it (layers, heads, positions, source)."""

from __future__ import annotations

import json

from attnlab.core.models import SUPPORTED_MODEL_TYPES, load_model
from attnlab.experiments.common_args import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="load a model and print its shape and provenance",
                       description="Load a model the way every experiment does and print what attnlab "
                                   f"sees. Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    add_model_args(p)
    p.add_argument("--masked-lm", action="store_true", help="also load (and check for) the masked-LM head")
    p.set_defaults(func=run)


def run(args) -> int:
    lm = load_model(args.model, masked_lm=args.masked_lm, device=args.device, dtype=args.dtype,
                    revision=args.revision)
    info = dict(lm.meta, layers=lm.n_layers, heads=lm.n_heads, d_model=lm.d_model, d_head=lm.d_head,
                max_positions=lm.max_positions, vocab_size=lm.vocab_size)
    print(json.dumps(info, indent=2))
    return 0
