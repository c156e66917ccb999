"""The ``attnlab`` command: one subcommand per experiment record (options generated from its config), plus the
tools that drive them (reproduce, mosaic, induction-sweep, variants, view, info).

Torch-free until a command runs: ``attnlab --help``, every ``--help`` and every usage error answer without
importing torch or transformers.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys

from attnlab._version import __version__
from attnlab.core.errors import AttnlabError

# tools that are not a single experiment; each module's ``add_parser(subparsers)`` adds its subcommand(s)
TOOL_MODULES = [
    "attnlab.experiments.jobs",
    "attnlab.experiments.mosaic",
    "attnlab.experiments.view",
    "attnlab.experiments.info",
    "attnlab.experiments.organisms",
]

_LOADED_PLUGINS: set = set()


def load_plugins(specs: list[str]) -> None:
    """Import user modules (dotted names or .py files) so their @register_variant / register_experiment calls run.

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
                name = f"attnlab_plugin_{path.stem}"
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module  # dataclasses (a plugin experiment's config) look their module up here
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
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


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_experiment(sub, groups: dict, exp) -> argparse.ArgumentParser:
    """The subcommand of one record: its config's options, then the output and runtime options."""
    from attnlab.core.config import add_config_args
    from attnlab.experiments.common_args import add_output_args, add_runtime_args

    words = exp.words
    parent = sub
    if len(words) == 2:
        if words[0] not in groups:
            g = sub.add_parser(words[0], help=f"{words[0]} experiments", formatter_class=_formatter,
                               description=f"The {words[0]} experiments; see each one's --help.")
            groups[words[0]] = (g, g.add_subparsers(dest=f"{words[0]}_command", metavar="SUBCOMMAND"))
            g.set_defaults(func=lambda args, g=g: (g.print_help(), 2)[1])
        parent = groups[words[0]][1]
    p = parent.add_parser(words[-1], help=exp.help, description=exp.description or exp.help,
                          formatter_class=_formatter)
    add_config_args(p, exp.config)
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(func=functools.partial(run_record, exp))
    return p


def run_record(exp, args) -> int:
    """Run one experiment from parsed arguments; print its finding, then what it wrote."""
    from attnlab.core.config import config_from_args
    from attnlab.core.runs import run_experiment
    from attnlab.experiments.common_args import print_wrote

    cfg = config_from_args(exp.config, args)
    meta = run_experiment(exp, cfg, args.out, device=args.device, batch_size=args.batch_size, reuse=not args.force,
                          progress=not args.no_progress, warn=print)
    for line in (exp.fn("describe")(meta) if exp.describe else []):
        print(line)
    print_wrote(meta, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from attnlab.core.runs import experiments_available

    parser = argparse.ArgumentParser(
        prog="attnlab", formatter_class=_formatter,
        description="Experiments on attention in transformers, BERT-style masked LMs first: induction heads on "
                    "repeated random tokens (with chance, null and a verdict), in-context learning scores, "
                    "query/key geometry, pattern projections, and causal evidence about heads.",
        epilog="Run 'attnlab COMMAND --help' for the options of one command. The main job: "
               "attnlab reproduce --out runs/paper",
    )
    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show library warnings and full tracebacks")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module or .py file first, e.g. one that registers RRT variants or experiments "
                             "(repeatable; also read from ATTNLAB_PLUGINS, comma-separated)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    importlib.import_module("attnlab.experiments.reproduce").add_parser(sub)
    groups: dict = {}
    for exp in sorted(experiments_available(), key=lambda e: e.words):
        add_experiment(sub, groups, exp)
    for name in TOOL_MODULES:
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


def _plugin_specs(argv: list[str]) -> list[str]:
    """--plugin values (and ATTNLAB_PLUGINS) read before the parser is built: a plugin may add a subcommand."""
    specs = [p for p in os.environ.get("ATTNLAB_PLUGINS", "").split(",") if p]
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            specs.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            specs.append(arg.split("=", 1)[1])
    return specs


def _command_of(argv: list[str]) -> str:
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words else ""


def _one_line(exc: BaseException) -> str:
    """The error and its advice as one line, sentences kept apart."""
    message = " ".join(str(exc).split())
    advice = getattr(exc, "advice", None)
    return f"{message.rstrip('.')}. {advice}" if advice else message


def main(argv: list[str] | None = None) -> int:
    # figures are files: the headless backend, unless the user chose one (set before pyplot is imported)
    os.environ.setdefault("MPLBACKEND", "Agg")
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        load_plugins(_plugin_specs(argv))
    except AttnlabError as exc:
        if verbose:
            raise
        command = _command_of([a for a in argv if a not in _plugin_specs(argv)])
        print(f"attnlab{' ' + command if command else ''}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # for provenance in reports
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = " ".join(w for w in (args.command, *(getattr(args, f"{args.command}_command", None) or "",)) if w)
    if not args.verbose:
        import warnings

        # our own warnings as one plain line each, without the source line Python would print
        warnings.formatwarning = lambda message, *rest, **kw: f"attnlab {command}: warning: {message}\n"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("transformers").setLevel(logging.ERROR)
    if getattr(args, "device_map", None):
        args.device = f"map:{args.device_map}"  # the loader's spelling of accelerate's device_map
    try:
        if not args.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars: our own bars say where a run is
        return int(args.func(args) or 0)
    except AttnlabError as exc:
        if args.verbose:
            raise
        print(f"attnlab {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: disk full, read-only folders, names too long
        if args.verbose:
            raise
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"attnlab {command}: error: cannot read or write{where}: {exc.strerror or exc}; free space, fix the "
              "permissions or choose another output folder (--out)", file=sys.stderr)
        return 2
    except BaseException as exc:
        # Ctrl-C can land inside a C extension's import (matplotlib's Agg backend), which turns the
        # KeyboardInterrupt into an ImportError caused by it: treat any exception so caused as the interrupt.
        if args.verbose or not _caused_by_interrupt(exc):
            raise
        print(f"attnlab {command}: interrupted; finished runs are intact, an unfinished one left no "
              "results behind", file=sys.stderr)
        return 130


def run() -> int:
    """The ``attnlab`` command: :func:`main`, then an exit without the interpreter's last garbage collections. With
    torch, transformers and umap-learn loaded they cost about 0.7 s of every command's time after its output is
    written. ``gc.freeze()`` keeps them from walking every object; the exit handlers still run. Not in ``main``,
    which tests and notebooks call in a process that goes on. Large freed blocks stay with the process
    (:func:`~attnlab.core.resources.keep_freed_memory`): set here, for the command's own process, not in ``main``
    for the same reason."""
    from attnlab.core.resources import keep_freed_memory

    keep_freed_memory()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    import gc

    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(run())
