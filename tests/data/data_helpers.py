"""Constants and helpers shared by the data tests (a unique module name, so that no other
folder's conftest.py can shadow it)."""

import json
from pathlib import Path

from pipeline.data.loader import ShardTrainLoader

TRAIN_IMAGES = 23  # shard size 5 -> 5 shards of 5, 5, 5, 5, 3: uneven on purpose
VAL_IMAGES = 11
SHARD_SIZE = 5
IMAGE_SIZE = 96


def load_json(path: Path):
    return json.loads(Path(path).read_text())


def train_loader(shards, **overrides) -> ShardTrainLoader:
    """A small single-rank training loader over ``shards``; ``overrides`` change its options."""
    options = dict(
        rank=0, world_size=1, batch_size=2, num_workers=0, min_sizes=[64, 80], max_size=120,
        shuffle_buffer=8, seed=5,
    )  # fmt: skip
    options.update(overrides)
    return ShardTrainLoader(str(shards), **options)
