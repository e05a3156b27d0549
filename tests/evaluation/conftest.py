"""A small shapes validation set (two aspect ratios) in shards, and a tiny model's
checkpoint, made once per session for the evaluation tests."""

from pathlib import Path

import pytest
import torch
from evaluation_helpers import IMAGE_SIZE, NARROW_WIDTH, VAL_IMAGES, tiny_model
from evaluation_helpers import training_checkpoint as make_training_checkpoint

from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """11 val images (96 x 96, odd ids cropped to 96 x 72) in shards of 3, 3, 3, 2."""
    from evaluation_helpers import crop_to_width

    root = tmp_path_factory.mktemp("eval_shapes")
    make_shapes_dataset(root, 0, VAL_IMAGES, IMAGE_SIZE, seed=5)
    crop_to_width(root, "val", NARROW_WIDTH, lambda image_id: image_id % 2 == 1)
    out = root / "shards"
    build_shards(
        root / "annotations" / "instances_val.json",
        root / "images" / "val",
        out,
        shard_size=3,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def checkpoint_file(tmp_path_factory) -> Path:
    """A tiny model's checkpoint in the training contract's form (step 40, no MLflow run)."""
    path = tmp_path_factory.mktemp("checkpoint") / "step_0000040.pt"
    torch.save(make_training_checkpoint(tiny_model(), 40), path)
    return path
