"""A small shapes dataset and its shards for the train-stage tests, made once per session."""

from pathlib import Path

import pytest

from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards


@pytest.fixture(scope="session")
def engine_shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine_shapes")
    make_shapes_dataset(root, 24, 8, 128, seed=11)
    shards = {}
    for split, size in (("train", 6), ("val", 4)):
        out = root / "shards" / split
        build_shards(
            root / "annotations" / f"instances_{split}.json",
            root / "images" / split,
            out,
            shard_size=size,
            progress=False,
        )
        shards[split] = out
    return shards
