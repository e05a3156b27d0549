"""Side-by-side comparison of MLflow runs: the params that differ, the final metrics, and a
PNG of chosen metrics' curves against the step (``launch/compare.py``).

The evaluation keys its metrics by dataset (``shapes_val/segm/AP``, ``coco_val2017/segm/AP``),
so a metric name may be a pattern where ``*`` stands for any characters (``*/segm/AP``: every
dataset's mask AP); it becomes each metric the runs logged that it matches, one table row and
one curve per run of each, in one panel per pattern.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_METRICS = ("loss/total", "*/segm/AP")
# Under outputs/ (ignored by git), not in whatever folder compare.py is run from.
DEFAULT_OUT = "outputs/compare.png"
# Metrics of the final-values table, when the runs have them (all of them with --all).
SUMMARY_PATTERNS = ("loss/total", "*/bbox/AP", "*/segm/AP", "*/images_evaluated", "*/images_failed")
# Params that differ between any two runs by nature, not by choice.
IGNORED_PARAMS = ("tracking.run_name",)


@dataclass
class RunSummary:
    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    """The last logged value of each metric (what MLflow keeps as the run's metric)."""


class CompareError(ValueError):
    """No runs to compare, or a run id that is not there; one line."""


def select_runs(
    client,
    *,
    run_ids: Sequence[str] = (),
    experiment: str | None = None,
    filter_string: str = "",
    max_runs: int = 20,
) -> list[RunSummary]:
    """The runs given by id, or those of ``experiment`` matching ``filter_string`` (MLflow's
    search syntax, e.g. ``params.train.lr = '0.02'``), oldest first."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException as error:
                raise CompareError(f"run {run_id}: {_first_line(error)}") from None
    elif experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise CompareError(f"no MLflow experiment named {experiment!r}")
        try:
            runs = client.search_runs(
                [found.experiment_id], filter_string=filter_string, max_results=max_runs,
                order_by=["attributes.start_time ASC"],
            )  # fmt: skip
        except MlflowException as error:  # the filter's syntax, checked by the store
            raise CompareError(f"--filter {filter_string!r}: {_first_line(error)}") from None
    else:
        raise CompareError("give run ids, or an experiment (and a filter)")
    if not runs:
        raise CompareError(f"no runs in {experiment!r} match {filter_string!r}")
    return [
        RunSummary(r.info.run_id, r.info.run_name or r.info.run_id[:8], dict(r.data.params),
                   dict(r.data.metrics))
        for r in runs
    ]  # fmt: skip


def _first_line(error: Exception) -> str:
    """The first line of MLflow's message, without the error code a server's reply adds."""
    reply = getattr(error, "json", None)
    text = reply["message"] if isinstance(reply, dict) and "message" in reply else str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0]


def matches(pattern: str, key: str) -> bool:
    """Whether ``key`` is ``pattern``, where ``*`` stands for any characters (no others are
    special)."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, key) is not None


def expand_metrics(runs: Sequence[RunSummary], names: Sequence[str]) -> dict[str, list[str]]:
    """{name: the metrics the runs logged that it matches, sorted} (an exact name: itself,
    when logged)."""
    logged = sorted({key for run in runs for key in run.metrics})
    return {name: [key for key in logged if matches(name, key)] for name in names}


def check_metric_names(runs: Sequence[RunSummary], names: Sequence[str]):
    """Refuse names (or patterns) that match no metric a run logged (a typo would plot an
    empty panel), listing those that they did log."""
    logged = sorted({key for run in runs for key in run.metrics})
    unknown = [name for name, keys in expand_metrics(runs, names).items() if not keys]
    if unknown:
        raise CompareError(
            f"--metrics: {', '.join(unknown)}: logged by none of the runs; they logged: "
            f"{', '.join(logged) or 'nothing'}"
        )


def differing_params(runs: Sequence[RunSummary]) -> dict[str, list[str | None]]:
    """Params whose value is not the same in every run (absent counts as a value)."""
    keys = sorted({key for run in runs for key in run.params} - set(IGNORED_PARAMS))
    table = {key: [run.params.get(key) for run in runs] for key in keys}
    return {key: values for key, values in table.items() if len(set(values)) > 1}


def final_metrics(
    runs: Sequence[RunSummary], names: Sequence[str] = (), everything: bool = False
) -> dict[str, list[float | None]]:
    """The final value of each metric per run: those ``names`` (or patterns) match, then the
    summary ones (or every metric with ``everything``)."""
    present = sorted({key for run in runs for key in run.metrics})
    named = [key for keys in expand_metrics(runs, names).values() for key in keys]
    summary = [
        key
        for key in present
        if everything or any(matches(pattern, key) for pattern in SUMMARY_PATTERNS)
    ]
    chosen = list(dict.fromkeys(named + summary))
    return {key: [run.metrics.get(key) for run in runs] for key in chosen}


def format_table(title: str, rows: dict[str, list], runs: Sequence[RunSummary]) -> str:
    """A plain text table, one column per run."""
    if not rows:
        return f"{title}: none"

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if math.isfinite(value) else str(value)
        return str(value)

    header = [title, *(f"{run.name} ({run.run_id[:8]})" for run in runs)]
    body = [[key, *map(cell, values)] for key, values in rows.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True))
             for row in [header, *body]]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def metric_curves(
    client, runs: Sequence[RunSummary], metrics: Sequence[str]
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric: {run_id: [(step, value), ...]}} of each metric's full history."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for metric in metrics:
        curves[metric] = {}
        for run in runs:
            history = client.get_metric_history(run.run_id, metric)
            points = sorted((m.step, m.value) for m in history)
            if points:
                curves[metric][run.run_id] = points
    return curves


