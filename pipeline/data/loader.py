"""Streaming, multi-rank loaders over the WebDataset shards written by ``sharding.py``.

Training (``ShardTrainLoader``): equal batches on every rank, always.
    Each rank draws ``batches_per_epoch = ceil(S / batch_size)`` batches per epoch, where S
    is ``epoch_samples`` or ``ceil(total_samples / world_size)``, whatever the shards hold.
    Batch i of an epoch is built by (logical) worker ``i % num_workers`` (its
    ``i // num_workers``-th batch), which is exactly how the DataLoader's round robin
    interleaves workers, so worker w makes ``nb // W + (w < nb % W)`` batches. (On a
    restore mid-epoch, DataLoader process p plays worker ``(p + start) % W``.) Every worker
    reads an infinite stream: shards drawn with replacement (weighted by their sample counts)
    from ALL shards, by an RNG seeded with (seed, epoch, rank, worker), through a shuffle
    buffer. No worker is ever empty (fewer shards than ranks x workers is fine), no rank runs
    short when shards are uneven, truncated or corrupt, so DDP never waits on a missing batch.
    The price: within an epoch a sample may repeat or be missed (sampling with replacement).

    Position and restore: the loader counts (epoch, batches yielded in it); ``state_dict()``
    returns them, ``load_state_dict()`` sets them. Iterating always continues from the
    position: each worker rebuilds its epoch stream from the same seed and skips the raw
    (undecoded) samples of the batches already consumed, so the next batch is bit-identical
    to the one an uninterrupted run would have produced. (One exception: a sample that is
    read from its tar but fails to DECODE is replaced by the next one; fast-forwarding does
    not decode, so such a failure inside the skipped batches shifts the restored stream.)
    Per-sample augmentation draws (flip, scale) come from an RNG seeded by the sample's
    position, not by a running RNG.

Evaluation (``ShardEvalLoader``): every sample exactly once across ranks.
    Sample g (global index in manifest order: shard by shard, then position in the shard)
    belongs to rank ``g % world_size``; within the rank, its j-th sample (``j = g //
    world_size``) goes to worker ``j % num_workers``. Ranks may get one batch more or less.

A shard that cannot be read (missing, truncated, corrupt member) is skipped with a warning
that names it and counts the failures so far (``CountingHandler``); the stream goes on.
A sample that does not decode is reported the same way and replaced by the next one.

Workers build whole batches, images already float 0-1, packed into three shared-memory
tensors (``transforms.pack_batch``): each tensor sent from a worker costs a file-descriptor
hand-over, which with per-image tensors was as expensive as the decoding.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import ShardInfo, ShardManifest, read_manifest
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


class ShardShortError(OSError):
    def __init__(self, shard: ShardInfo, count: int):
        super().__init__(
            f"{count} of {shard.samples} samples readable (truncated or damaged)", shard.path
        )


def shard_samples(shard: ShardInfo, handler: CountingHandler) -> Iterator[dict]:
    """The raw samples of one shard (dicts of extension -> bytes); errors go to handler."""
    source = [{"url": shard.path}]
    count = 0
    for sample in wds.tariterators.tarfile_samples(source, handler=handler):
        sample["__url__"] = shard.path
        count += 1
        yield sample
    if count < shard.samples:
        # tarfile takes a cut inside a header block for the end of the archive: no error.
        handler(ShardShortError(shard, count))


def resampled_stream(shards, rng: random.Random, handler: CountingHandler) -> Iterator[dict]:
    """An endless stream from shards drawn with replacement, weighted by sample count."""
    usable = [shard for shard in shards if shard.samples > 0]
    if not usable:
        raise RuntimeError("the manifest lists no samples")
    weights = [shard.samples for shard in usable]
    fruitless = 0
    while True:
        shard = rng.choices(usable, weights)[0]
        produced = 0
        for sample in shard_samples(shard, handler):
            produced += 1
            yield sample
        fruitless = 0 if produced else fruitless + 1
        if fruitless > 20 * len(usable):
            raise RuntimeError(f"no readable sample in {fruitless} shard draws; last {shard.path}")


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle: fill ``size`` samples, then emit a random one per arrival."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


def worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainEpoch(IterableDataset):
    """One epoch of one rank, from batch ``start_batch`` on; see the module docstring."""

    def __init__(self, loader: ShardTrainLoader, epoch: int, start_batch: int):
        self.loader = loader
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self):
        ld = self.loader
        process, workers = worker_identity()
        # The DataLoader's round robin always starts at process 0, and batch ``start_batch``
        # belongs to worker ``start_batch % workers``: rotate the roles to match.
        worker = (process + self.start_batch) % workers
        total = ld.batches_per_epoch
        mine = total // workers + (worker < total % workers)
        # Batches i < start_batch with i % workers == worker were consumed already.
        skip = max(0, min(mine, (self.start_batch - worker + workers - 1) // workers))
        stream_id = f"{ld.seed}/{self.epoch}/{ld.rank}/{worker}"
        rng = random.Random(f"stream/{stream_id}")
        handler = CountingHandler(f"train rank {ld.rank} worker {worker}")
        raw = shuffle_buffer(resampled_stream(ld.manifest.shards, rng, handler), ld.buffer, rng)
        for batch_number in range(mine):
            examples = []
            while len(examples) < ld.batch_size:
                sample_number = batch_number * ld.batch_size + len(examples)
                sample = next(raw)
                if batch_number < skip:  # fast-forward: no decoding
                    examples.append(None)
                    continue
                try:
                    rng = random.Random(f"aug/{stream_id}/{sample_number}")
                    examples.append(ld.example(sample, rng))
                except Exception as error:  # a corrupt sample must not stop training
                    message = f"sample {sample.get('__key__')}: {type(error).__name__}: {error}"
                    handler(ValueError(message, sample.get("__url__", "")))
                    # and draw another one: batches stay full
            if batch_number >= skip:
                yield pack_batch(examples)


class ShardTrainLoader:
    """Training batches ``(images, targets)`` for one rank; ``len()`` batches per epoch.

    ``for images, targets in loader`` runs the rest of the current epoch (from the saved
    position) and then moves to the next epoch; ``forever()`` chains epochs."""

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
    ):
        if not 0 <= rank < world_size or batch_size < 1 or num_workers < 0:
            raise ValueError(f"bad rank {rank}/{world_size}, batch {batch_size} or workers")
        self.manifest: ShardManifest = read_manifest(shard_dir)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.min_sizes, self.max_size = list(min_sizes), max_size
        self.flip_prob, self.buffer, self.seed = flip_prob, max(1, shuffle_buffer), seed
        samples = epoch_samples or math.ceil(self.manifest.total_samples / world_size)
        self.batches_per_epoch = max(1, math.ceil(samples / batch_size))
        self._category_index = self.manifest.coco_to_contiguous
        self.epoch = 0
        self.batches_done = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

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

    def __iter__(self):
        epoch_data = TrainEpoch(self, self.epoch, self.batches_done)
        for packed in make_dataloader(epoch_data, self.num_workers, self.batch_size):
            self.batches_done += 1
            yield unpack_batch(packed)
        self.epoch += 1
        self.batches_done = 0

    def forever(self):
        while True:
            yield from self

    def state_dict(self) -> dict:
        """The position (epoch, batches consumed in it) and what the order depends on."""
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            **self._layout(),
        }

    def _layout(self) -> dict:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "streams_per_rank": max(1, self.num_workers),  # 0 workers reads like 1
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses a state whose order this loader could
        not reproduce (other seed, ranks, batch size, workers or epoch length)."""
        for key, value in self._layout().items():
            if state.get(key) != value:
                raise ValueError(
                    f"loader state has {key}={state.get(key)}, this loader {value}; "
                    "the restored order would not be the saved one"
                )
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


