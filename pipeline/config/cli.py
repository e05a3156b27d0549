"""The one way every entry point reads its configuration: ``FILE [key=value ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from .loader import ConfigError, _hints, field_docs, load_config
from .schema import Config


def build_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, prog=prog)
    parser.add_argument("config", nargs="?", help="YAML config file (may inherit via _base_)")
    parser.add_argument("--config", dest="config_flag", metavar="FILE", help="same as CONFIG")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=0.02"
    )
    return parser


def parse_args(
    parser: argparse.ArgumentParser, argv: typing.Sequence[str] | None = None
) -> tuple[argparse.Namespace, str | None, list[str]]:
    """(args, config file or None, overrides) from ``FILE [key=value ...]`` and the parser's
    options, in any order: plain parse_args leaves ``FILE --flag key=value``'s overrides over
    as "unrecognized arguments"."""
    args = parser.parse_intermixed_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no positional file, only overrides
        config, overrides = None, [config, *overrides]
    if args.config_flag is not None:
        if config is not None:
            parser.error("give the config file once, positionally or by --config")
        config = args.config_flag
    return args, config, overrides


def parse_config_args(
    argv: typing.Sequence[str] | None = None,
    description: str = "",
    parser: argparse.ArgumentParser | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse ``FILE [key=value ...]``; on a config error print one line and exit with 2."""
    args, config, overrides = parse_args(parser or build_parser(description), argv)
    try:
        return load_config(config, overrides), args
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def describe_keys(cls: type = Config, prefix: str = "", values: typing.Any = None) -> list[str]:
    """One line per leaf key: its dotted name, value and docstring; the value is taken from
    ``values`` (a resolved config), else the default."""
    lines = []
    values = cls() if values is None else values
    docs = field_docs(cls)
    for name, hint in _hints(cls).items():
        key = prefix + name
        value = getattr(values, name)
        if dataclasses.is_dataclass(hint):
            lines.extend(describe_keys(hint, key + ".", value))
        else:
            lines.append(f"{key} = {value!r}  # {_one_line(docs.get(name, ''))}")
    return lines


# --- the Markdown reference (docs/config.md) -------------------------------------------------

REFERENCE_PATH = "docs/config.md"
REGENERATE_COMMAND = f"python -m pipeline.config --markdown > {REFERENCE_PATH}"


def markdown_reference(cls: type = Config) -> str:
    """The Markdown reference of every key (``python -m pipeline.config --markdown``): one
    section per config class, in schema order, each a table of its keys with their type,
    default and docstring. docs/config.md holds it; a test keeps it current."""
    lines = [
        "# Configuration reference",
        "",
        f"> Generated from the docstrings of `pipeline/config/schema.py` by "
        f"`{REGENERATE_COMMAND}`; edit the schema, then regenerate.",
        "",
        "Every stage reads this one config: a YAML file (which may inherit others with "
        "`_base_:`) plus dotted `key=value` overrides on the command line, e.g. "
        "`train.lr=0.01 model.backbone.depth=34`. In YAML, a key `a.b.c` is written nested "
        "(`a:` / `b:` / `c: value`). `python -m pipeline.config FILE [key=value ...]` prints "
        "the resolved config.",
    ]
    lines.extend(_markdown_section(cls, prefix="", title_doc="", level=1))
    return "\n".join(lines) + "\n"


def _markdown_section(cls: type, prefix: str, title_doc: str, level: int) -> list[str]:
    """The section of ``cls`` (its leaf keys as a table), then its sub-sections."""
    defaults = cls()
    docs = field_docs(cls)
    hints = _hints(cls)
    lines = []
    if prefix:
        lines += ["", f"{'#' * level} `{prefix.rstrip('.')}`", ""]
        if title_doc:
            lines += [_one_line(title_doc), ""]
    leaves = [name for name, hint in hints.items() if not dataclasses.is_dataclass(hint)]
    if leaves:
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name in leaves:
            cells = (
                f"`{prefix}{name}`",
                _type_name(hints[name]),
                f"`{_yaml_value(getattr(defaults, name))}`",
                _one_line(docs.get(name, "")),
            )
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    for name, hint in hints.items():
        if dataclasses.is_dataclass(hint):
            lines += _markdown_section(hint, f"{prefix}{name}.", docs.get(name, ""), level + 1)
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _type_name(hint: typing.Any) -> str:
    """int, float, list[int], ... or the choices of a Literal, as they are written in YAML."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = [f"`{_yaml_value(c)}`" for c in typing.get_args(hint)]
        return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def _yaml_value(value: typing.Any) -> str:
    """A default as it would be written in a YAML file or an override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    return repr(value)
