"""A real one-node Slurm cluster (session-scoped) and a tiny shapes dataset for its jobs."""

import shutil
from pathlib import Path

import pytest
from slurm_helpers import LocalSlurm, unavailable_reason

from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards


@pytest.fixture(scope="session")
def slurm_commands():
    """Slurm's commands (scontrol, sbatch, ...) on the PATH, installed with apt-get when
    missing; skipped, with the reason, where that cannot be done."""
    reason = None if shutil.which("scontrol") else unavailable_reason(install=True)
    if reason:
        pytest.skip(f"no Slurm commands: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd on this machine (installed with apt-get when missing);
    skipped, with the reason, where that cannot be done. Everything started is stopped at
    the end of the session, also after a failure."""
    reason = unavailable_reason(install=True)
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException:
        logs = cluster.logs()
        cluster.stop()
        pytest.fail(f"the local Slurm cluster did not start:\n{logs}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """16 training and 8 validation images of 128 px (COCO layout: annotations/, images/)."""
    root = tmp_path_factory.mktemp("slurm_shapes")
    make_shapes_dataset(root, 16, 8, 128, seed=5)
    return root


@pytest.fixture(scope="session")
def shapes_shards(shapes_root) -> dict[str, Path]:
    """The dataset's shards, built here (the pipeline test builds its own through Slurm)."""
    shards = {}
    for split in ("train", "val"):
        out = shapes_root / "prebuilt_shards" / split
        build_shards(
            shapes_root / "annotations" / f"instances_{split}.json",
            shapes_root / "images" / split,
            out,
            shard_size=8,
            progress=False,
        )
        shards[split] = out
    return shards
