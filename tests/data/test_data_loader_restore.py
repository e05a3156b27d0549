"""The training loader's world-size independent order, its restore without reading what
was consumed, and its bounded decode retries."""

import io
import json
import logging
import tarfile
import time
from pathlib import Path

import pytest
import torch
from data_helpers import TRAIN_IMAGES, load_json, train_loader

import pipeline.data.shard_reader as shard_reader_module
from pipeline.data.loader import CountingHandler, SampleDecodeError, ShardReader
from pipeline.data.manifest import read_manifest

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]


def by_position(loader, batches: int | None = None) -> dict:
    """{global position: (image, target)} of the next ``batches`` batches (all: None)."""
    seen = {}
    for count, (images, targets) in enumerate(loader, start=1):
        for position, image, target in zip(
            loader.last_batch["positions"], images, targets, strict=True
        ):
            seen[position] = (image.clone(), {k: v for k, v in target.items()})
        if count == batches:
            break
    return seen


def assert_same_examples(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for key, value in a[1].items():
        assert torch.equal(value, b[1][key]) if torch.is_tensor(value) else value == b[1][key]


def test_a_cycle_visits_every_sample_once_and_epochs_differ(train_shards):
    loader = train_loader(train_shards)
    cycle0 = [loader.sample_at(0, p) for p in range(TRAIN_IMAGES)]
    cycle1 = [loader.sample_at(0, p) for p in range(TRAIN_IMAGES, 2 * TRAIN_IMAGES)]
    epoch1 = [loader.sample_at(1, p) for p in range(TRAIN_IMAGES)]
    assert len(set(cycle0)) == len(set(cycle1)) == len(set(epoch1)) == TRAIN_IMAGES
    assert set(cycle0) == set(cycle1) == set(epoch1)
    assert cycle0 != cycle1 and cycle0 != epoch1
    assert cycle0 == [train_loader(train_shards, batch_size=5, world_size=3).sample_at(0, p)
                      for p in range(TRAIN_IMAGES)]  # fmt: skip


def test_every_position_holds_the_same_example_at_any_world_size(train_shards):
    reference = by_position(train_loader(train_shards, batch_size=4, epoch_samples=24))
    assert sorted(reference) == list(range(24))
    for rank, workers in ((0, 0), (1, 2)):
        loader = train_loader(train_shards, world_size=2, rank=rank, num_workers=workers,
                              epoch_samples=24)  # fmt: skip
        mine = by_position(loader)
        # global batch 4: rank 0 takes positions 0-1, 4-5, ...; rank 1 2-3, 6-7, ...
        assert sorted(mine) == [p for p in range(24) if (p // 2) % 2 == rank]
        for position, example in mine.items():
            assert_same_examples(example, reference[position])


def test_restore_with_another_world_size_continues_at_the_global_position(train_shards):
    ranks = [train_loader(train_shards, world_size=2, rank=r, epoch_samples=40) for r in (0, 1)]
    consumed = set()
    for loader in ranks:
        consumed |= set(by_position(loader, batches=3))
    assert consumed == set(range(12))  # 3 global batches of 2 x 2
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    assert state["epoch"] == 0 and state["samples_consumed"] == 12
    assert "world_size" not in state and "rank" not in state

    single = train_loader(train_shards, batch_size=3, num_workers=2, epoch_samples=40)
    single.load_state_dict(state)
    assert single.remaining_batches() == 10  # ceil((40 - 12) / 3)
    positions, samples = [], []
    for _ in single:
        positions += single.last_batch["positions"]
        samples += single.last_batch["samples"]
    assert positions == list(range(12, 42))  # the last global batch runs on into cycle 1
    expected = [single.sample_at(0, p) for p in positions]
    assert [sample.split("/")[0] for sample in samples] == [Path(s).name for s, _ in expected]
    assert single.state_dict()["epoch"] == 1 and single.state_dict()["samples_consumed"] == 0

    # and back to 3 ranks of 1: rank r continues at position 12 + r
    for rank in range(3):
        loader = train_loader(train_shards, world_size=3, rank=rank, batch_size=1,
                              epoch_samples=40)  # fmt: skip
        loader.load_state_dict(state)
        assert list(by_position(loader, batches=2)) == [12 + rank, 15 + rank]


# -- restoring deep into a larger epoch ---------------------------------------------------

BIG_SHARDS, BIG_SHARD_SIZE = 8, 500


@pytest.fixture(scope="module")
def big_shards(train_shards, tmp_path_factory) -> Path:
    """4000 samples in 8 shards, made by repeating the small set's samples under new keys."""
    index = load_json(train_shards / "index.json")
    payloads = []
    for shard in index["shards"]:
        with tarfile.open(train_shards / shard["file"]) as tar:
            members = [(m.name.split(".", 1)[1], tar.extractfile(m).read()) for m in tar]
        payloads += [members[i : i + 2] for i in range(0, len(members), 2)]
    out = tmp_path_factory.mktemp("big_shards")
    shards = []
    for s in range(BIG_SHARDS):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(BIG_SHARD_SIZE):
                key = f"{s * BIG_SHARD_SIZE + i:012d}"
                for extension, data in payloads[(s * BIG_SHARD_SIZE + i) % len(payloads)]:
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"file": name, "samples": BIG_SHARD_SIZE, "sha256": f"{s}"})
    index.update(shards=shards, total_samples=BIG_SHARDS * BIG_SHARD_SIZE)
    (out / "index.json").write_text(json.dumps(index))
    return out


class CountingFile:
    """A shard file that counts the bytes read from it."""

    read_bytes = 0

    def __init__(self, path):
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the reader)

    def read(self, size=-1):
        data = self.file.read(size)
        CountingFile.read_bytes += len(data)
        return data

    def __getattr__(self, name):  # seek, tell, fileno, close
        return getattr(self.file, name)