def plot_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]],
    runs: Sequence[RunSummary],
    path: str | Path,
    panels: dict[str, list[str]] | None = None,
) -> Path:
    """One panel per metric, one line per run, against the step; written as PNG. ``panels``
    ({title: metrics}, default one per metric of ``curves``) puts several metrics in one
    panel (a pattern's matches): one line per run and metric."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    names = {run.run_id: f"{run.name} ({run.run_id[:8]})" for run in runs}
    panels = panels if panels is not None else {metric: [metric] for metric in curves}
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * max(1, len(panels))), squeeze=False)
    for axis, (title, keys) in zip(axes[:, 0], panels.items(), strict=True):
        drawn = False
        for key in keys:
            for run in runs:
                points = curves.get(key, {}).get(run.run_id)
                if not points:
                    continue
                label = names[run.run_id] + (f" {key}" if keys != [title] else "")
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o" if len(points) < 20 else None, label=label)
                drawn = True
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if drawn:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "not logged by these runs", ha="center", transform=axis.transAxes)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def compare_runs(
    client,
    *,
    run_ids: Sequence[str] = (),
    experiment: str | None = None,
    filter_string: str = "",
    metrics: Sequence[str] | None = None,
    out: str | Path = DEFAULT_OUT,
    max_runs: int = 20,
    all_metrics: bool = False,
) -> tuple[str, Path]:
    """The printed comparison (params that differ, final metrics) and the curves' PNG.
    ``metrics`` (names or ``*`` patterns) must each match a metric some run logged; None
    plots DEFAULT_METRICS, as there are."""
    runs = select_runs(client, run_ids=run_ids, experiment=experiment,
                       filter_string=filter_string, max_runs=max_runs)  # fmt: skip
    if metrics is None:
        metrics = DEFAULT_METRICS
    else:
        check_metric_names(runs, metrics)
    text = "\n\n".join(
        [
            format_table("param", differing_params(runs), runs),
            format_table("final metric", final_metrics(runs, metrics, all_metrics), runs),
        ]
    )
    panels = expand_metrics(runs, metrics)
    keys = list(dict.fromkeys(key for found in panels.values() for key in found))
    path = plot_curves(metric_curves(client, runs, keys), runs, out, panels=panels)
    return text, path
