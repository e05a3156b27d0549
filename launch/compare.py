"""Compare MLflow runs: the params that differ, the final metrics side by side, and a PNG of
chosen metrics against the step for all the runs.

    python launch/compare.py RUN_ID RUN_ID ... [--metrics 'loss/total,*/segm/AP']
    python launch/compare.py --experiment maskrcnn --filter "params.train.lr = '0.02'"

The evaluation's metrics are keyed by dataset (shapes_val/segm/AP, coco_val2017/segm/AP); a
metric may be a pattern, ``*`` standing for any characters: each metric it matches is a row of
the table (one column per run) and a curve per run in the pattern's panel. By default the
table has every dataset's bbox and segm AP and the plot loss/total and */segm/AP.

Params are strings to MLflow: quote their values in a filter. The tracking URI is --uri, else
MLFLOW_TRACKING_URI. Exit code 2: no such runs, a bad filter or metric name (one line).
"""

import argparse
import os
import sys

from pipeline.evaluation.compare import DEFAULT_METRICS, DEFAULT_OUT, CompareError, compare_runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_ID", help="runs to compare")
    parser.add_argument("--experiment", help="compare the runs of this experiment")
    parser.add_argument("--filter", default="", help="MLflow search filter (with --experiment)")
    parser.add_argument("--max-runs", type=int, default=20, help="at most this many runs")
    parser.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                        help="MLflow tracking URI")  # fmt: skip
    parser.add_argument("--metrics", help="comma-separated metrics or * patterns to plot "
                        f"against the step (default: {','.join(DEFAULT_METRICS)})")  # fmt: skip
    parser.add_argument("--all-metrics", action="store_true", help="table every final metric")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"PNG of the curves ({DEFAULT_OUT})")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.uri:
        parser.error("no tracking URI: give --uri or set MLFLOW_TRACKING_URI")
    if not args.runs and not args.experiment:
        parser.error("give run ids, or --experiment (and --filter)")
    if args.runs and args.experiment:
        parser.error("give run ids or --experiment, not both")
    if args.filter and not args.experiment:
        parser.error("--filter goes with --experiment")  # not silently ignored with run ids
    # Names given are checked against the runs' metrics; the defaults are not (a training
    # run without an evaluation has no */segm/AP, and its panel says so).
    metrics = None
    if args.metrics is not None:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]

    from mlflow.tracking import MlflowClient

    try:
        text, path = compare_runs(
            MlflowClient(tracking_uri=args.uri),
            run_ids=args.runs,
            experiment=args.experiment,
            filter_string=args.filter,
            metrics=metrics,
            out=args.out,
            max_runs=args.max_runs,
            all_metrics=args.all_metrics,
        )
    except CompareError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    print(text)
    print(f"\ncurves: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
