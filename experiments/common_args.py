"""Options several subcommands share, declared once."""

from __future__ import annotations


def add_model_args(parser, default_model: str | None = None) -> None:
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="Hub id (e.g. bert-base-uncased, prajjwal1/bert-tiny, gpt2) or a local folder"
                        + (f" (default: {default_model})" if default_model else ""))
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    add_runtime_args(parser)


def add_runtime_args(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: float32)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per forward pass (default: chosen from a 1 GB memory budget)")
