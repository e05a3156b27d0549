"""``python -m pipeline.config FILE [key=value ...]`` prints the resolved config.

``--keys`` lists every key with its default and docstring instead.
"""

import sys

from .cli import describe_keys, parse_config_args
from .loader import dump_config


def main(argv: list[str]) -> int:
    if argv[:1] == ["--keys"]:
        print("\n".join(describe_keys()))
        return 0
    cfg, _ = parse_config_args(argv, description=__doc__)
    sys.stdout.write(dump_config(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
