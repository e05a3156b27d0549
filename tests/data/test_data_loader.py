import io
import json
import logging
import tarfile

import pytest
import torch
from data_helpers import TRAIN_IMAGES, VAL_IMAGES, load_json, train_loader
from pycocotools import mask as mask_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from pipeline.config import Config
from pipeline.data.eval_loader import build_val_loader
from pipeline.data.loader import build_train_loader
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


def test_targets_follow_torchvision_convention_and_flip_mirrors_boxes(train_shards):
    sample = first_raw_sample(train_shards)
    record = json.loads(sample["json"])
    categories = {1: 1, 2: 2, 3: 3}
    plain = make_example(sample, coco_to_contiguous=categories, min_size=80, max_size=120,
                         flip=False)  # fmt: skip
    flipped = make_example(sample, coco_to_contiguous=categories, min_size=80, max_size=120,
                           flip=True)  # fmt: skip
    image, target = plain
    height, width = image.shape[-2:]
    assert image.dtype == torch.uint8 and image.shape[0] == 3  # made float in pack_batch
    assert (height, width) == resized_size(record["height"], record["width"], 80, 120)
    n = len(record["annotations"])
    assert n > 0
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3}
    assert target["masks"].shape == (n, height, width) and target["masks"].dtype == torch.uint8
    assert target["image_id"] == record["image_id"]
    assert target["orig_size"] == (record["height"], record["width"])
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1
        assert ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
    mirrored = torch.stack([width - target["boxes"][:, 2], target["boxes"][:, 1],
                            width - target["boxes"][:, 0], target["boxes"][:, 3]], 1)  # fmt: skip
    torch.testing.assert_close(flipped[1]["boxes"], mirrored)
    torch.testing.assert_close(flipped[0].float(), image.flip(-1).float(), atol=1, rtol=0)
    source = torch.stack(
        [torch.from_numpy(mask_utils.decode(a["segmentation"])) for a in record["annotations"]]
    )
    expected = torch.nn.functional.interpolate(source.flip(-1)[None], size=(height, width))[0]
    assert torch.equal(flipped[1]["masks"], expected)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(("size", "new_size"), [((60, 45), (97, 80)), ((97, 131), (64, 71))])
