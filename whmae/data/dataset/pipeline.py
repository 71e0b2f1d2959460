"""The Grain input pipeline: exam records -> per-process batches of uint8 numpy arrays.

Order of operations (why each is where it is):
  source -> seed -> shuffle (global, one permutation per epoch) -> repeat
  -> this process's rows of every global batch (after the global shuffle, so the
     processes partition every epoch with no overlap and no loss; process p takes rows
     [p*B, (p+1)*B) of each run of B*P exams, the rows its devices hold in the global
     array, so P processes feed the model the very batches one process would)
  -> map(decode) (zero-copy views into the record) -> batch (the only copy)
  -> to_iter_dataset (thread prefetch) [-> mp_prefetch when worker_count > 0]

Batches stay uint8 on the host; normalisation to float happens on the device, which
keeps the host-to-device traffic 4x smaller than float32.
"""

from __future__ import annotations

import bisect
import functools
import os

import grain
import numpy as np

from whmae.data.dataset.records import RecordError, decode_exam, read_dataset_info, split_paths

__all__ = ["dataset_info", "make_pipeline", "num_examples"]


def dataset_info(data_dir: str | os.PathLike) -> dict:
    """The checked dataset_info.json of a dataset directory (see whmae.data.dataset.records)."""
    return read_dataset_info(data_dir)


def num_examples(data_dir: str | os.PathLike, split: str) -> int:
    """Number of exams in one split (all processes together)."""
    split_paths(data_dir, split)  # validates the split name and the shard files
    return int(dataset_info(data_dir)["splits"][split]["num_examples"])


def _shard_error(path: str, error: BaseException, what: str) -> RecordError:
    """A RecordError naming the shard file, its size and what went wrong reading it."""
    try:
        size = f"{os.path.getsize(path)} bytes"
    except OSError:
        size = "unreadable size"
    reason = " ".join(str(error).split()) or type(error).__name__
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return RecordError(
        f"{path} ({size}): {what}: {reason}. The shard is damaged (truncated or overwritten?): "
        "regenerate the dataset, or rewrite this shard"
    )


class _NamedSource:
    """grain's ArrayRecordDataSource over `paths`, whose read errors name the file and the
    record (ArrayRecord's own say only e.g. 'chunk header hash mismatch')."""

    def __init__(self, paths: list[str], counts: list[int]):
        self.paths = paths
        self.starts = np.cumsum([0, *counts[:-1]]).tolist()
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def _error(self, index: int, error: BaseException) -> RecordError:
        file = bisect.bisect_right(self.starts, index) - 1
        return _shard_error(
            self.paths[file], error, f"cannot read record {index - self.starts[file]}"
        )

    def __getitem__(self, index):
        try:
            return self._source[index]
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise self._error(int(index), e) from e

    def __getitems__(self, indices):
        try:
            return self._source.__getitems__(indices)
        except Exception:  # noqa: BLE001 - find the record that fails, one by one
            return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"_NamedSource({len(self.paths)} shards)"


def _with_index(index: int, record: bytes) -> tuple[int, bytes]:
    return index, record


class _Decode:
    """(record index, record bytes) -> exam dict of the requested fields.

    A class (not a closure) so that mp_prefetch workers can pickle it; it knows which
    file each record index lives in, so a corrupt record is reported by file and index.
    """

    def __init__(self, paths: list[str], counts: list[int], fields: tuple[str, ...]):
        self.paths, self.fields = paths, fields
        self.starts = np.cumsum([0, *counts[:-1]]).tolist()

    def __call__(self, indexed_record) -> dict:
        index, record = indexed_record
        file = bisect.bisect_right(self.starts, index) - 1
        where = f"{self.paths[file]} record {index - self.starts[file]}"
        exam = decode_exam(record, self.fields, where)
        if "eid" in exam:  # a 0-d unicode array, so that batching stacks it into [B]
            exam["eid"] = np.asarray(exam["eid"])
        return exam


