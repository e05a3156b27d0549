"""``python -m pipeline.config FILE [key=value ...]`` prints the resolved config.

``--keys`` lists every key with its value and docstring instead; ``--markdown`` prints the
Markdown reference of every key (docs/config.md is its output).
"""

import sys

from .cli import build_parser, describe_keys, markdown_reference, parse_args
from .loader import ConfigError, dump_config, load_config

DESCRIPTION = (
    "Print the resolved config (a YAML file, which may inherit others with _base_, plus dotted "
    "key=value overrides) as YAML. Exit codes: 0 done, 2 bad config (one line on stderr)."
)


def main(argv: list[str]) -> int:
    parser = build_parser(DESCRIPTION, prog="python -m pipeline.config")
    show = parser.add_mutually_exclusive_group()
    show.add_argument(
        "--keys",
        action="store_true",
        help="instead, list every key with its value (the default, or the one FILE and the "
        "overrides give) and what it means",
    )
    show.add_argument(
        "--markdown",
        action="store_true",
        help="instead, print the Markdown reference of every key and its default "
        "(docs/config.md); takes no FILE or overrides",
    )
    args, config, overrides = parse_args(parser, argv)
    if args.markdown:
        if config is not None or overrides:
            parser.error(
                "--markdown documents the schema's defaults: give it no config file or overrides"
            )
        sys.stdout.write(markdown_reference())
        return 0
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.keys:
        print("\n".join(describe_keys(values=cfg)))
    else:
        sys.stdout.write(dump_config(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
