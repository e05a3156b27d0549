"""Convert a COCO instance annotation file and its images into WebDataset tar shards.

One process:   build_shards.py --annotations A.json --images DIR --out OUT --workers 8
Slurm array:   build_shards.py ... --shard-index $SLURM_ARRAY_TASK_ID --num-shard-jobs N
then once:     build_shards.py ... --merge-only
"""

import argparse
import sys

from pipeline.data.coco import CocoFormatError
from pipeline.data.sharding import IncompleteShards, build_shards, merge_only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotations", required=True, help="COCO instances JSON file")
    parser.add_argument("--images", required=True, help="directory the file_names are under")
    parser.add_argument("--out", required=True, help="output directory of the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--shard-index", type=int, default=0, help="this job's index (Slurm)")
    parser.add_argument("--num-shard-jobs", type=int, default=1, help="jobs in the array")
    parser.add_argument(
        "--merge-only", action="store_true", help="check all shards, write index.json"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.merge_only:
            index = merge_only(args.annotations, args.out, shard_size=args.shard_size)
            print(
                f"{index['total_samples']} samples in {len(index['shards'])} shards in "
                f"{args.out}; skipped {index['skipped_images']} images, dropped "
                f"{index['dropped_annotations']} annotations"
            )
            return 0 if index["total_samples"] else 1
        summary = build_shards(
            args.annotations,
            args.images,
            args.out,
            shard_size=args.shard_size,
            workers=args.workers,
            shard_index=args.shard_index,
            num_shard_jobs=args.num_shard_jobs,
            merge=args.num_shard_jobs == 1,
            progress=not args.no_progress,
        )
    except CocoFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (IncompleteShards, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.line())
    handled = summary.shards_built or summary.shards_kept
    return 1 if handled and summary.samples == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