def test_mask_resize_equals_nearest_interpolation(size, new_size, flip):
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros((3, *size), dtype=torch.uint8)
    masks[0, 5:30, 8:20] = 1
    masks[1] = torch.randint(0, 2, size, generator=generator, dtype=torch.uint8)
    masks[1, :, : size[1] // 2] = 0  # mask 2 stays empty
    source = masks.flip(-1) if flip else masks
    expected = torch.nn.functional.interpolate(source[None], size=new_size, mode="nearest")[0]
    assert torch.equal(resize_masks_nearest(masks, *new_size, flip=flip), expected)
    view = masks.transpose(1, 2).contiguous().transpose(1, 2)  # as decode_masks returns them
    assert torch.equal(resize_masks_nearest(view, *new_size, flip=flip), expected)


@pytest.mark.parametrize(("min_size", "max_size"), [(800, 1333), (64, 120), (256, 320)])
def test_model_resize_of_a_loader_image_keeps_its_size(min_size, max_size):
    model_transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    for height, width in [(180, 161), (180, 601), (97, 131), (640, 480), (333, 500), (75, 96)]:
        size = resized_size(height, width, min_size, max_size)
        image, _ = model_transform.resize(torch.zeros(3, *size), None)
        assert tuple(image.shape[-2:]) == size, (height, width)


def test_every_rank_gets_the_same_batches_with_uneven_shards(train_shards):
    assert len(load_json(train_shards / "index.json")["shards"]) == 5  # 5 shards, 3 ranks
    counts, states = [], []
    for rank in range(3):
        loader = train_loader(train_shards, rank=rank, world_size=3, num_workers=2)
        batches = list(loader)
        assert all(len(images) == 2 and len(targets) == 2 for images, targets in batches)
        for image in batches[0][0]:
            assert image.dtype == torch.float32 and 0.0 <= image.min() <= image.max() <= 1.0
        counts.append(len(batches))
        assert len(batches) == len(loader)
        states.append(loader.state_dict())
    assert counts == [4, 4, 4]  # ceil(23 / (3 ranks x 2)): the last global batch wraps
    assert states[0] == states[1] == states[2] and states[0]["epoch"] == 1


def test_more_workers_than_shards_and_epoch_samples_are_global(train_shards):
    # 8 ranks x 2 workers over 5 shards; 70 global samples -> ceil(70 / 16) = 5 batches of 2
    loader = train_loader(train_shards, world_size=8, rank=7, num_workers=2, epoch_samples=70)
    positions = []
    for _ in loader:
        positions += loader.last_batch["positions"]
    assert len(loader) == 5 and positions == [p + 14 + 16 * b for b in range(5) for p in (0, 1)]


def test_order_is_deterministic_and_restore_gives_the_same_next_batch(train_shards):
    reference = train_loader(train_shards, num_workers=2, epoch_samples=12)
    epoch0 = list(reference)
    epoch1 = list(reference)
    assert len(epoch0) == len(reference) == 6
    again = list(train_loader(train_shards, num_workers=2, epoch_samples=12))
    for a, b in zip(epoch0, again, strict=True):
        assert_batches_equal(a, b)
    assert [t["image_id"] for _, ts in epoch0 for t in ts] != [
        t["image_id"] for _, ts in epoch1 for t in ts
    ]  # a new epoch, a new order

    interrupted = train_loader(train_shards, num_workers=2, epoch_samples=12)
    for consumed, _batch in enumerate(interrupted, start=1):
        if consumed == 3:
            break
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["samples_consumed"] == 6
    restored = train_loader(train_shards, num_workers=2, epoch_samples=12)
    restored.load_state_dict(state)
    rest = list(restored)
    assert len(rest) == 3
    for a, b in zip(epoch0[3:], rest, strict=True):
        assert_batches_equal(a, b)
    assert_batches_equal(next(iter(restored)), epoch1[0])


def test_restore_refuses_a_state_of_another_order(train_shards, shard_copy):
    state = train_loader(train_shards).state_dict()
    train_loader(train_shards, world_size=2, batch_size=3, num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=5, this loader 6"):
        train_loader(train_shards, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="epoch_samples=23, this loader 30"):
        train_loader(train_shards, epoch_samples=30).load_state_dict(state)
    index = load_json(shard_copy / "index.json")
    index["shards"][2]["sha256"] = "0" * 64  # the shard was rebuilt from something else
    (shard_copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="dataset="):
        train_loader(shard_copy).load_state_dict(state)
    old_format = {"epoch": 0, "batches_done": 3, "rank": 0, "world_size": 1}
    with pytest.raises(ValueError, match="older loader"):
        train_loader(train_shards).load_state_dict(old_format)


def test_corrupt_and_truncated_shards_are_skipped_and_training_flows(shard_copy, caplog):
    truncated = shard_copy / "shard-000001.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    (shard_copy / "shard-000003.tar").write_bytes(b"\x00garbage" * 500)
    loader = train_loader(shard_copy, epoch_samples=60)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = list(loader)
    assert len(batches) == 30
    assert all(len(images) == 2 for images, _ in batches)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "shard-000001.tar" in messages and "shard-000003.tar" in messages
    assert "errors so far" in messages


def test_build_functions_map_the_config(train_shards, val_shards):
    cfg = Config()
    cfg.data.train_shards, cfg.data.val_shards = str(train_shards), str(val_shards)
    cfg.data.num_workers, cfg.train.batch_size, cfg.eval.batch_size = 0, 3, 4
    cfg.input.min_size_train, cfg.input.max_size_train = [64], 100
    train = build_train_loader(cfg, rank=1, world_size=2)
    assert (train.rank, train.world_size, train.batch_size, train.max_size) == (1, 2, 3, 100)
    assert len(train) == 4  # ceil(ceil(23 / 2) / 3)
    val = build_val_loader(cfg, rank=0, world_size=1)
    assert len(val) == 3 and val.manifest.total_samples == VAL_IMAGES
    assert train.manifest.total_samples == TRAIN_IMAGES
    assert train.manifest.class_names == ["__background__", "circle", "square", "triangle"]


def test_batches_for_a_cuda_device_are_pinned(train_shards, val_shards, monkeypatch):
    """Pinned batches make the step's non_blocking copies asynchronous. No GPU here to pin
    with, so the DataLoader's arguments are recorded and pinning is left to a GPU."""
    from pipeline.data import loader as loader_module

    asked = []

    def recording_loader(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return torch.utils.data.DataLoader(*args, **kwargs)

    monkeypatch.setattr(loader_module, "DataLoader", recording_loader)
    cfg = Config()
    cfg.data.train_shards, cfg.data.val_shards = str(train_shards), str(val_shards)
    cfg.data.num_workers = 0
    for pin in (True, False):
        next(iter(build_train_loader(cfg, rank=0, world_size=1, pin_memory=pin)))
        next(iter(build_val_loader(cfg, rank=0, world_size=1, pin_memory=pin)))
    assert asked == [True, True, False, False]


def test_an_image_without_objects_is_a_valid_sample(train_shards):
    sample = first_raw_sample(train_shards)
    record = json.loads(sample["json"])
    empty = {**sample, "json": json.dumps({**record, "annotations": []}).encode()}
    examples = [
        make_example(s, coco_to_contiguous={1: 1, 2: 2, 3: 3}, min_size=64, max_size=120, flip=f)
        for s, f in ((empty, True), (sample, False))
    ]
    images, targets = unpack_batch(pack_batch(examples))
    height, width = images[0].shape[-2:]
    assert targets[0]["boxes"].shape == (0, 4) and targets[0]["boxes"].dtype == torch.float32
    assert targets[0]["labels"].shape == (0,) and targets[0]["labels"].dtype == torch.int64
    assert targets[0]["masks"].shape == (0, height, width)
    assert torch.equal(targets[1]["masks"], examples[1][1]["masks"])  # packing is lossless
    assert torch.equal(targets[1]["boxes"], examples[1][1]["boxes"])
    assert torch.allclose(images[1] * 255, examples[1][0].float())


def test_a_sample_that_does_not_decode_is_reported_and_replaced(shard_copy, caplog):
    shard = shard_copy / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    broken_name = members[0][0].name
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            data = b"not a jpeg" if info.name == broken_name else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # the whole epoch comes from shard 0 alone, so the broken sample is drawn
    index = load_json(shard_copy / "index.json")
    index["shards"] = index["shards"][:1]
    index["total_samples"] = index["shards"][0]["samples"]
    (shard_copy / "index.json").write_text(json.dumps(index))
    loader = train_loader(shard_copy, epoch_samples=10)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = list(loader)
    assert len(batches) == 5 and all(len(images) == 2 for images, _ in batches)
    key = broken_name.split(".")[0]
    assert all(t["image_id"] != int(key) for _, targets in batches for t in targets)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"sample {key}" in messages and "shard-000000.tar" in messages
    # the replacements are drawn from the position: a restore reproduces them
    restored = train_loader(shard_copy, epoch_samples=10)
    restored.load_state_dict({**loader.state_dict(), "epoch": 0, "samples_consumed": 2})
    for a, b in zip(batches[1:], restored, strict=True):
        assert_batches_equal(a, b)
