"""The evaluation loader: every sample once across ranks, and every sample accounted for."""

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
from data_helpers import VAL_IMAGES

from pipeline.config import load_config
from pipeline.data import eval_loader
from pipeline.data.eval_loader import ShardEvalLoader, build_val_loader
from pipeline.data.ground_truth import coco_ground_truth, read_ground_truth
from pipeline.data.loader import worker_identity
from pipeline.data.shapes import make_shapes_dataset
from pipeline.data.sharding import build_shards

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


# 22 samples in shards of 3 -> 8 shards (the last holds 1). On 2 ranks x 2 workers the
# ranges are [0, 6), [6, 11) | [11, 17), [17, 22): the rank boundary (11) and one worker
# boundary (17) fall inside a shard, so both ways of sharing a shard are exercised.
EIGHT_SHARD_IMAGES, EIGHT_SHARD_SIZE = 22, 3


@pytest.fixture(scope="module")
def eight_val_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eight_shapes")
    make_shapes_dataset(root, 0, EIGHT_SHARD_IMAGES, 64, seed=4)
    out = root / "shards"
    build_shards(root / "annotations" / "instances_val.json", root / "images" / "val", out,
                 shard_size=EIGHT_SHARD_SIZE, progress=False)  # fmt: skip
    return out


def test_eval_ranks_and_workers_open_only_their_own_shards(eight_val_shards, tmp_path, monkeypatch):
    # Every shard open, recorded by the process that does it: the workers are forked, so
    # the record is a line appended to a file rather than a list in this process.
    log = tmp_path / "opens.log"
    current_rank = [0]  # read in the workers, which are forked after it is set
    read_shard = eval_loader.shard_samples

    def recorded_shard_samples(shard, handler):
        # A generator, so that the line is written when the shard is read, not when the
        # generator is only created.
        worker, _ = worker_identity()
        with log.open("a") as file:
            file.write(f"{current_rank[0]} {worker} {Path(shard.path).name}\n")
        yield from read_shard(shard, handler)

    monkeypatch.setattr(eval_loader, "shard_samples", recorded_shard_samples)
    seen = []
    for rank in range(2):
        current_rank[0] = rank
        loader = ShardEvalLoader(str(eight_val_shards), rank=rank, world_size=2, batch_size=2,
                                 num_workers=2, min_size=64, max_size=120)  # fmt: skip
        batches = list(loader)
        assert len(batches) == len(loader) and not loader.failures
        seen += [target["image_id"] for _, targets in batches for target in targets]
    assert sorted(seen) == list(range(1, EIGHT_SHARD_IMAGES + 1))  # each sample once

    shards = [shard.path for shard in loader.manifest.shards]
    index = {Path(path).name: i for i, path in enumerate(shards)}
    assert len(shards) == 8
    opens: dict[tuple[int, int], list[int]] = {(r, w): [] for r in range(2) for w in range(2)}
    for line in log.read_text().splitlines():
        rank, worker, name = line.split()
        opens[int(rank), int(worker)].append(index[name])
    print("shard opens per (rank, worker):", opens)

    def contiguous(indices) -> bool:
        return sorted(indices) == list(range(min(indices), max(indices) + 1))

    for opened in opens.values():
        assert opened == sorted(set(opened)) and contiguous(opened)  # each once, in order
    by_rank = [sorted(set(opens[r, 0] + opens[r, 1])) for r in range(2)]
    for rank, opened in enumerate(by_rank):
        assert contiguous(opened), f"rank {rank} opened {opened}"
        # Its workers split the rank's range: at most the boundary shard is opened by both.
        assert max(opens[rank, 0]) <= min(opens[rank, 1])
    # The ranks split the shards: at most the one at the boundary is opened by both.
    assert max(by_rank[0]) <= min(by_rank[1])
    assert set(by_rank[0]) | set(by_rank[1]) == set(range(len(shards)))
    # Every shard opened once, plus once more for each of the 3 range boundaries at most.
    assert sum(map(len, opens.values())) <= len(shards) + 3