def pass_through(batch):
    return batch


def make_dataloader(dataset: IterableDataset, num_workers: int, batch_size: int) -> DataLoader:
    """Batches are made in the workers (batch_size=None), tensors travel via shared memory;
    ``pass_through`` keeps the batch structure (default_convert would turn tuples to lists)."""
    return DataLoader(
        dataset,
        batch_size=None,
        collate_fn=pass_through,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,
    )


class EvalSamples(IterableDataset):
    """This rank's share of the evaluation samples, batched per worker."""

    def __init__(self, loader: ShardEvalLoader):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        worker, workers = worker_identity()
        handler = CountingHandler(f"eval rank {ld.rank} worker {worker}")
        examples = []
        for global_index, sample in ld.assigned_samples(worker, workers, handler):
            try:
                examples.append(ld.example(sample))
            except Exception as error:
                handler(ValueError(f"sample {global_index}: {error}", sample.get("__url__", "")))
                continue
            if len(examples) == ld.batch_size:
                yield pack_batch(examples)
                examples = []
        if examples:
            yield pack_batch(examples)


class ShardEvalLoader:
    """Evaluation batches ``(images, targets)``: each sample once across all ranks."""

    def __init__(
        self,
        shard_dir: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
        min_size: int,
        max_size: int,
    ):
        if not 0 <= rank < world_size or batch_size < 1 or num_workers < 0:
            raise ValueError(f"bad rank {rank}/{world_size}, batch {batch_size} or workers")
        self.manifest: ShardManifest = read_manifest(shard_dir)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.min_size, self.max_size = min_size, max_size
        self._category_index = self.manifest.coco_to_contiguous

    def local_count(self, worker: int = 0, workers: int = 1) -> int:
        """Samples of this rank (and worker) per the manifest."""
        total = self.manifest.total_samples
        rank_count = total // self.world_size + (self.rank < total % self.world_size)
        return rank_count // workers + (worker < rank_count % workers)

    def __len__(self) -> int:
        workers = max(1, self.num_workers)
        return sum(
            math.ceil(self.local_count(w, workers) / self.batch_size) for w in range(workers)
        )

    def assigned_samples(self, worker: int, workers: int, handler: CountingHandler):
        """(global index, raw sample) of this rank and worker, in manifest order."""
        world = self.world_size
        for offset, shard in zip(self.manifest.shard_offsets(), self.manifest.shards, strict=True):
            wanted = {
                g
                for g in range(offset, offset + shard.samples)
                if g % world == self.rank and (g // world) % workers == worker
            }
            if not wanted:
                continue  # skip the shard without reading it
            last, found = max(wanted), 0
            for position, sample in enumerate(shard_samples(shard, handler)):
                global_index = offset + position
                if global_index in wanted:
                    found += 1
                    yield global_index, sample
                if global_index >= last:
                    break
            if found < len(wanted):
                handler(OSError(f"{len(wanted) - found} evaluation samples missing", shard.path))

    def example(self, sample: dict):
        return make_example(
            sample,
            coco_to_contiguous=self._category_index,
            min_size=self.min_size,
            max_size=self.max_size,
            flip=False,
        )

    def __iter__(self):
        for packed in make_dataloader(EvalSamples(self), self.num_workers, self.batch_size):
            yield unpack_batch(packed)


def build_train_loader(cfg, rank: int, world_size: int) -> ShardTrainLoader:
    """The training loader of one rank, from the config tree."""
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
    )


def build_val_loader(cfg, rank: int, world_size: int) -> ShardEvalLoader:
    """The evaluation loader of one rank, from the config tree."""
    return ShardEvalLoader(
        cfg.data.val_shards,
        rank=rank,
        world_size=world_size,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        min_size=cfg.input.min_size_test,
        max_size=cfg.input.max_size_test,
    )


__all__ = [
    "CountingHandler",
    "ShardEvalLoader",
    "ShardTrainLoader",
    "build_train_loader",
    "build_val_loader",
]