def test_restore_deep_into_an_epoch_reads_headers_and_one_batch(big_shards, monkeypatch):
    data_reads = []

    def recording_read_range(file, offset, size):
        data_reads.append((file.file.name, offset, size))
        return read_range(file, offset, size)

    read_range = shard_reader_module.read_range
    monkeypatch.setattr(shard_reader_module, "open_shard", CountingFile)
    monkeypatch.setattr(shard_reader_module, "read_range", recording_read_range)
    CountingFile.read_bytes = 0
    started = time.perf_counter()
    loader = train_loader(big_shards, batch_size=4, shuffle_buffer=256)
    state = {**loader.state_dict(), "samples_consumed": 3600}
    loader.load_state_dict(state)
    images, _ = next(iter(loader))
    seconds = time.perf_counter() - started
    print(f"restore at global sample 3600 of 4000, first batch after {seconds * 1000:.0f} ms, "
          f"{CountingFile.read_bytes} bytes read")  # fmt: skip

    assert len(images) == 4 and loader.last_batch["positions"] == [3600, 3601, 3602, 3603]
    wanted = [loader.sample_at(0, p) for p in range(3600, 3604)]
    expected_reads = []
    for path, member in wanted:
        with tarfile.open(path) as tar:
            members = tar.getmembers()[2 * member : 2 * member + 2]
        expected_reads += [(path, m.offset_data, m.size) for m in members]
    assert sorted(data_reads) == sorted(expected_reads)  # no other sample's data is read
    touched = len({path for path, _ in wanted})
    header_bytes = touched * 2 * BIG_SHARD_SIZE * (512 + 1) + 1024  # + the end-of-archive block
    data_bytes = sum(size for _, _, size in expected_reads)
    assert CountingFile.read_bytes <= header_bytes + data_bytes
    all_bytes = sum(path.stat().st_size for path in big_shards.glob("*.tar"))
    assert CountingFile.read_bytes < all_bytes * 3600 / 4000 / 10  # a tenth of the consumed
    assert seconds < 10  # well under a second on an idle machine


# -- bounded decode retries ---------------------------------------------------------------


def only_corrupt_shard(shards: Path) -> None:
    """Shard 0 with every image replaced by junk, and a manifest listing it alone."""
    shard = shards / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            data = data if info.name.endswith(".json") else b"not an image"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = load_json(shards / "index.json")
    index["shards"] = index["shards"][:1]
    index["total_samples"] = index["shards"][0]["samples"]
    (shards / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_rank_that_cannot_get_a_sample_stops_with_one_line(shard_copy, workers, caplog):
    only_corrupt_shard(shard_copy)
    loader = train_loader(shard_copy, num_workers=workers, max_decode_failures=20)
    started = time.perf_counter()
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.data.loader"),
        pytest.raises(SampleDecodeError) as raised,
    ):
        list(loader)
    assert time.perf_counter() - started < 30
    message = str(raised.value)
    assert "\n" not in message and "shard-000000.tar: sample 0000000000" in message
    assert "20 consecutive" in message and f"worker {0}" in message
    assert loader.state_dict()["samples_consumed"] == 0


def test_one_corrupt_shard_among_good_ones_does_not_stop_training(shard_copy):
    index = load_json(shard_copy / "index.json")
    only_corrupt_shard(shard_copy)
    (shard_copy / "index.json").write_text(json.dumps(index))  # all five shards again
    loader = train_loader(shard_copy, epoch_samples=40, max_decode_failures=10)
    samples = [s for _ in loader for s in loader.last_batch["samples"]]
    assert len(samples) == 40 and not any(s.startswith("shard-000000.tar") for s in samples)


def test_the_shard_reader_rescans_an_evicted_table_from_the_start(train_shards):
    shards = read_manifest(train_shards).shards
    reader = ShardReader(shards, CountingHandler("test"), tables=1, files=2)
    try:
        expected = {}
        for index in (0, 1):
            with tarfile.open(shards[index].path) as tar:
                expected[index] = [m.name.split(".")[0] for m in tar.getmembers()[::2]]
        for index, member in [(0, 4), (1, 2), (0, 3), (1, 0), (0, 4)]:
            sample = reader.sample(index, member)
            assert sample["__key__"] == expected[index][member]
            assert {"json", "jpg"} <= sample.keys() or {"json", "png"} <= sample.keys()
    finally:
        reader.close()
    assert not reader.files
