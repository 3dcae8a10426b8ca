"""Flags generated from config dataclasses: one field is one flag, with the field's default.

The default and the type always come from the dataclass, so a shell caller and a Python caller
get the same value from one place. The rest of a flag (help, its name when it differs from the
field's, aliases, choices, a parser) comes from the field's metadata, or, for a dataclass that
stays free of command-line details, from the command's `specs` mapping (field name -> settings):

- help: the help text (required: a field without one is a missing flag, so building fails)
- flag / aliases: `--max-len-b` for `max_new_tokens`; extra names such as `--batch-size`
- positional: a metavar; the field becomes a positional argument
- choices, parse (a str -> value function), metavar, group (an argument-group title)
- nargs: several values after one flag (`--data a.jsonl.zst b.jsonl.zst`), given as a list
- negatable: a bool with both --x and --no-x; other bools are one flag that flips the default
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, fields

from moelab.errors import MoelabError

_METAVARS = {int: "N", float: "X", str: "STR"}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *,
                         specs: Mapping[str, dict] | None = None,
                         group: argparse._ArgumentGroup | None = None) -> None:
    """One flag per field of the dataclass `cls`, added to `group` (or to `parser`)."""
    hints = typing.get_type_hints(cls)
    titled: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        spec = {**f.metadata, **(specs or {}).get(f.name, {})}
        if "help" not in spec:
            raise TypeError(f"{cls.__name__}.{f.name} has no flag: give it help text in its "
                            "field metadata or in the command's specs")
        if "positional" in spec:
            target = parser
        elif "group" in spec:
            target = titled.setdefault(spec["group"], parser.add_argument_group(spec["group"]))
        else:
            target = group or parser
        _add_field(target, f, hints[f.name], spec)


def config_kwargs(args: argparse.Namespace, cls: type) -> dict:
    """The parsed values of `cls`'s fields, ready for `cls(**...)`."""
    return {f.name: getattr(args, f.name) for f in fields(cls)}


def build_config(args: argparse.Namespace, cls: type):
    """`cls` from the parsed flags; a value it refuses is a one-line MoelabError, not a
    traceback."""
    try:
        return cls(**config_kwargs(args, cls))
    except ValueError as e:
        raise MoelabError(str(e)) from None


def field_default(f: Field):
    """The value a Python caller gets when leaving the field out (MISSING when it is required)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _add_field(parser, f: Field, hint, spec: dict) -> None:
    if "positional" in spec:
        parser.add_argument(f.name, metavar=spec["positional"], help=spec["help"])
        return
    default = field_default(f)
    names = (spec.get("flag", "--" + f.name.replace("_", "-")), *spec.get("aliases", ()))
    kind = _base_type(hint)
    if kind is bool:
        if spec.get("negatable"):
            action = argparse.BooleanOptionalAction
        else:  # a flag that flips the default: --mean-pool-gating-network, --no-progress-bar
            action = "store_false" if default is True else "store_true"
        parser.add_argument(*names, dest=f.name, action=action, default=default,
                            help=spec["help"])
        return
    required = default is MISSING
    metavar = spec.get("metavar", None if "choices" in spec else _METAVARS.get(kind, "VALUE"))
    parser.add_argument(*names, dest=f.name, type=spec.get("parse", kind),
                        default=None if required else default, required=required,
                        choices=spec.get("choices"), help=_with_default(spec["help"], default),
                        metavar=metavar, nargs=spec.get("nargs"))


def _with_default(help_text: str, default) -> str:
    """The help text with the default shown, as the dataclass has it (lists comma-separated)."""
    if default is MISSING or default is None or default is False:
        return help_text
    shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
    return f"{help_text} (default: {shown.replace('%', '%%')})"


def _base_type(hint):
    """`int | None` -> int; tuple[...] and list[...] -> str (parsed by the field's `parse`)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return str if typing.get_origin(hint) in (tuple, list) else hint
