"""Write the synthetic shapes dataset (COCO format) used by the demo and the tests."""

import argparse
import sys

from pipeline.data.shapes import (
    DEFAULT_SIZE,
    DEFAULT_TRAIN_IMAGES,
    DEFAULT_VAL_IMAGES,
    make_shapes_dataset,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN_IMAGES, help="training images")
    parser.add_argument("--val", type=int, default=DEFAULT_VAL_IMAGES, help="validation images")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed; equal seeds give equal bytes")
    args = parser.parse_args(argv)
    try:
        written = make_shapes_dataset(args.out, args.train, args.val, args.size, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
