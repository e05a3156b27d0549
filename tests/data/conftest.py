"""Tiny shapes datasets and their shards, generated once per test session."""

import shutil
from pathlib import Path

import pytest
from data_helpers import IMAGE_SIZE, SHARD_SIZE, TRAIN_IMAGES, VAL_IMAGES

from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, TRAIN_IMAGES, VAL_IMAGES, IMAGE_SIZE, seed=3)
    return root


@pytest.fixture(scope="session")
def train_shards(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_shards")
    build_shards(
        shapes_root / "annotations" / "instances_train.json",
        shapes_root / "images" / "train",
        out,
        shard_size=SHARD_SIZE,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def val_shards(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("val_shards")
    build_shards(
        shapes_root / "annotations" / "instances_val.json",
        shapes_root / "images" / "val",
        out,
        shard_size=3,
        progress=False,
    )
    return out


@pytest.fixture
def shard_copy(train_shards, tmp_path) -> Path:
    """A private copy of the training shards that a test may damage."""
    out = tmp_path / "shards"
    shutil.copytree(train_shards, out)
    return out
