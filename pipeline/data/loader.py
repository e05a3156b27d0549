"""The multi-rank training loader over the WebDataset shards written by ``sharding.py``.

Order: a function of (seed, epoch, global position), independent of the world size.
    Let N be the samples of the manifest. The epoch is a sequence of GLOBAL positions 0, 1,
    2, ...; position p lies in cycle ``k = p // N``. Cycle k lists the shards in a seeded
    permutation (seed, epoch, k), each shard's samples in tar order, and shuffles that list
    inside consecutive windows of ``shuffle_buffer`` samples (seed, epoch, k, window); a
    window may straddle two shards. The window is arithmetic, not a buffer: its size costs
    no memory, only locality. A cycle visits every sample once; an epoch longer than N
    wraps into the next cycle's permutation.

Ranks and batches: every rank gets the same number of batches, always.
    An epoch is ``epoch_samples`` GLOBAL samples (0: N). With the global batch
    ``G = world_size * batch_size``, each rank has ``batches_per_epoch = ceil(epoch_samples /
    G)`` batches (the last global batch runs on into the next cycle), so DDP never waits on
    a missing batch. Global batch t of an iteration starting at position c holds positions
    ``[c + t*G, c + (t+1)*G)``; rank r takes the contiguous block from ``c + t*G + r*B``
    (B = batch_size). The rank's batch t is built by DataLoader worker ``t % num_workers``,
    which is how the DataLoader's round robin interleaves its workers.

Position and restore: arithmetic and seeking, never reading what was consumed.
    ``state_dict()`` is the same dict on every rank and holds no rank, world size, batch size
    or worker count: ``{"epoch", "samples_consumed" (global positions of the epoch handed
    out), "epoch_samples", "seed", "shuffle_window", "total_samples", "dataset" (a digest of
    the shard list)}``. ``load_state_dict`` continues the same epoch at the same global
    position for ``ceil((epoch_samples - samples_consumed) / G)`` more batches, whatever G is
    now; it refuses a state whose order this loader would not reproduce (other seed, epoch
    length, window or shards). A worker reads its shards at random access
    (``shard_reader.py``): the first time it needs a shard it scans the tar headers (512
    bytes each, seeking over the data) into a table of member offsets, kept for the 16 most
    recent shards, then reads only the members of the samples it uses. A restore costs the
    header scans of the shards of the next batches plus those batches: seconds. With the
    same G and workers the restored batches are bit-identical to an uninterrupted run's;
    with others, every position still holds the same sample with the same augmentation.

Augmentation: the scale and the flip of a position are drawn from an RNG seeded by (seed,
    epoch, position), not by a running RNG.

Bad data: reported, replaced, bounded.
    A shard that cannot be opened, is not a tar, or holds fewer samples than the manifest
    says (truncated, damaged) is reported once per worker with a warning naming it
    (``CountingHandler``); its missing samples count as failures. A sample that fails to
    read or decode is reported (key and shard) and replaced by a sample drawn from (seed,
    epoch, position, attempt), so a restore reproduces the replacement too. After
    ``max_decode_failures`` consecutive failures a worker raises ``SampleDecodeError``, one
    line naming the shard and the sample; the DataLoader re-raises it in the main process,
    and the job stops instead of every other rank waiting in the all-reduce.

Workers build whole batches, images already float 0-1, packed into three shared-memory
tensors (``transforms.pack_batch``): each tensor sent from a worker costs a file-descriptor
hand-over, which with per-image tensors was as expensive as the decoding.

Evaluation (``eval_loader.py``) reads its shards sequentially through ``shard_samples``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import ShardInfo, ShardManifest, read_manifest
from .shard_reader import SampleMissing, ShardReader, ShardShortError
from .transforms import make_example, pack_batch, unpack_batch

log = logging.getLogger(__name__)


class CountingHandler:
    """A WebDataset exception handler: warn with the shard and a running count, continue."""

    def __init__(self, stage: str = "data"):
        self.stage = stage
        self.errors = 0

    def __call__(self, error: Exception) -> bool:
        self.errors += 1
        shard = next((a for a in reversed(error.args) if isinstance(a, str) and ".tar" in a), "")
        log.warning(
            "%s: skipped unreadable data%s: %s: %s (%d errors so far in this process)",
            self.stage,
            f" in {shard}" if shard else "",
            type(error).__name__,
            str(error.args[0]) if error.args else error,
            self.errors,
        )
        return True


class SampleDecodeError(RuntimeError):
    """A worker could not get a sample in ``max_decode_failures`` consecutive attempts.
    The message is one line naming the shard and the sample."""

    @classmethod
    def one_line(cls, error: Exception) -> str:
        """The original line of an error the DataLoader re-raised from a worker (its message
        is then the worker's whole traceback, ending in ``...SampleDecodeError: line``)."""
        lines = str(error).strip().splitlines() or [""]
        marker = f"{cls.__name__}: "
        return lines[-1].split(marker, 1)[1] if marker in lines[-1] else lines[-1]


def shard_samples(shard: ShardInfo, handler: CountingHandler) -> Iterator[dict]:
    """The raw samples of one shard, read sequentially (dicts of extension -> bytes);
    errors go to handler."""
    source = [{"url": shard.path}]
    count = 0
    for sample in wds.tariterators.tarfile_samples(source, handler=handler):
        sample["__url__"] = shard.path
        count += 1
        yield sample
    if count < shard.samples:
        # tarfile takes a cut inside a header block for the end of the archive: no error.
        handler(ShardShortError(shard, count))


def worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# The order of an epoch ----------------------------------------------------------------------


class EpochOrder:
    """Global position -> (shard index, sample index in the shard) for one epoch; see the
    module docstring. Pure arithmetic on the manifest's sample counts."""

    def __init__(self, counts: list[int], *, seed: int, epoch: int, window: int):
        self.usable = [index for index, count in enumerate(counts) if count > 0]
        self.counts = counts
        self.total = sum(counts)
        self.seed, self.epoch, self.window = seed, epoch, window
        self.manifest_starts = starts_of([counts[i] for i in self.usable])
        self._cycles: dict[int, tuple[list[int], list[int]]] = {}
        self._windows: dict[tuple[int, int], list[int]] = {}

    def cycle(self, cycle: int) -> tuple[list[int], list[int]]:
        """The shard order of a cycle and the start of each shard in it."""
        if cycle not in self._cycles:
            if len(self._cycles) > 4:
                self._cycles.clear()
            order = list(self.usable)
            random.Random(f"shards/{self.seed}/{self.epoch}/{cycle}").shuffle(order)
            self._cycles[cycle] = order, starts_of([self.counts[i] for i in order])
        return self._cycles[cycle]

    def window_order(self, cycle: int, window: int) -> list[int]:
        if (cycle, window) not in self._windows:
            if len(self._windows) > 8:
                self._windows.clear()
            size = min(self.window, self.total - window * self.window)
            order = list(range(size))
            random.Random(f"window/{self.seed}/{self.epoch}/{cycle}/{window}").shuffle(order)
            self._windows[cycle, window] = order
        return self._windows[cycle, window]

    def locate(self, position: int) -> tuple[int, int]:
        cycle, offset = divmod(position, self.total)
        window, inside = divmod(offset, self.window)
        index = window * self.window + self.window_order(cycle, window)[inside]
        order, starts = self.cycle(cycle)
        slot = bisect.bisect_right(starts, index) - 1
        return order[slot], index - starts[slot]

    def replacement(self, position: int, attempt: int) -> tuple[int, int]:
        """A sample for a position whose own failed: uniform over the manifest, drawn from
        (position, attempt) so that a restore draws the same."""
        rng = random.Random(f"replace/{self.seed}/{self.epoch}/{position}/{attempt}")
        index = rng.randrange(self.total)
        slot = bisect.bisect_right(self.manifest_starts, index) - 1
        return self.usable[slot], index - self.manifest_starts[slot]


def starts_of(counts: list[int]) -> list[int]:
    starts, total = [], 0
    for count in counts:
        starts.append(total)
        total += count
    return starts


# The loader -------------------------------------------------------------------------------


class TrainEpoch(IterableDataset):
    """The rank's ``batches`` batches of an epoch from global position ``start``."""

    def __init__(self, loader: ShardTrainLoader, epoch: int, start: int, batches: int):
        self.loader, self.epoch, self.start, self.batches = loader, epoch, start, batches

    def __iter__(self):
        ld = self.loader
        worker, workers = worker_identity()
        handler = CountingHandler(f"train rank {ld.rank} worker {worker}")
        samples = PositionSamples(ld, self.epoch, ShardReader(ld.manifest.shards, handler))
        try:
            for batch in range(worker, self.batches, workers):
                positions = ld.batch_positions(self.start, batch)
                examples, names = zip(*map(samples.example, positions), strict=True)
                packed = pack_batch(list(examples))
                packed["positions"], packed["samples"] = list(positions), list(names)
                yield packed
        finally:
            samples.reader.close()


class PositionSamples:
    """One worker's examples by global position: read, decode, augment; a failure is
    reported and replaced, and ``max_decode_failures`` in a row raise."""

    def __init__(self, loader: ShardTrainLoader, epoch: int, reader: ShardReader):
        self.loader, self.epoch, self.reader = loader, epoch, reader
        self.order = loader.order(epoch)
        self.failures = 0

    def example(self, position: int):
        """(example, "shard-name/key" of the sample used) for a position."""
        ld, shards = self.loader, self.loader.manifest.shards
        shard, member = self.order.locate(position)
        attempt = 0
        while True:
            try:
                sample = self.reader.sample(shard, member)
                rng = random.Random(f"aug/{ld.seed}/{self.epoch}/{position}")
                example = ld.example(sample, rng)
                self.failures = 0
                return example, f"{Path(shards[shard].path).name}/{sample['__key__']}"
            except Exception as error:  # a bad sample must not stop training, many must
                self.failures += 1
                key = self.reader.key(shard, member)
                if not isinstance(error, SampleMissing):  # else the shard was reported
                    message = f"sample {key}: {type(error).__name__}: {error}"
                    self.reader.handler(ValueError(message, shards[shard].path))
                if self.failures >= ld.max_decode_failures:
                    detail = " ".join(f"{type(error).__name__}: {error}".split())
                    raise SampleDecodeError(
                        f"{shards[shard].path}: sample {key}: {self.failures} consecutive "
                        f"training samples failed to read or decode ({self.reader.handler.stage},"
                        f" epoch {self.epoch}, position {position}; this one: {detail})"
                    ) from None
                attempt += 1
                shard, member = self.order.replacement(position, attempt)


class ShardTrainLoader:
    """Training batches ``(images, targets)`` for one rank; ``len()`` batches per epoch.

    ``for images, targets in loader`` runs the rest of the current epoch (from the saved
    position) and then moves to the next epoch; ``forever()`` chains epochs. After each
    batch, ``last_batch`` holds its global ``positions`` and the ``samples`` used
    ("shard-name/key")."""

    def __init__(
        self,
        shard_dir: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
        min_sizes: list[int],
        max_size: int,
        flip_prob: float = 0.5,
        shuffle_buffer: int = 256,
        epoch_samples: int = 0,
        seed: int = 0,
        max_decode_failures: int = 50,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size or batch_size < 1 or num_workers < 0:
            raise ValueError(f"bad rank {rank}/{world_size}, batch {batch_size} or workers")
        if epoch_samples < 0 or max_decode_failures < 1:
            raise ValueError("need epoch_samples >= 0 and max_decode_failures >= 1")
        self.manifest: ShardManifest = read_manifest(shard_dir)
        self.counts = [shard.samples for shard in self.manifest.shards]
        self.total_samples = sum(self.counts)
        if self.total_samples == 0:
            raise ValueError(f"{self.manifest.root / 'index.json'}: the manifest lists no samples")
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.global_batch = world_size * batch_size
        self.min_sizes, self.max_size = list(min_sizes), max_size
        self.flip_prob, self.window, self.seed = flip_prob, max(1, shuffle_buffer), seed
        self.max_decode_failures = max_decode_failures
        self.pin_memory = pin_memory
        self.epoch_samples = epoch_samples or self.total_samples
        self.batches_per_epoch = math.ceil(self.epoch_samples / self.global_batch)
        shard_list = [[Path(s.path).name, s.samples, s.sha256] for s in self.manifest.shards]
        self.dataset_digest = hashlib.sha256(json.dumps(shard_list).encode()).hexdigest()[:16]
        self._category_index = self.manifest.coco_to_contiguous
        self.epoch = 0
        self.samples_consumed = 0
        self.last_batch: dict | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.counts, seed=self.seed, epoch=epoch, window=self.window)

    def sample_at(self, epoch: int, position: int) -> tuple[str, int]:
        """(shard path, sample index in the shard) of a global position: arithmetic only."""
        shard, member = self.order(epoch).locate(position)
        return self.manifest.shards[shard].path, member

    def batch_positions(self, start: int, batch: int) -> range:
        """This rank's global positions in batch ``batch`` of an iteration from ``start``."""
        first = start + batch * self.global_batch + self.rank * self.batch_size
        return range(first, first + self.batch_size)

    def example(self, sample: dict, rng: random.Random):
        """Decode and augment one raw sample; the scale and the flip are drawn from rng."""
        min_size = rng.choice(self.min_sizes)
        flip = rng.random() < self.flip_prob
        return make_example(
            sample,
            coco_to_contiguous=self._category_index,
            min_size=min_size,
            max_size=self.max_size,
            flip=flip,
        )

    def position(self) -> tuple[int, int]:
        """(epoch, samples consumed in it), an epoch whose samples are all handed out
        counting as the start of the next."""
        if self.samples_consumed >= self.epoch_samples:
            return self.epoch + 1, 0
        return self.epoch, self.samples_consumed

    def remaining_batches(self) -> int:
        """Batches left in the current epoch at this world size."""
        return math.ceil((self.epoch_samples - self.position()[1]) / self.global_batch)

    def __iter__(self):
        self.epoch, self.samples_consumed = self.position()
        epoch_data = TrainEpoch(self, self.epoch, self.samples_consumed, self.remaining_batches())
        try:
            for packed in make_dataloader(
                epoch_data, self.num_workers, self.batch_size, pin_memory=self.pin_memory
            ):
                self.samples_consumed += self.global_batch
                self.last_batch = {
                    "epoch": self.epoch,
                    "positions": packed.pop("positions"),
                    "samples": packed.pop("samples"),
                }
                yield unpack_batch(packed)
        except SampleDecodeError as error:  # from a worker, its message is its traceback
            raise SampleDecodeError(SampleDecodeError.one_line(error)) from None
        self.epoch, self.samples_consumed = self.epoch + 1, 0

    def forever(self):
        while True:
            yield from self

    def state_dict(self) -> dict:
        """The global position and what the order depends on: the same on every rank."""
        epoch, consumed = self.position()
        return {"epoch": epoch, "samples_consumed": consumed, **self._order_identity()}

    def _order_identity(self) -> dict:
        return {
            "epoch_samples": self.epoch_samples,
            "seed": self.seed,
            "shuffle_window": self.window,
            "total_samples": self.total_samples,
            "dataset": self.dataset_digest,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved global position, whatever world size, batch size or workers
        saved it; refuses a state whose order this loader would not reproduce."""
        if "samples_consumed" not in state or "epoch" not in state:
            raise ValueError(
                f"loader state has keys {sorted(state)}, not epoch and samples_consumed: "
                "saved by an older loader, whose order this one cannot continue"
            )
        for key, value in self._order_identity().items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r}, this loader {value!r}; "
                    "the restored order would not be the saved one"
                )
        epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
        if epoch < 0 or consumed < 0:
            raise ValueError(f"loader state has a negative position: {epoch=}, {consumed=}")
        self.epoch, self.samples_consumed = epoch, consumed
        self.epoch, self.samples_consumed = self.position()  # a finished epoch: the next


def pass_through(batch):
    return batch


def make_dataloader(
    dataset: IterableDataset, num_workers: int, batch_size: int, *, pin_memory: bool = False
) -> DataLoader:
    """Batches are made in the workers (batch_size=None), tensors travel via shared memory;
    ``pass_through`` keeps the batch structure (default_convert would turn tuples to lists).
    ``pin_memory`` (for a CUDA device) pins each batch's buffers in the loader's thread, so
    the step's ``to(device, non_blocking=True)`` copies are asynchronous: from pageable
    memory they are synchronous copies through a staging buffer."""
    return DataLoader(
        dataset,
        batch_size=None,
        collate_fn=pass_through,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def build_train_loader(
    cfg, rank: int, world_size: int, *, pin_memory: bool = False
) -> ShardTrainLoader:
    """The training loader of one rank, from the config tree; ``pin_memory`` when the
    batches go to a CUDA device."""
    return ShardTrainLoader(
        cfg.data.train_shards,
        rank=rank,
        world_size=world_size,
        batch_size=cfg.train.batch_size,
        num_workers=cfg.data.num_workers,
        min_sizes=cfg.input.min_size_train,
        max_size=cfg.input.max_size_train,
        flip_prob=cfg.data.flip_prob,
        shuffle_buffer=cfg.data.shuffle_buffer,
        epoch_samples=cfg.data.epoch_samples,
        seed=cfg.data.seed,
        max_decode_failures=cfg.data.max_decode_failures,
        pin_memory=pin_memory,
    )


__all__ = [
    "CountingHandler",
    "SampleDecodeError",
    "ShardTrainLoader",
    "build_train_loader",
]
