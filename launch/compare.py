"""Compare MLflow runs: the params that differ, the final metrics side by side, and a PNG of
chosen metrics against the step for all the runs.

    python launch/compare.py RUN_ID RUN_ID ... [--metrics loss/total,eval/segm/AP]
    python launch/compare.py --experiment maskrcnn --filter "params.train.lr = '0.02'"

The tracking URI is --uri, else MLFLOW_TRACKING_URI. Exit code 2: no such runs (one line).
"""

import argparse
import os
import sys

from pipeline.evaluation.compare import DEFAULT_METRICS, CompareError, compare_runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_ID", help="runs to compare")
    parser.add_argument("--experiment", help="compare the runs of this experiment")
    parser.add_argument("--filter", default="", help="MLflow search filter (with --experiment)")
    parser.add_argument("--max-runs", type=int, default=20, help="at most this many runs")
    parser.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                        help="MLflow tracking URI")  # fmt: skip
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma-separated metrics to plot against the step")  # fmt: skip
    parser.add_argument("--all-metrics", action="store_true", help="table every final metric")
    parser.add_argument("--out", default="compare.png", help="PNG of the curves")
    args = parser.parse_args(argv)
    if not args.uri:
        parser.error("no tracking URI: give --uri or set MLFLOW_TRACKING_URI")
    if bool(args.runs) == bool(args.experiment):
        parser.error("give run ids or --experiment, not both")

    from mlflow.tracking import MlflowClient

    try:
        text, path = compare_runs(
            MlflowClient(tracking_uri=args.uri),
            run_ids=args.runs,
            experiment=args.experiment,
            filter_string=args.filter,
            metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
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
