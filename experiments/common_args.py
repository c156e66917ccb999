"""Options and output lines several subcommands share, declared once (torch-free)."""

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


def add_runtime_args(parser) -> None:
    """Where and how a run computes - never part of its result (so not of its reuse key)."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="sequences per forward pass (default: chosen from a 1 GB memory budget)")
    parser.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                        help="spread a model larger than one GPU over the devices with accelerate (replaces --device; "
                             "pip install 'attnlab[scale]') (default: none)")


def add_output_args(parser, help_out: str = "output folder") -> None:
    """--out, --force and --no-progress, which every experiment that writes a run folder takes."""
    parser.add_argument("--out", required=True, help=f"{help_out} (required)")
    parser.add_argument("--force", action="store_true",
                        help="recompute even if a finished run with these settings exists (default: off)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (default: off)")


def print_wrote(meta: dict, out, extra: str = "") -> None:
    """The closing line of a command: every file of the run, meta.json included."""
    state = "reused finished run in" if meta.get("reused") else "wrote"
    files = list(meta["outputs"]) + ["meta.json"]
    print(f"{state} {out}: " + ", ".join(files) + extra)
