import io
import json
import logging
import shutil
import tarfile

import pytest
import torch
from data_helpers import TRAIN_IMAGES, VAL_IMAGES, load_json
from pycocotools import mask as mask_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from pipeline.config import Config
from pipeline.data.eval_loader import ShardEvalLoader, build_val_loader
from pipeline.data.loader import ShardTrainLoader, build_train_loader
from pipeline.data.transforms import (
    make_example,
    pack_batch,
    resize_masks_nearest,
    resized_size,
    unpack_batch,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


def train_loader(shards, **overrides) -> ShardTrainLoader:
    options = dict(
        rank=0, world_size=1, batch_size=2, num_workers=0, min_sizes=[64, 80], max_size=120,
        shuffle_buffer=8, seed=5,
    )  # fmt: skip
    options.update(overrides)
    return ShardTrainLoader(str(shards), **options)


def assert_batches_equal(a, b):
    (images_a, targets_a), (images_b, targets_b) = a, b
    assert len(images_a) == len(images_b)
    for x, y in zip(images_a, images_b, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(targets_a, targets_b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key]


def first_raw_sample(shards):
    index = load_json(shards / "index.json")
    with tarfile.open(shards / index["shards"][0]["file"]) as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:2]}
    return {"__key__": "x", **members}


def test_eval_sees_every_sample_exactly_once_across_ranks(val_shards):
    seen = []
    for rank in range(2):
        loader = ShardEvalLoader(str(val_shards), rank=rank, world_size=2, batch_size=2,
                                 num_workers=2, min_size=64, max_size=120)  # fmt: skip
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, targets in batches:
            for image, target in zip(images, targets, strict=True):
                assert min(image.shape[-2:]) == 64 or max(image.shape[-2:]) == 120
                seen.append(target["image_id"])
    assert sorted(seen) == list(range(1, VAL_IMAGES + 1))


def test_eval_reports_samples_lost_in_a_truncated_shard(val_shards, tmp_path, caplog):
    copy = tmp_path / "val"
    shutil.copytree(val_shards, copy)
    shard = copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1536])  # the first sample survives at most
    loader = ShardEvalLoader(str(copy), rank=0, world_size=1, batch_size=4, num_workers=0,
                             min_size=64, max_size=120)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        seen = [t["image_id"] for _, targets in loader for t in targets]
    assert VAL_IMAGES - 3 <= len(seen) < VAL_IMAGES
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "shard-000001.tar" in messages and "evaluation samples missing" in messages


