"""The ``attnlab`` command. Each experiment module contributes its subcommand via ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from attnlab.core.errors import AttnlabError

# Modules that define ``add_parser(subparsers)``; each owns its subcommand(s).
SUBCOMMAND_MODULES = [
    "attnlab.experiments.info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnlab",
        description=(
            "Experiments on attention in BERT-style transformers: induction heads on repeated random "
            "tokens, in-context learning scores, query/key geometry and pattern projections."
        ),
        epilog="Run 'attnlab COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--verbose", action="store_true", help="show library warnings and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except AttnlabError as exc:
        if args.verbose:
            raise
        print(f"attnlab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
