"""Device prefetch: the next batches are made into global device arrays in a background thread.

`device_prefetch(iterator, mesh, buffer_size=2, host_fn=None)` wraps a Grain `DatasetIterator` of
host-local numpy batches so that `next()` returns the batch already on the mesh
(`sharding.global_batch`, split over every device), while the following `buffer_size` batches are
being fetched and copied: the host-to-device copy overlaps the running step. Both training loops
use it. Built on Grain's own `ThreadPrefetchDatasetIterator` (what `grain.experimental.device_put`
uses, which takes a dataset and `jax.device_put`s it; here the loops hold an iterator and need
`global_batch` for several processes), so checkpointing is Grain's: `get_state()` is the state
after the last batch *returned* (not the prefetched ones) and `set_state()` stops the thread,
restores the parent and refills: a resumed run reads the same batches.

`host_fn(batch) -> batch` (optional) runs on the host batch first, in the thread; an error it raises
comes out of the `next()` that would have returned that batch.
"""
from __future__ import annotations

from typing import Any, Callable

import grain

from lafs_jax import sharding as mesh_lib


class _GlobalBatches(grain.DatasetIterator):
    """parent's batches -> host_fn -> global arrays on `mesh`; state is the parent's."""

    def __init__(self, parent: grain.DatasetIterator, mesh, host_fn: Callable[[Any], Any] | None):
        super().__init__(parent)
        self._mesh, self._host_fn = mesh, host_fn

    def __next__(self):
        batch = next(self._parent)
        if self._host_fn is not None:
            batch = self._host_fn(batch)
        return mesh_lib.global_batch(batch, self._mesh)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        self._parent.close()


def device_prefetch(iterator: grain.DatasetIterator, mesh, buffer_size: int = 2,
                    host_fn: Callable[[Any], Any] | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of global batches on `mesh`, `buffer_size` of them prepared ahead
    by a background thread (0: no thread, each batch made when asked)."""
    if not isinstance(buffer_size, int) or buffer_size < 0:
        raise ValueError(f"device_prefetch: buffer_size must be an int >= 0, got {buffer_size!r}")
    return grain.experimental.ThreadPrefetchDatasetIterator(_GlobalBatches(iterator, mesh, host_fn), buffer_size)
