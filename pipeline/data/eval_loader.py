"""The evaluation loader over the shards written by ``sharding.py``.

Evaluation (``ShardEvalLoader``): every sample exactly once across ranks.
    Sample g is its global index in manifest order (shard by shard, then position in the
    shard). Each rank gets a contiguous range of g, the first ``total % world_size`` ranks
    one sample more than the others; each worker of the rank gets a contiguous part of that
    range, split the same way. So a worker opens only the shards that overlap its range
    (ranks and workers share at most the shard at each boundary) and stops reading after
    the range's last sample, instead of every rank and worker streaming every shard. Ranks
    may get one batch more or less.

Every sample is accounted for. A sample that cannot be decoded, and the samples a damaged
shard no longer holds, are warned about and recorded in ``loader.failures`` (the image's
file name and id when its record is readable, else the shard and the count), so that the
evaluation can report them and leave them out of the ground truth. The records travel from
the workers inside the batches (a batch may carry only failures, then it is not yielded).
"""

from __future__ import annotations

import contextlib
import json
import math

from torch.utils.data import IterableDataset

from .loader import CountingHandler, make_dataloader, shard_samples, worker_identity
from .manifest import ShardManifest, read_manifest
from .transforms import make_example, pack_batch, unpack_batch


def balanced_part(total: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of the ``part``-th of ``parts`` contiguous pieces of ``range(total)``;
    the first ``total % parts`` pieces hold one item more."""
    size, larger = divmod(total, parts)
    start = part * size + min(part, larger)
    return start, start + size + (part < larger)


def failure_record(sample: dict, error: Exception) -> dict:
    """What the evaluation reports of a sample that did not decode: its image's file name
    and id when the record is readable, else its key."""
    record = {}
    with contextlib.suppress(Exception):  # a damaged record too: the key is all there is
        record = json.loads(sample["json"])
    return {
        "image_id": record.get("image_id") if isinstance(record, dict) else None,
        "image": (record.get("file_name") if isinstance(record, dict) else None)
        or str(sample.get("__key__")),
        "shard": sample.get("__url__", ""),
        "count": 1,
        "reason": f"{type(error).__name__}: {error}",
    }


class EvalSamples(IterableDataset):
    """This rank's share of the evaluation samples, batched per worker; the failures since
    the previous batch ride along under "failures"."""

    def __init__(self, loader: ShardEvalLoader):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        worker, workers = worker_identity()
        handler = CountingHandler(f"eval rank {ld.rank} worker {worker}")
        examples, failures = [], []
        for global_index, sample in ld.assigned_samples(worker, workers, handler, failures):
            try:
                examples.append(ld.example(sample))
            except Exception as error:
                failures.append(failure_record(sample, error))
                name = failures[-1]["image"]
                handler(ValueError(f"sample {global_index} ({name}): {error}", sample["__url__"]))
                continue
            if len(examples) == ld.batch_size:
                yield {**pack_batch(examples), "failures": list(failures)}
                examples = []
                failures.clear()  # the same list: assigned_samples appends to it
        if examples:
            yield {**pack_batch(examples), "failures": list(failures)}
        elif failures:
            yield {"failures": list(failures)}


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
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size or batch_size < 1 or num_workers < 0:
            raise ValueError(f"bad rank {rank}/{world_size}, batch {batch_size} or workers")
        self.manifest: ShardManifest = read_manifest(shard_dir)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.min_size, self.max_size = min_size, max_size
        self.pin_memory = pin_memory
        self._category_index = self.manifest.coco_to_contiguous
        self.failures: list[dict] = []
        """Samples of this rank not yielded, from the last iteration (see module doc)."""

    def local_range(self, worker: int = 0, workers: int = 1) -> range:
        """The global indices of this rank (and worker) per the manifest (see module doc)."""
        rank_start, rank_stop = balanced_part(
            self.manifest.total_samples, self.world_size, self.rank
        )
        start, stop = balanced_part(rank_stop - rank_start, workers, worker)
        return range(rank_start + start, rank_start + stop)

    def local_count(self, worker: int = 0, workers: int = 1) -> int:
        """Samples of this rank (and worker) per the manifest."""
        return len(self.local_range(worker, workers))

    def __len__(self) -> int:
        workers = max(1, self.num_workers)
        return sum(
            math.ceil(self.local_count(w, workers) / self.batch_size) for w in range(workers)
        )

    def assigned_samples(
        self, worker: int, workers: int, handler: CountingHandler, failures: list[dict]
    ):
        """(global index, raw sample) of this rank and worker, in manifest order; the
        samples a shard fails to give are appended to ``failures``. Only the shards that
        overlap the worker's range are opened."""
        local = self.local_range(worker, workers)
        for offset, shard in zip(self.manifest.shard_offsets(), self.manifest.shards, strict=True):
            if offset >= local.stop:
                break  # this and all later shards hold only later ranges' samples
            wanted = range(max(offset, local.start), min(offset + shard.samples, local.stop))
            if not wanted:
                continue  # skip the shard without opening it
            found = 0
            for position, sample in enumerate(shard_samples(shard, handler)):
                global_index = offset + position
                if global_index in wanted:
                    found += 1
                    yield global_index, sample
                if global_index >= wanted[-1]:
                    break
            if found < len(wanted):
                missing = len(wanted) - found
                handler(OSError(f"{missing} evaluation samples missing", shard.path))
                failures.append(
                    {
                        "image_id": None,
                        "image": None,
                        "shard": shard.path,
                        "count": missing,
                        "reason": "unreadable (truncated or damaged shard)",
                    }
                )

    def example(self, sample: dict):
        return make_example(
            sample,
            coco_to_contiguous=self._category_index,
            min_size=self.min_size,
            max_size=self.max_size,
            flip=False,
        )

    def __iter__(self):
        self.failures = []
        for packed in make_dataloader(
            EvalSamples(self), self.num_workers, self.batch_size, pin_memory=self.pin_memory
        ):
            self.failures.extend(packed.pop("failures"))
            if packed:
                yield unpack_batch(packed)


def build_val_loader(
    cfg, rank: int, world_size: int, *, pin_memory: bool = False
) -> ShardEvalLoader:
    """The evaluation loader of one rank, from the config tree; ``pin_memory`` when the
    batches go to a CUDA device."""
    return ShardEvalLoader(
        cfg.data.val_shards,
        rank=rank,
        world_size=world_size,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        min_size=cfg.input.min_size_test,
        max_size=cfg.input.max_size_test,
        pin_memory=pin_memory,
    )


__all__ = ["ShardEvalLoader", "build_val_loader"]
