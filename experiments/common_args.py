"""Options and output lines several subcommands share, declared once."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (so 0 and negatives are refused before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_args(parser, default_model: str | None = None) -> None:
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="Hub id (e.g. bert-base-uncased, prajjwal1/bert-tiny, gpt2) or a local folder"
                        + (f" (default: {default_model})" if default_model else ""))
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit); Hub ids only")
    add_runtime_args(parser)


def add_runtime_args(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: float32)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="sequences per forward pass (default: chosen from a 1 GB memory budget)")
    parser.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                        help="spread a model larger than one GPU over the devices with accelerate (replaces --device; "
                             "pip install 'attnlab[scale]')")


def add_output_args(parser, help_out: str = "output directory") -> None:
    """--out, --force and --no-progress, which every experiment that writes a run folder takes."""
    parser.add_argument("--out", required=True, help=help_out)
    parser.add_argument("--force", action="store_true",
                        help="recompute even if a finished run with these settings exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def print_wrote(meta: dict, out, extra: str = "") -> None:
    """The closing line of a command: every file of the run, meta.json included."""
    state = "reused finished run in" if meta.get("reused") else "wrote"
    files = list(meta["outputs"]) + ["meta.json"]
    print(f"{state} {out}: " + ", ".join(files) + extra)