class _ProcessRows(grain.MapDataset):
    """Process p's rows of every global batch: of each run of `batch_size * count`
    consecutive elements, those at [p * batch_size, (p + 1) * batch_size).

    A final partial global batch (finite epochs) is split into near-equal contiguous
    parts, so the processes' shares differ by at most one element.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, batch_size: int, index: int, count: int):
        super().__init__(parent)
        self._batch, self._index, self._global = batch_size, index, batch_size * count
        self._parent_length = len(parent)
        self._full, tail = divmod(self._parent_length, self._global)
        self._tail_start = tail * index // count
        tail_rows = tail * (index + 1) // count - self._tail_start
        self._length = self._full * batch_size + tail_rows

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        epoch, index = divmod(index, self._length)
        batch, row = divmod(index, self._batch)
        if batch < self._full:
            within = batch * self._global + self._index * self._batch + row
        else:
            within = self._full * self._global + self._tail_start + index - self._full * self._batch
        return epoch * self._parent_length + within

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessRows(batch={self._batch}, index={self._index}, global={self._global})"


def make_pipeline(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    fields=("images", "plane_mask"),
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_threads: int = 4,
    prefetch_batches: int = 4,
) -> grain.DatasetIterator:
    """An iterator of batches for this process: dicts of numpy arrays.

    Each field f of the exam schema (whmae.layout) comes back stacked as [B, *shape(f)]:
    images uint8 [B, 9, T, H, W], plane_mask bool [B, 9], eid unicode [B], ...
    batch_size is per process. num_epochs None repeats forever. Deterministic given
    `seed` (and independent of worker_count / read_threads). The iterator's state is
    saved with `grain.checkpoint.CheckpointSave(it)` (Orbax) or `it.get_state()`.

    With a finite num_epochs the processes' shares may differ by one exam (and so by one
    batch): multi-host evaluation must agree on the step count (e.g. pad, or take the
    minimum over hosts); training normally uses num_epochs=None.
    read_threads: Grain reader threads (0 = read in the calling thread);
    prefetch_batches: batches buffered ahead (memory: batch bytes x this).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if process_index is None or process_count is None:
        import jax  # only when the caller does not say which process this is

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    fields = tuple(fields)
    info = dataset_info(data_dir)
    paths = split_paths(data_dir, split, info)
    if not paths:
        raise RecordError(f"{data_dir}: split {split!r} has no exams")
    counts = _file_counts(paths)
    source = _NamedSource(paths, counts)
    if sum(counts) != info["splits"][split]["num_examples"]:
        raise RecordError(
            f"{data_dir}: split {split!r} files hold {sum(counts)} records but "
            f"dataset_info.json says {info['splits'][split]['num_examples']}"
        )

    ds = grain.MapDataset.source(source).map_with_index(_with_index).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    ds = _ProcessRows(ds, batch_size, process_index, process_count)
    ds = ds.map(_Decode(paths, counts, fields))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    )
    if worker_count > 0:
        from absl import flags

        from whmae.data.worker_pool import clean_shared_memory

        clean_shared_memory()  # batches in flight when an earlier run was killed

        # Grain reads its absl flags in the workers; scripts without absl.app never parse them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count),
            worker_init_fn=functools.partial(_grain_worker_init, os.getpid()),
        )
    return iter(it)


def _grain_worker_init(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """In each Grain worker: die with the training process (no orphans after a SIGKILL)."""
    del worker_index, worker_count
    from whmae.data.worker_pool import die_with_parent

    die_with_parent(parent_pid)


def _file_counts(paths: list[str]) -> list[int]:
    from array_record.python import array_record_module

    counts = []
    for path in paths:
        try:
            if os.path.getsize(path) == 0:
                raise RecordError("the file is empty")
            reader = array_record_module.ArrayRecordReader(path)
            counts.append(reader.num_records())
            reader.close()
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise _shard_error(path, e, "not a readable ArrayRecord shard") from e
    return counts
