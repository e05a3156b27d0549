"""Random access to the samples of a WebDataset shard: why the training loader can restore.

A tar has no index, and reading it front to back is the only way WebDataset offers. A
restore deep into an epoch would then read (and throw away) every sample consumed before the
saved position, minutes of I/O on a large dataset. Instead, ``scan_shard`` reads a shard's
headers alone (512 bytes per member, seeking over the data) into a table of member offsets
grouped by sample key, and ``ShardReader`` keeps those tables (the most recent few) and the
open files, so a sample is read by seeking to its members and reading only their bytes. A
restore costs the header scans of the shards the next batches touch plus those batches.

A shard that is shorter than the manifest says (truncated, damaged, unreadable) is reported
once per reader with ``ShardShortError``; asking for one of its missing samples raises
``SampleMissing``. The caller (``loader.PositionSamples``) replaces such samples.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .manifest import ShardInfo

if TYPE_CHECKING:
    from .loader import CountingHandler


class ShardShortError(OSError):
    """A shard holds fewer samples than the manifest says; the shard's path is the last
    argument, where ``CountingHandler`` looks for it."""

    def __init__(self, shard: ShardInfo, count: int, reason: str = ""):
        because = f": {reason}" if reason else ""
        super().__init__(
            f"{count} of {shard.samples} samples readable (truncated or damaged){because}",
            shard.path,
        )


class SampleMissing(LookupError):
    """The manifest counts a sample that its shard does not hold (already reported)."""


def open_shard(path: str):
    """A shard's file, unbuffered: a header scan then reads 512-byte headers, not a buffer
    of the data behind each."""
    return open(path, "rb", buffering=0)


def read_range(file, offset: int, size: int) -> bytes:
    file.seek(offset)
    parts, left = [], size
    while left:
        part = file.read(left)
        if not part:
            raise OSError(f"unexpected end of file: {size - left} of {size} bytes at {offset}")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


@dataclass(frozen=True)
class SampleEntry:
    key: str
    members: tuple[tuple[str, int, int], ...]
    """(extension, data offset, size) of each of the sample's files."""


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) as WebDataset splits a member name: at the basename's first dot."""
    directory, slash, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return directory + slash + stem, extension.lower()


def scan_shard(file) -> tuple[list[SampleEntry], Exception | None]:
    """A tar's samples (consecutive members sharing a key) from its headers alone, tarfile
    seeking over the member data; and the error that ended the scan early, if any. The
    last sample of an interrupted scan is dropped: some of its files may be missing."""
    size = os.fstat(file.fileno()).st_size
    samples, key, members, error = [], None, [], None
    try:
        file.seek(0)  # tarfile starts where the file is; a data read may have moved it
        with tarfile.open(fileobj=file, mode="r:") as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every TarInfo; the table is enough
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"{info.name} runs past the end of the file")
                member_key, extension = split_member_name(info.name)
                if member_key != key and members:
                    samples.append(SampleEntry(key, tuple(members)))
                    members = []
                key = member_key
                members.append((extension, info.offset_data, info.size))
    except (tarfile.TarError, OSError, ValueError) as problem:
        error = problem
    if members and error is None:
        samples.append(SampleEntry(key, tuple(members)))
    return samples, error


class ShardReader:
    """One worker's random access to the samples of the shards: member tables scanned once
    (the ``tables`` most recent kept), files kept open (the ``files`` most recent)."""

    def __init__(self, shards, handler: CountingHandler, *, tables: int = 16, files: int = 4):
        self.shards, self.handler = shards, handler
        self.max_tables, self.max_files = tables, files
        self.tables: OrderedDict[int, list[SampleEntry]] = OrderedDict()
        self.files: OrderedDict[int, object] = OrderedDict()
        self.reported: set[int] = set()

    def file(self, index: int):
        file = self.files.pop(index, None)
        if file is None:
            file = open_shard(self.shards[index].path)
            if len(self.files) >= self.max_files:
                self.files.popitem(last=False)[1].close()
        self.files[index] = file
        return file

    def table(self, index: int) -> list[SampleEntry]:
        table = self.tables.pop(index, None)
        if table is None:
            shard = self.shards[index]
            try:
                table, error = scan_shard(self.file(index))
            except OSError as problem:  # cannot open it
                table, error = [], problem
            if (error is not None or len(table) < shard.samples) and index not in self.reported:
                self.reported.add(index)
                reason = f"{type(error).__name__}: {error}" if error is not None else ""
                self.handler(ShardShortError(shard, min(len(table), shard.samples), reason))
            if len(self.tables) >= self.max_tables:
                self.tables.popitem(last=False)
        self.tables[index] = table
        return table

    def key(self, index: int, member: int) -> str:
        table = self.table(index)
        return table[member].key if member < len(table) else f"#{member}"

    def sample(self, index: int, member: int) -> dict:
        """The raw sample (extension -> bytes, ``__key__``, ``__url__``): reads its files only."""
        table, shard = self.table(index), self.shards[index]
        if member >= len(table):
            raise SampleMissing(f"sample #{member} missing: {len(table)} readable in the shard")
        entry = table[member]
        file = self.file(index)
        sample = {"__key__": entry.key, "__url__": shard.path}
        for extension, offset, size in entry.members:
            sample[extension] = read_range(file, offset, size)
        return sample

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()
