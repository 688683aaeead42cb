"""IVF-PQ with inverted lists on disk, built in shards by independent processes and opened memory-mapped.

At 10M to 1B rows the IVF-PQ codes (``m`` bytes + an 8-byte id per row: 720 MB at 10M, 72 GB at 1B) should
neither be held by every rank nor be built in one process's RAM. faiss's own machinery does both
(``OnDiskInvertedLists``, ``faiss.contrib.ondisk.merge_ondisk``); this module wraps it in three resumable
stages over a memory's fp16 rows (a memmap), each writing its output atomically to a work directory:

1. ``train``: the coarse quantiser and the PQ, trained on a fixed sample, written as ``trained.faiss``;
2. ``shard i of n``: rows ``[i*N/n, (i+1)*N/n)`` added to a copy of the trained index with their global row
   ids, written as ``shard_{i}.faiss`` (one process per shard: a device, a node, a job-array task; a killed
   shard loses only itself);
3. ``merge``: the shards' lists concatenated, in shard order, into ``lists.ivfdata`` beside ``index.faiss``.

Every stage is deterministic, so a resumed build ends bit-identical to an uninterrupted one. The index
directory holds ``index.faiss`` (header, quantiser, PQ; the lists file is named relative to it) and
``lists.ivfdata``; :meth:`OnDiskIVFPQBackend.load` maps the lists read-only and shared, so every process
of a node that opens the memory reads one page-cached copy, and its RSS holds only the pages it touches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from reco_lightning.arrays import release_pages
from reco_lightning.atomic import atomic_write, atomic_write_text, claim_plan, plan_diff, replace_directory
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import (
    DEFAULT_TRAIN_SIZE,
    MemoryBackend,
    backend_from_spec,
    register_backend,
    training_sample,
)
from reco_lightning.memory.ivfpq import IVFPQBackend

__all__ = ["LISTS_FILE", "PLAN_FILE", "SHARD_ROWS", "OnDiskIVFPQBackend", "ShardedIndexBuild"]

#: The inverted lists' file, beside ``index.faiss``; the index records this name, not a path.
LISTS_FILE = "lists.ivfdata"
#: Default rows per shard: a shard's codes are in RAM while it is built (2M x 72 bytes = 144 MB at m = 64).
SHARD_ROWS = 2_000_000
_ADD_BLOCK = 65_536
PLAN_FILE = "plan.json"


@register_backend("ivfpq_ondisk")
class OnDiskIVFPQBackend(IVFPQBackend):
    """:class:`IVFPQBackend` whose inverted lists live in ``lists.ivfdata``, memory-mapped when loaded.

    Same layout arguments, derived defaults and exact re-ranking as ``ivfpq``; the index searched is the same
    IVF-PQ, so results equal an in-RAM one built from the same training. ``build`` (the API, small memories)
    adds in RAM and ``save`` moves the lists to disk; a memory's build goes through :meth:`build_saved`,
    shard by shard (:class:`ShardedIndexBuild`), so RAM holds one shard's codes at a time.
    """

    def build_saved(
        self,
        rows: np.ndarray,
        directory: str | os.PathLike,
        train_size: int | None = DEFAULT_TRAIN_SIZE,
        seed: int = 0,
    ) -> None:
        """Build over ``rows`` in shards and save into ``directory``; resumable from its work directory."""
        directory = Path(directory)
        work = directory.with_name(f".{directory.name}.shards")
        build = ShardedIndexBuild(rows, work, self.spec_for_build(), train_size=train_size, seed=seed)
        build.train()
        for shard in range(build.num_shards):
            build.build_shard(shard)
        built = build.merge(directory)
        self.__dict__.update(built.__dict__)
        shutil.rmtree(work, ignore_errors=True)

    def spec_for_build(self) -> dict[str, Any]:
        """The spec a sharded build starts from: what the user gave, the rest derived from the rows."""
        given = {k: v for k, v in self.init_args().items() if k not in self._derived}
        return {"class_path": self.spec()["class_path"], "init_args": given}

    def nbytes(self) -> int:
        """Bytes of the index on disk: codes and ids in the lists file, plus centroids and codebooks."""
        if self.index is None:
            return 0
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(self.index).invlists)
        if isinstance(invlists, faiss.OnDiskInvertedLists):
            return int(invlists.totsize) + _header_bytes(self.index)
        return super().nbytes()

    def save(self, directory: str | os.PathLike) -> None:
        """Write the lists to ``directory/lists.ivfdata`` (if they are not there yet), then the index.

        Readers of a memory never see a half-saved index: memories are written in a work directory renamed
        into place when complete. Saving the same backend into a live memory is not atomic across the files.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.index is None:
            raise RecoMemoryError("ivfpq_ondisk index is not trained: build it before saving")
        ivf = faiss.extract_index_ivf(self.index)
        invlists = faiss.downcast_InvertedLists(ivf.invlists)
        target = directory / LISTS_FILE
        on_disk = isinstance(invlists, faiss.OnDiskInvertedLists)
        if not (on_disk and Path(invlists.filename).resolve() == target.resolve()):
            self.index = _with_lists_on_disk(self.index, target)
        super().save(directory)

    def _save_index(self, path: Path) -> None:
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(self.index).invlists)
        full = invlists.filename
        invlists.filename = LISTS_FILE  # a name beside index.faiss, so the directory can move
        try:
            faiss.write_index(self.index, str(path))
        finally:
            invlists.filename = full

    def _load_index(self, path: Path) -> None:
        lists = path.with_name(LISTS_FILE)
        if not lists.is_file():
            raise ValueError(f"{lists} is missing")
        with quiet_stdout():  # faiss prints the lists' resolved path on every open
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        if not isinstance(invlists, faiss.OnDiskInvertedLists):
            raise ValueError(f"{path} holds in-RAM inverted lists, not on-disk ones")
        if os.path.getsize(lists) < invlists.totsize:
            raise ValueError(
                f"{lists} has {os.path.getsize(lists)} bytes but the index needs {invlists.totsize}"
            )
        self._adopt(index)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what C++ code prints to file descriptor 1 (faiss's on-disk lists log every open and resize)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _header_bytes(index: faiss.Index) -> int:
    """Bytes of the coarse centroids and PQ codebooks (what ``index.faiss`` holds besides the list headers)."""
    pq = index.pq
    return int(index.nlist * index.d * 4 + pq.M * pq.ksub * pq.dsub * 4)


def _with_lists_on_disk(index: faiss.Index, target: Path) -> faiss.Index:
    """A copy of ``index`` whose inverted lists are written to ``target`` (any lists file there is replaced)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    ivf = faiss.extract_index_ivf(index)
    out = faiss.clone_index(index)
    out_ivf = faiss.extract_index_ivf(out)
    out_ivf.ntotal = out.ntotal = 0
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp))
    sources = faiss.InvertedListsPtrVector()
    sources.push_back(ivf.invlists)
    with quiet_stdout():
        ntotal = invlists.merge_from_multiple(sources.data(), 1, False, False)
    out.ntotal = out_ivf.ntotal = ntotal
    out_ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    os.replace(tmp, target)
    invlists.filename = str(target)
    return out


class ShardedIndexBuild:
    """Train, shard and merge an on-disk IVF-PQ over ``rows`` ([N, dim], fp16 or fp32, typically a memmap).

    ``work`` keeps the stages' outputs; ``plan.json`` there records what is being built (rows, dim, the
    backend spec, shard count, training sample), and a work directory holding another plan is refused, so
    resuming with other arguments cannot mix two builds. ``spec``: an ``ivfpq_ondisk`` (or ``ivfpq``) spec
    whose unset layout arguments are derived from N, as ``ivfpq`` does.
    """

    def __init__(
        self,
        rows: np.ndarray,
        work: str | os.PathLike,
        spec: str | dict[str, Any] = "ivfpq_ondisk",
        num_shards: int | None = None,
        train_size: int | None = DEFAULT_TRAIN_SIZE,
        seed: int = 0,
    ) -> None:
        if rows.ndim != 2 or len(rows) == 0:
            raise RecoMemoryError(f"an index needs rows [N > 0, dim], got {tuple(rows.shape)}")
        self.rows, self.work = rows, Path(work)
        count, dim = rows.shape
        if num_shards is None:
            num_shards = max(1, math.ceil(count / SHARD_ROWS))
        if not 1 <= num_shards <= count:
            raise RecoMemoryError(f"num_shards={num_shards} must be in 1..{count} (the number of rows)")
        self.num_shards = int(num_shards)
        backend = backend_from_spec(spec, dim)
        if not isinstance(backend, OnDiskIVFPQBackend):
            raise RecoMemoryError(
                f"a sharded build makes an 'ivfpq_ondisk' index, not {type(backend).__name__}: pass "
                "--backend ivfpq_ondisk (with any of nlist, m, nbits, nprobe, rerank)"
            )
        self.plan = {
            "rows": int(count),
            "dim": int(dim),
            "spec": backend.spec_for_build(),
            "num_shards": self.num_shards,
            "train_size": train_size,
            "seed": int(seed),
        }
        self.train_size, self.seed = train_size, int(seed)

    # --- stages ---------------------------------------------------------------------------------------
    def train(self) -> OnDiskIVFPQBackend:
        """Stage 1 (one process): train on the sample and write ``trained.faiss``; a no-op once written.

        ``trained.json`` (the resolved arguments) is written last and marks the stage complete.
        """
        self._claim_work()
        if self._is_trained():
            return self._trained()
        backend = self._backend()
        backend.train(training_sample(self.rows, self.train_size, self.seed), ntotal=len(self.rows))
        atomic_write(self.work / "trained.faiss", lambda tmp: faiss.write_index(backend.index, str(tmp)))
        atomic_write_text(self.work / "trained.json", json.dumps(backend.init_args()))
        return backend

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``shard``: contiguous, in order, sizes differing by at most one."""
        if not 0 <= shard < self.num_shards:
            raise RecoMemoryError(f"shard {shard} does not exist: use 0..{self.num_shards - 1}")
        count = len(self.rows)
        return shard * count // self.num_shards, (shard + 1) * count // self.num_shards

    def shard_path(self, shard: int) -> Path:
        return self.work / f"shard_{shard:05d}_of_{self.num_shards:05d}.faiss"

    def build_shard(self, shard: int, progress: bool = True) -> Path:
        """Stage 2 (one process per shard, any order, any machine sharing ``work``); a no-op once written."""
        path = self.shard_path(shard)
        start, stop = self.shard_range(shard)
        if path.is_file():
            return path
        trained = self.work / "trained.faiss"
        self._claim_work()
        if not self._is_trained():
            raise RecoMemoryError(
                f"{trained} is missing or incomplete (no trained.json beside it): run the train stage first "
                "(`reco memory index ... --stage train`)"
            )
        index = faiss.read_index(str(trained))
        blocks = range(start, stop, _ADD_BLOCK)
        if progress:
            from tqdm.auto import tqdm

            blocks = tqdm(blocks, desc=f"shard {shard}/{self.num_shards}", leave=False)
        for lo in blocks:
            hi = min(stop, lo + _ADD_BLOCK)
            block = np.ascontiguousarray(self.rows[lo:hi], dtype=np.float32)
            release_pages(self.rows)  # RSS holds one block of rows, not the shard's
            index.add_with_ids(block, np.arange(lo, hi, dtype=np.int64))
        atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
        return path

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]

    def merge(self, directory: str | os.PathLike) -> OnDiskIVFPQBackend:
        """Stage 3 (one process): every shard's lists into ``directory`` (index.faiss, lists.ivfdata, backend.json).

        The directory is filled under a temporary name and renamed into place, so an index directory is
        whole or absent. Needs every shard: a missing one is named.
        """
        from faiss.contrib.ondisk import merge_ondisk

        self._claim_work()
        missing, trained = self.missing_shards(), self._is_trained()
        if missing or not trained:
            what = f"shards {missing}" if trained else "trained.faiss"
            raise RecoMemoryError(
                f"{self.work} lacks {what}: build them (`reco memory index ... --stage train|shard`) before merging"
            )
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.merging")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        backend = self._trained()
        with quiet_stdout():  # faiss prints the lists file's size
            merge_ondisk(
                backend.index,
                [str(self.shard_path(s)) for s in range(self.num_shards)],
                str(tmp / LISTS_FILE),
            )
        if backend.ntotal != len(self.rows):
            raise RecoMemoryError(
                f"the shards in {self.work} hold {backend.ntotal} rows, not {len(self.rows)}: delete them and rebuild"
            )
        MemoryBackend.save(backend, tmp)
        derived = backend._derived
        del backend
        replace_directory(tmp, directory)
        loaded = MemoryBackend.load(directory)
        loaded._derived = derived  # what the rules chose, for the manifest (see store.reindex_spec)
        return loaded  # type: ignore[return-value]

    # --- helpers --------------------------------------------------------------------------------------
    def _backend(self) -> OnDiskIVFPQBackend:
        return backend_from_spec(self.plan["spec"], self.plan["dim"])  # type: ignore[return-value]

    def _is_trained(self) -> bool:
        return (self.work / "trained.faiss").is_file() and (self.work / "trained.json").is_file()

    def _trained(self) -> OnDiskIVFPQBackend:
        """The trained, empty backend from ``trained.faiss`` with the args training resolved."""
        args = json.loads((self.work / "trained.json").read_text())
        backend = OnDiskIVFPQBackend(dim=self.plan["dim"], **args)
        backend._derived = self._backend()._derived
        backend.index = faiss.read_index(str(self.work / "trained.faiss"))
        backend.index.nprobe = backend.nprobe
        return backend

    def _claim_work(self) -> None:
        """Create ``work`` with this build's plan, or check the plan found there is this one."""
        self.work.mkdir(parents=True, exist_ok=True)
        found = claim_plan(self.work / PLAN_FILE, self.plan)
        if found is not None:
            raise RecoMemoryError(
                f"{self.work} holds another index build ({plan_diff(found, self.plan)}): finish that build with "
                "its arguments (the shard and merge stages take them from it when --backend and --num_shards "
                "are left out), or delete the folder to start over"
            )
