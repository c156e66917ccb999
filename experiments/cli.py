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
    "attnlab.experiments.induction",
    "attnlab.experiments.icl",
    "attnlab.experiments.patterns",
    "attnlab.experiments.geometry",
    "attnlab.experiments.reproduce",
    "attnlab.experiments.view",
    "attnlab.experiments.ablate",
    "attnlab.experiments.mosaic",
    "attnlab.experiments.heads",
]


_LOADED_PLUGINS: set = set()


def load_plugins(specs: list[str]) -> None:
    """Import user modules (dotted names or .py files) so their @register_variant calls run.

    Each plugin is imported once even when named twice (--plugin and ATTNLAB_PLUGINS); any failure inside
    it becomes a one-line error that names the plugin.
    """
    import importlib.util
    from pathlib import Path

    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        is_file = spec.endswith(".py") or "/" in spec
        ident = str(Path(spec).resolve()) if is_file else spec
        if ident in _LOADED_PLUGINS:
            continue
        try:
            if is_file:
                path = Path(spec)
                if not path.is_file():
                    raise AttnlabError(f"plugin file {spec} does not exist; pass an existing .py file or a module name")
                module_spec = importlib.util.spec_from_file_location(f"attnlab_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except AttnlabError as exc:
            raise AttnlabError(f"plugin {spec}: {exc}") from None
        except SyntaxError as exc:
            raise AttnlabError(f"plugin {spec} has a syntax error at line {exc.lineno}: {exc.msg}; fix the file") from None
        except ModuleNotFoundError as exc:
            raise AttnlabError(f"cannot import plugin {spec!r}: {exc}; check the name or install the module") from None
        except Exception as exc:
            raise AttnlabError(f"plugin {spec} failed while loading: {type(exc).__name__}: {exc}") from None
        _LOADED_PLUGINS.add(ident)


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
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module or .py file first, e.g. one that registers RRT variants "
                             "(repeatable; also read from ATTNLAB_PLUGINS, comma-separated)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _caused_by_interrupt(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt or was raised while handling / because of one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    # figures are files: the headless backend, unless the user chose one (set before pyplot is imported)
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for provenance in reports
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.verbose:
        import warnings

        # our own warnings as one plain line each, without the source line Python would print
        warnings.formatwarning = lambda message, *rest, **kw: f"attnlab {args.command}: warning: {message}\n"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: our own bars say where a run is
    if getattr(args, "device_map", None):
        args.device = f"map:{args.device_map}"  # the loader's spelling of accelerate's device_map
    try:
        load_plugins([p for p in os.environ.get("ATTNLAB_PLUGINS", "").split(",") if p] + args.plugin)
        return int(args.func(args) or 0)
    except AttnlabError as exc:
        if args.verbose:
            raise
        advice = getattr(exc, "advice", None)
        message = " ".join(str(exc).split())  # one line, whatever the cause text held
        print(f"attnlab {args.command}: error: {message}" + (f" {advice}" if advice else ""), file=sys.stderr)
        return 2
    except BaseException as exc:
        # Ctrl-C can land inside a C extension's import (matplotlib's Agg backend), which turns the
        # KeyboardInterrupt into an ImportError caused by it: treat any exception so caused as the interrupt.
        if args.verbose or not _caused_by_interrupt(exc):
            raise
        print(f"attnlab {args.command}: interrupted; finished runs are intact, an unfinished one left no "
              "results behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
