"""The evaluation loader: every sample once across ranks, and every sample accounted for."""

import io
import json
import logging
import shutil
import tarfile

import pytest
from data_helpers import VAL_IMAGES

from pipeline.config import load_config
from pipeline.data.eval_loader import ShardEvalLoader, build_val_loader
from pipeline.data.ground_truth import coco_ground_truth, read_ground_truth

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


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
    # Accounted for: what the loader lost is recorded with its shard and count ...
    (lost,) = loader.failures
    assert lost["shard"].endswith("shard-000001.tar") and lost["count"] == VAL_IMAGES - len(seen)
    # ... and the ground truth keeps what the loader still yields from that shard.
    gt_ids = {image["id"] for image in coco_ground_truth(copy)["images"]}
    assert set(seen) <= gt_ids and len(gt_ids) == len(seen)


def replace_member(shard, suffix: str, index: int, data: bytes) -> dict:
    """Rewrite a shard with the ``index``-th member ending in ``suffix`` replaced; returns
    that sample's record."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    target = [info.name for info, _ in members if info.name.endswith(suffix)][index]
    key = target.split(".", 1)[0]
    record = next(json.loads(c) for i, c in members if i.name == f"{key}.json")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, content in members:
            content = data if info.name == target else content
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    shard.write_bytes(buffer.getvalue())
    return record


def test_eval_names_undecodable_samples_and_yields_the_rest(val_shards, tmp_path):
    copy = tmp_path / "val"
    shutil.copytree(val_shards, copy)
    corrupt = replace_member(copy / "shard-000000.tar", ".jpg", 1, b"\xff\xd8 not a JPEG")
    replace_member(copy / "shard-000001.tar", ".json", 0, b'{"image_id": ')
    loader = ShardEvalLoader(str(copy), rank=0, world_size=1, batch_size=2, num_workers=2,
                             min_size=64, max_size=120)  # fmt: skip
    seen = [t["image_id"] for _, targets in loader for t in targets]
    assert len(seen) == VAL_IMAGES - 2 and corrupt["image_id"] not in seen
    by_name = {f["image"]: f for f in loader.failures}  # reported from the worker processes
    assert by_name[corrupt["file_name"]]["image_id"] == corrupt["image_id"]
    assert "jpeg" in by_name[corrupt["file_name"]]["reason"].lower()
    assert len(loader.failures) == 2
    # The ground truth skips only the record that does not parse, not its whole shard.
    gt, problems = read_ground_truth(copy)
    assert len(gt["images"]) == VAL_IMAGES - 1 and set(seen) < {i["id"] for i in gt["images"]}
    assert [p["shard"].endswith("shard-000001.tar") for p in problems] == [True, True]


def test_build_val_loader_maps_the_config(val_shards):
    cfg = load_config(None, [f"data.val_shards={val_shards}", "eval.batch_size=3",
                             "input.min_size_test=70", "input.max_size_test=90",
                             "data.num_workers=0"])  # fmt: skip
    loader = build_val_loader(cfg, 1, 2)
    assert (loader.rank, loader.world_size, loader.batch_size) == (1, 2, 3)
    assert (loader.min_size, loader.max_size, loader.num_workers) == (70, 90, 0)
    assert len(list(loader)) == len(loader) == 2  # 5 of the 11 samples, in batches of 3
