"""Convert a COCO instance annotation file and its images into WebDataset tar shards.

One process:   build_shards.py --annotations A.json --images DIR --out OUT --workers 8
Slurm array:   build_shards.py ... --shard-index $SLURM_ARRAY_TASK_ID --num-shard-jobs N
then once:     build_shards.py ... --merge-only

index.json names the dataset: --name, else ``<folder>_<stem>`` of the annotation file (its
stem without ``instances_``, after the nearest folder that is not annotations/, shards/ or
images/: data/shapes/annotations/instances_val.json -> shapes_val). The evaluation keys its
metrics by it (shapes_val/segm/AP). Characters other than letters, digits, _ . - become _.

The run that writes index.json (a single run, or the merge of an array) is tracked in
MLflow: its arguments, counts, images/s, the manifest and the skip report. The URI is
--tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite file in OUT/mlflow/.
"""

import argparse
import sys
import time
from pathlib import Path

from pipeline.data.coco import CocoFormatError
from pipeline.data.manifest import safe_name
from pipeline.data.sharding import IncompleteShards, build_shards, merge_only
from pipeline.tracking import Tracker


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
    parser.add_argument("--name", help="the dataset's name (default: from the annotation file)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI")
    parser.add_argument("--experiment", default="maskrcnn", help="MLflow experiment")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    if args.name is not None and safe_name(args.name) != args.name:
        if not safe_name(args.name):
            parser.error(f"--name {args.name!r}: no letter or digit in it")
        print(f"note: --name {args.name!r} is used as {safe_name(args.name)!r} (metric-key safe)")
    start = time.monotonic()
    try:
        if args.merge_only:
            index = merge_only(
                args.annotations, args.out, shard_size=args.shard_size, name=args.name
            )
            print(
                f"{index['total_samples']} samples in {len(index['shards'])} shards in "
                f"{args.out}; skipped {index['skipped_images']} images, dropped "
                f"{index['dropped_annotations']} annotations; dataset name: {index['name']}"
            )
            track(args, index, time.monotonic() - start, images=index["total_samples"])
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
            name=args.name,
        )
    except CocoFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (IncompleteShards, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.line())
    if summary.index is not None:
        print(
            f"dataset name: {summary.index['name']} (its metrics: {summary.index['name']}/segm/AP)"
        )
    if summary.index is not None:
        track(args, summary.index, time.monotonic() - start, images=summary.samples)
    handled = summary.shards_built or summary.shards_kept
    return 1 if handled and summary.samples == 0 else 0


def track(args: argparse.Namespace, index: dict, seconds: float, images: int) -> None:
    """Log the run that wrote the manifest; a tracking failure only warns (see Tracker)."""
    if args.no_tracking:
        return
    out = Path(args.out)
    with Tracker(
        run_dir=out / "mlflow", stage="shards", uri=args.tracking_uri,
        experiment=args.experiment, run_name=f"shards-{out.name}", resume=False,
    ) as tracker:  # fmt: skip
        tracker.log_params({k: v for k, v in vars(args).items() if k != "no_tracking"})
        tracker.log_metrics(
            {
                "samples": index["total_samples"],
                "shards": len(index["shards"]),
                "skipped_images": index.get("skipped_images", 0),
                "dropped_annotations": index.get("dropped_annotations", 0),
                "images_per_s": images / max(seconds, 1e-9),
            },
            step=0,
        )
        for name in ("index.json", "skipped.json"):
            if (out / name).exists():
                tracker.log_artifact(out / name)


if __name__ == "__main__":
    sys.exit(main())
