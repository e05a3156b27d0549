"""Print resolved config values, one a line, for the Slurm scripts.

``python slurm/config_value.py train.output_dir,data.root --config FILE [key=value ...]``
"""

import sys

from pipeline.config import parse_config_args


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    cfg, _ = parse_config_args(argv[1:])
    for key in argv[0].split(","):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
