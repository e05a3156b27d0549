"""Evaluate Mask R-CNN with the COCO metrics:
``torchrun [opts] launch/evaluate.py --config FILE --checkpoint PATH --out DIR [key=value ...]``.

PATH is a checkpoint file (ours, or converted from torchvision), a DeepSpeed checkpoint
directory, or a training output_dir (its latest checkpoint). ``--watch TRAIN_DIR`` instead
evaluates every checkpoint that training run writes, as it writes them, into DIR/step_N/,
until training has finished; on a run that has finished already, its final checkpoint only
(--all-checkpoints: every one kept). A checkpoint evaluated into DIR before is not again.
Without --config, the training run's config.yaml is used.
DIR receives metrics.json, bbox.json, segm.json and pictures/; the metrics go to MLflow,
keyed by the dataset: --name, else the val shards' name (shapes_val/segm/AP), so that one
checkpoint evaluated on two datasets keeps both. Characters other than letters, digits,
_ . - in a name become _.
Exit codes: 0 done, 2 bad config or checkpoint (one line on stderr).
"""

import logging
import sys

from pipeline.config import ConfigError
from pipeline.config.cli import build_parser, parse_args
from pipeline.data import ManifestError
from pipeline.data.manifest import safe_name
from pipeline.distributed import LaunchError, init_distributed, shutdown_distributed
from pipeline.evaluation import CheckpointError, config_for, evaluate_checkpoint, watch_training


def main(argv=None) -> int:
    parser = build_parser(__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="PATH", help="checkpoint file or directory")
    what.add_argument("--watch", metavar="TRAIN_DIR", help="a training output_dir to follow")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--name", help="the dataset's name in the metrics (default: the shards')")
    every = "--watch a finished run: every checkpoint, not the final one only"
    parser.add_argument("--all-checkpoints", action="store_true", help=every)
    args, config, overrides = parse_args(parser, argv)
    if args.all_checkpoints and not args.watch:
        parser.error("--all-checkpoints goes with --watch")
    if args.name is not None and not safe_name(args.name):
        parser.error(f"--name {args.name!r}: no letter or digit in it")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    try:
        cfg = config_for(config, overrides, args.checkpoint, args.watch)
    except (ConfigError, CheckpointError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    try:
        info = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s)
    except LaunchError as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    if info.is_main and args.name is not None and safe_name(args.name) != args.name:
        print(f"note: --name {args.name!r} is used as {safe_name(args.name)!r} (metric-key safe)")
    try:
        if args.watch:
            watch_training(cfg, args.watch, args.out, info, all_checkpoints=args.all_checkpoints,
                           dataset=args.name)  # fmt: skip
        else:
            evaluate_checkpoint(cfg, args.checkpoint, args.out, info, dataset=args.name)
    except (CheckpointError, ConfigError, ManifestError) as error:
        if info.is_main:
            print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
