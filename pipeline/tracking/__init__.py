"""Experiment tracking (MLflow) shared by the shard, train and eval stages."""

from .mlflow_tracker import (
    Tracker,
    build_tracker,
    flatten,
    git_commit,
    recorded_run,
    resolve_tracking_uri,
)

__all__ = [
    "Tracker",
    "build_tracker",
    "flatten",
    "git_commit",
    "recorded_run",
    "resolve_tracking_uri",
]
