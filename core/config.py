"""One source of truth for an experiment's settings: the config dataclass. Defaults and help live on its fields
(:func:`option`); the command line is generated from them (:func:`add_config_args`, :func:`config_from_args`).

Torch-free on purpose: ``attnlab --help`` builds every subcommand from these records without importing torch.

>>> @dataclass
... class MyConfig:
...     model: str = option("bert-base-uncased", "Hub id or local folder")
...     trials: int = option(50, "number of random sequences", minimum=1)
...     layers: tuple = option((0, 1), "layers to read", item=int)
...     ablation: bool = option(True, "run the ablation scan", flag="--no-ablation")
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, field

from attnlab.core.errors import InputError


def option(default=MISSING, help: str = "", *, flag: str | None = None, choices=None, minimum=None,
           item=None, metavar: str | None = None, cli: bool = True, required: bool = False,
           show_default: str | None = None):
    """A config field with what the command line needs to know about it.

    ``flag``: the option's spelling (default ``--field-name``; for a bool that defaults to True, a
    ``--no-...`` flag that turns it off); ``choices``: allowed values; ``minimum``: smallest allowed number;
    ``item``: element type of a tuple field, written comma-separated on the command line; ``cli=False``: not
    an option (set by other code); ``required``: the command line must give it (the Python API keeps the
    default); ``show_default``: the default as the help states it, when repr-like text would mislead."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "minimum": minimum,
            "item": item, "metavar": metavar, "cli": cli, "required": required, "show_default": show_default}
    return field(default=default, metadata={"attnlab": meta})


def _meta(f) -> dict:
    return f.metadata.get("attnlab", {"help": "", "cli": True})


def _base_type(annotation):
    """``int | None`` -> (int, True); ``tuple[int, ...]`` -> (tuple, False)."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
    origin = typing.get_origin(annotation)
    return (origin or annotation), optional


def _number(kind, minimum, name):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = name
    return parse


def _items(kind):
    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",")]
        try:
            return tuple(kind(p) for p in parts if p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    parse.__name__ = "list"
    return parse


def _default_text(f, meta) -> str:
    if meta.get("show_default") is not None:
        return meta["show_default"]
    value = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                        else None)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_args(parser, config_type, skip=()) -> None:
    """One option per field of ``config_type`` (a dataclass made with :func:`option`), each help ending with its
    default. Fields in ``skip`` or with ``cli=False`` are left out."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        meta = _meta(f)
        if f.name in skip or not meta.get("cli", True) or not f.init:
            continue
        kind, _ = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                              else None)
        text = meta.get("help") or f.name.replace("_", " ")
        if kind is bool:
            flag = meta.get("flag") or (f"--no-{f.name.replace('_', '-')}" if default else
                                        f"--{f.name.replace('_', '-')}")
            turns_off = flag.startswith("--no-")
            parser.add_argument(flag, dest=f.name, action="store_false" if turns_off else "store_true",
                                default=default, help=f"{text} (default: {'on' if default else 'off'})")
            continue
        flag = meta.get("flag") or f"--{f.name.replace('_', '-')}"
        kwargs = {"dest": f.name, "default": default, "metavar": meta.get("metavar")}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if kind is tuple:
            kwargs["type"] = _items(meta.get("item") or str)
        elif kind in (int, float):
            kwargs["type"] = _number(kind, meta.get("minimum"), kind.__name__)
        if meta.get("required"):
            kwargs["required"] = True
            kwargs.pop("default")
            parser.add_argument(flag, help=f"{text} (required)", **kwargs)
            continue
        parser.add_argument(flag, help=f"{text} (default: {_default_text(f, meta)})", **kwargs)


def config_from_args(config_type, args, **overrides):
    """The config the parsed ``args`` describe (fields the command line does not set keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)
              if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return config_type(**values)


def check_fields(obj) -> None:
    """The checks a config's fields declare, for configs built in Python as for the command line: a value among
    the field's ``choices``; a whole number (not a bool) of at least ``minimum`` for int fields that state one; a
    number for float fields. One-line errors that name the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        meta, value = _meta(f), getattr(obj, f.name)
        kind, optional = _base_type(hints[f.name])
        if value is None and (optional or f.default is None):
            continue
        if meta.get("choices"):
            check_choice(value, meta["choices"], f.name.replace("_", " "))
        if kind is int and meta.get("minimum") is not None:
            check_whole(value, f.name, meta["minimum"])
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{f.name} must be a number, got {value!r}")


def check_choice(value, choices, what: str) -> None:
    """A one-line error for a value outside ``choices`` (configs built in Python get the same check as the CLI)."""
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; use one of {', '.join(map(str, choices))}")


def check_whole(value, what: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{what} must be a whole number of at least {minimum}, got {value!r}")
