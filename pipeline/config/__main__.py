"""``python -m pipeline.config FILE [key=value ...]`` prints the resolved config.

``--keys`` lists every key with its default and docstring instead; ``--markdown`` prints the
Markdown reference of every key (docs/config.md is its output).
"""

import sys

from .cli import describe_keys, markdown_reference, parse_config_args
from .loader import dump_config


def main(argv: list[str]) -> int:
    if argv[:1] == ["--keys"]:
        print("\n".join(describe_keys()))
        return 0
    if argv[:1] == ["--markdown"]:
        sys.stdout.write(markdown_reference())
        return 0
    cfg, _ = parse_config_args(argv, description=__doc__)
    sys.stdout.write(dump_config(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
