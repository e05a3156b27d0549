"""The one way every entry point reads its configuration: ``FILE [key=value ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .loader import ConfigError, _hints, field_docs, load_config
from .schema import Config


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", nargs="?", help="YAML config file (may inherit via _base_)")
    parser.add_argument("--config", dest="config_flag", metavar="FILE", help="same as CONFIG")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=0.02"
    )
    return parser


def parse_config_args(
    argv: typing.Sequence[str] | None = None, description: str = ""
) -> tuple[Config, argparse.Namespace]:
    """Parse ``FILE [key=value ...]``; on a config error print one line and exit with 2."""
    args = build_parser(description).parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no positional file, only overrides
        config, overrides = None, [config, *overrides]
    if args.config_flag is not None:
        if config is not None:
            build_parser(description).error(
                "give the config file once, positionally or by --config"
            )
        config = args.config_flag
    try:
        return load_config(config, overrides), args
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def describe_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per leaf key: its dotted name, type, default and docstring."""
    lines = []
    defaults = cls()
    docs = field_docs(cls)
    for name, hint in _hints(cls).items():
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            lines.extend(describe_keys(hint, key + "."))
        else:
            lines.append(
                f"{key} = {getattr(defaults, name)!r}  # {' '.join(docs.get(name, '').split())}"
            )
    return lines
