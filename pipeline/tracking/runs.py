"""Finding, checking and creating the MLflow run that a spool session logs into (on the
sender's thread; every function may raise what the client raises)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Every run the tracker creates carries its spool id (the session record's ``local``): a
# process killed after MLflow created its run but before it recorded the id leaves a run that
# its successor finds by this tag instead of creating a second one.
SPOOL_TAG = "spool_run"
# Identical metric points (key, step, timestamp, value) are one row to the SQL store: it
# ignores a resent one. The file store appends it again, and what a server does depends on
# its own store, so only these URIs are spared the check of a batch that was in flight.
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def ignores_identical_points(uri: str) -> bool:
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in SQL_SCHEMES


def is_permanent(exc: BaseException) -> bool:
    """True for errors that no retry can fix: HTTP 4xx (except timeout / rate limit)."""
    if isinstance(exc, (FileNotFoundError, ImportError)):  # an artifact gone; no mlflow
        return True
    status = None
    if callable(getattr(exc, "get_http_status_code", None)):  # MlflowException
        status = exc.get_http_status_code()
    elif getattr(exc, "response", None) is not None:  # requests.HTTPError (artifact upload)
        status = getattr(exc.response, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def run_state(client, run_id: str) -> str:
    """ "active", "gone" (no such run, or deleted) or "refused" (another error no retry fixes:
    e.g. a malformed id); a transient error is raised."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return "gone"
        if is_permanent(exc):
            return "refused"
        raise
    return "gone" if run.info.lifecycle_stage == "deleted" else "active"


def find_created(client, session: dict[str, Any]) -> str | None:
    """The run an earlier process created for this spool run, if MLflow has one."""
    found = client.get_experiment_by_name(session["experiment"])
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.{SPOOL_TAG} = '{session['local']}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def artifacts_beside(uri: str) -> str | None:
    """``mlartifacts/`` beside a SQLite store file (``sqlite:////abs/mlflow.db`` ->
    ``file:///abs/mlartifacts``), where an experiment created on it keeps its runs'
    artifacts: not in the folder of whichever job created it first (the demo's first job
    builds shards inside the dataset folder), nor in ./mlruns of its working directory.
    None for other stores, whose server decides."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :] in ("", ":memory:"):
        return None
    database = Path(uri[len(prefix) :].split("?", 1)[0])
    return (database.resolve().parent / "mlartifacts").as_uri()


def create_run(client, session: dict[str, Any], local_store_dir: str | None) -> str:
    tags = {**session.get("create_tags", {}), SPOOL_TAG: session["local"]}
    experiment_id = _experiment_id(client, session["experiment"], local_store_dir)
    run = client.create_run(experiment_id, run_name=session.get("run_name") or None, tags=tags)
    return run.info.run_id


def _experiment_id(client, name: str, local_store_dir: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # With a local SQLite store, keep artifacts beside it instead of in ./mlruns of
    # whatever directory the job was started from.
    try:
        return client.create_experiment(name, artifact_location=local_store_dir)
    except MlflowException as exc:  # another job created it just now
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def held_points(client, run_id: str, keys: set[str]) -> set[tuple[str, int, int, float]]:
    """(key, step, timestamp, value) of every point the store holds for these keys."""
    held = set()
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            held.add((key, metric.step, metric.timestamp, metric.value))
    return held


def deliver(client, run_id: str, kind: str, payload):
    """One job of a chunk (see ``chunks.Chunk.build_jobs``)."""
    from mlflow.entities import Metric, Param, RunTag

    if kind == "params":
        params = [Param(k, v) for k, v in payload]
        client.log_batch(run_id, params=params, synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload], synchronous=True)
    elif kind == "metrics":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in payload]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "end":
        client.set_terminated(run_id, status=payload["status"])
    elif kind == "session":
        tags = dict(payload.get("tags") or {})
        if payload.get("resumed"):  # a run that ended KILLED goes on
            client.update_run(run_id, status="RUNNING")
            tags["resumed"] = "true"
        # A new run got its tags when it was created.
        if tags and (payload.get("resumed") or payload.get("attach")):
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()],
                             synchronous=True)  # fmt: skip
