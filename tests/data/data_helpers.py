"""Constants and helpers shared by the data tests (a unique module name, so that no other
folder's conftest.py can shadow it)."""

import json
from pathlib import Path

TRAIN_IMAGES = 23  # shard size 5 -> 5 shards of 5, 5, 5, 5, 3: uneven on purpose
VAL_IMAGES = 11
SHARD_SIZE = 5
IMAGE_SIZE = 96


def load_json(path: Path):
    return json.loads(Path(path).read_text())
