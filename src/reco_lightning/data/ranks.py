"""Which rank and which DataLoader worker gets which item of an epoch: the split every stream shares.

Item ``i`` of an epoch's order goes to rank ``i % world_size`` and, inside that rank, to DataLoader
worker ``(i // world_size) % num_workers``. Streaming pairs (positions in a source) and cached features
(rows of a cache) are split by this one rule, so both give every rank the same share and never give a
pair to two ranks. Apart because the rule is the DDP contract of the data, whatever the data is.
"""

from __future__ import annotations

import math

__all__ = ["batch_count", "share"]


def share(count: int, rank: int, world_size: int, worker: int, num_workers: int) -> range:
    """The items of ``range(count)`` that go to ``rank`` and, there, to DataLoader ``worker``, in order.

    Item ``i`` goes to rank ``i % world_size`` and worker ``(i // world_size) % num_workers`` (see the
    module docstring): that is every ``world_size * num_workers``-th item from ``rank + world_size * worker``.
    """
    return range(rank + world_size * worker, count, world_size * num_workers)


def batch_count(count: int, rank: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Batches ``rank`` yields over ``range(count)`` when each of its workers batches its own :func:`share`."""
    return sum(
        math.ceil(len(share(count, rank, world_size, worker, num_workers)) / batch_size)
        for worker in range(num_workers)
    )
