"""MemoryStore: the on-disk memory of image-text pairs, row-aligned, memory-mapped, with one index per modality.

Layout of a memory directory (row i of every file is pair i)::

    manifest.json        format, backbone fingerprint, dim, count, dtype, backend spec, creation time
    image_emb.npy        float16 [N, dim], L2-normalised (memory-mapped on open)
    text_emb.npy         float16 [N, dim]
    ids.npy              int64 [N]: pair ids, used to exclude a training pair's own row
    metadata.parquet     id, caption, key per row
    index_image/         MemoryBackend over image_emb (index.faiss + backend.json)
    index_text/          MemoryBackend over text_emb

A directory is written under a temporary name and renamed into place only when complete, so a memory
that opens is always whole. Opening validates every file against the manifest before anything is used.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reco_lightning.arrays import LayoutError, RowWriter, open_array, read_manifest
from reco_lightning.atomic import atomic_write_text, replace_directory
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import DEFAULT_TRAIN_SIZE, MemoryBackend, backend_from_spec, recorded_spec
from reco_lightning.types import MODALITIES, Modality

__all__ = ["MemoryStore"]

FORMAT, VERSION = "reco-memory", 1


class MemoryStore:
    """Row-aligned image/text embeddings of N pairs plus a k-NN index per modality.

    Build one with :meth:`write` (from arrays), :func:`reco_lightning.jobs.memory_build.build_memory` (from a
    dataset, resumable) or :meth:`concat`; open one with :meth:`open`; or keep one in RAM with
    :meth:`from_arrays` (tests, small experiments).
    """

    def __init__(
        self,
        image_embeddings: np.ndarray,
        text_embeddings: np.ndarray,
        ids: np.ndarray,
        indexes: dict[str, MemoryBackend],
        manifest: dict[str, Any],
        path: Path | None = None,
    ) -> None:
        self.image_embeddings, self.text_embeddings, self.ids = image_embeddings, text_embeddings, ids
        self.indexes, self.manifest, self.path = indexes, manifest, path

    # --- accessors ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.manifest.get("fingerprint")

    @property
    def identity(self) -> str:
        """What a feature cache records to know it was computed against this exact memory."""
        return f"{self.manifest.get('created', '')}:{len(self)}:{self.manifest.get('backend', {}).get('class_path', '')}"

    def embeddings(self, modality: Modality) -> np.ndarray:
        return self.image_embeddings if modality == "image" else self.text_embeddings

    def index(self, modality: Modality) -> MemoryBackend:
        return self.indexes[modality]

    def nbytes(self) -> dict[str, int]:
        return {
            "embeddings": int(self.image_embeddings.nbytes + self.text_embeddings.nbytes),
            **{f"index_{m}": self.indexes[m].nbytes() for m in MODALITIES},
        }

    def to_device(self, device: int | None) -> None:
        for backend in self.indexes.values():
            backend.to_device(device)

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        image_embeddings: np.ndarray,
        text_embeddings: np.ndarray,
        ids: np.ndarray | None = None,
        backend: str | dict[str, Any] = "exact",
        fingerprint: dict[str, Any] | None = None,
        train_size: int | None = DEFAULT_TRAIN_SIZE,
    ) -> MemoryStore:
        """An in-RAM memory over given (normalised) embeddings; indexes built here."""
        image, text, ids = _validated_arrays(image_embeddings, text_embeddings, ids)
        indexes = {}
        for modality, rows in zip(MODALITIES, (image, text), strict=True):
            index = backend_from_spec(backend, image.shape[1])
            index.build(rows, train_size=train_size)
            index.attach(rows)
            indexes[modality] = index
        manifest = _manifest(len(ids), image.shape[1], fingerprint, indexes["image"], source="arrays")
        return cls(image, text, ids, indexes, manifest)

    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        image_embeddings: np.ndarray,
        text_embeddings: np.ndarray,
        ids: np.ndarray | None = None,
        captions: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        backend: str | dict[str, Any] = "exact",
        fingerprint: dict[str, Any] | None = None,
        source: str = "arrays",
        train_size: int | None = DEFAULT_TRAIN_SIZE,
        overwrite: bool = False,
        id_scheme: str | None = None,
    ) -> Path:
        """Write a complete memory directory atomically and return its path.

        ``id_scheme`` records where ``ids`` come from (``PairSource.id_scheme``): training checks a source's
        ids can be compared with the memory's before excluding a pair's own row by id.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise RecoMemoryError(
                f"memory {path} already exists: choose another path or pass overwrite=True (`--overwrite true`)"
            )
        image, text, ids = _validated_arrays(image_embeddings, text_embeddings, ids)
        tmp = Path(tempfile.mkdtemp(dir=_parent(path), prefix=f".{path.name}.partial-"))
        try:
            np.save(tmp / "image_emb.npy", image.astype(np.float16))
            np.save(tmp / "text_emb.npy", text.astype(np.float16))
            np.save(tmp / "ids.npy", ids)
            write_metadata(tmp / "metadata.parquet", ids, captions, keys)
            finish_memory(tmp, backend, fingerprint, source, train_size, extra={"id_scheme": id_scheme})
            replace_directory(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def concat(
        cls,
        paths: Sequence[str | os.PathLike],
        out: str | os.PathLike,
        backend: str | dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Concatenate memories built with one backbone into one, re-indexed without re-encoding.

        Rows, ids and metadata are copied block by block (never all in RAM: N node memories of a cluster
        build become one), into a work directory renamed into place when complete.
        """
        import pyarrow.parquet as pq

        if not paths:
            raise RecoMemoryError("concat needs at least one memory path")
        out = Path(out)
        if out.exists() and not overwrite:
            raise RecoMemoryError(
                f"memory {out} already exists: choose another path or pass overwrite=True (`--overwrite true`)"
            )
        stores = [cls.open(p, load_indexes=False) for p in paths]
        first = stores[0]
        for store in stores[1:]:
            if _backbone_key(store.fingerprint) != _backbone_key(first.fingerprint) or store.dim != first.dim:
                raise RecoMemoryError(
                    f"cannot concatenate {store.path} with {first.path}: built with different backbones "
                    f"({(store.fingerprint or {}).get('name_or_path')} vs {(first.fingerprint or {}).get('name_or_path')})"
                )
        total, dim = sum(len(s) for s in stores), first.dim
        tmp = Path(tempfile.mkdtemp(dir=_parent(out), prefix=f".{out.name}.partial-"))
        try:
            layout = {
                "image_emb": (np.float16, (total, dim)),
                "text_emb": (np.float16, (total, dim)),
                "ids": (np.int64, (total,)),
            }
            writers = {
                name: RowWriter(tmp / f"{name}.npy", dtype, shape) for name, (dtype, shape) in layout.items()
            }
            row = 0
            for store in stores:
                writers["image_emb"].copy(row, store.image_embeddings)
                writers["text_emb"].copy(row, store.text_embeddings)
                writers["ids"].copy(row, store.ids)
                row += len(store)
            for writer in writers.values():
                writer.close()
            writer = None
            for store in stores:
                for batch in pq.ParquetFile(store.path / "metadata.parquet").iter_batches(
                    columns=["id", "caption", "key"]
                ):
                    if writer is None:
                        writer = pq.ParquetWriter(tmp / "metadata.parquet", batch.schema)
                    writer.write_batch(batch)
            writer.close()
            finish_memory(
                tmp,
                backend or reindex_spec(first.manifest["backend"]),
                first.fingerprint,
                "concat:" + ",".join(str(s.path) for s in stores),
                extra={"id_scheme": _common({s.manifest.get("id_scheme") for s in stores})},
            )
            replace_directory(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def select(
        self,
        rows: np.ndarray,
        out: str | os.PathLike,
        backend: str | dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the memory made of ``rows`` of this one (e.g. a class subset), re-indexed, not re-encoded."""
        import pyarrow.parquet as pq

        if self.path is None:
            raise RecoMemoryError("select needs a memory opened from disk (its metadata lives there)")
        rows = np.asarray(rows, dtype=np.int64)
        meta = pq.read_table(self.path / "metadata.parquet").take(rows)
        return MemoryStore.write(
            out,
            np.asarray(self.image_embeddings[rows]),
            np.asarray(self.text_embeddings[rows]),
            ids=np.asarray(self.ids[rows]),
            captions=meta.column("caption").to_pylist(),
            keys=meta.column("key").to_pylist(),
            backend=backend or reindex_spec(self.manifest["backend"]),
            fingerprint=self.fingerprint,
            source=f"select:{self.path} ({len(rows)} of {len(self)} rows)",
            overwrite=overwrite,
            id_scheme=self.manifest.get("id_scheme"),
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_fingerprint: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        load_indexes: bool = True,
    ) -> MemoryStore:
        """Memory-map a memory directory after checking every file against its manifest.

        ``search_params`` override search-time backend arguments (e.g. ``nprobe``, ``rerank``).
        """
        path = Path(path)
        manifest = _read_manifest(path)
        count, dim = int(manifest["count"]), int(manifest["dim"])
        if count == 0:
            raise RecoMemoryError(f"memory {path} is empty: build it from at least one image-text pair")
        if expected_fingerprint is not None:
            check_fingerprint(manifest.get("fingerprint"), expected_fingerprint, f"memory {path}")
        arrays = {}
        for name, dtype, shape in (
            ("image_emb.npy", np.float16, (count, dim)),
            ("text_emb.npy", np.float16, (count, dim)),
            ("ids.npy", np.int64, (count,)),
        ):
            arrays[name] = _open_array(path / name, dtype, shape)
        _check_metadata(path / "metadata.parquet", count)
        indexes: dict[str, MemoryBackend] = {}
        if load_indexes:
            for modality in MODALITIES:
                index = MemoryBackend.load(path / f"index_{modality}", **(search_params or {}))
                if index.ntotal != count or index.dim != dim:
                    raise RecoMemoryError(
                        f"{path / f'index_{modality}'} holds {index.ntotal} vectors of dim {index.dim} but the "
                        f"store has {count} rows of dim {dim}: rebuild the index (the memory is inconsistent)"
                    )
                index.attach(arrays[f"{modality}_emb.npy"])
                indexes[modality] = index
        return cls(
            arrays["image_emb.npy"], arrays["text_emb.npy"], arrays["ids.npy"], indexes, manifest, path
        )


# --- helpers shared with the resumable builder ------------------------------------------------------
def check_fingerprint(found: dict[str, Any] | None, expected: dict[str, Any], what: str) -> None:
    """Refuse embeddings from another backbone: their spaces are unrelated even at equal dim."""
    if found is None:
        raise RecoMemoryError(f"{what} records no backbone fingerprint: rebuild it with `reco memory build`")
    if int(found.get("dim", -1)) != int(expected["dim"]):
        raise RecoMemoryError(
            f"{what} has dim {found.get('dim')} but the backbone {expected['name_or_path']} has dim "
            f"{expected['dim']}: use a memory built with this backbone"
        )
    if found.get("declared"):  # an imported memory: its backbone was named, not fingerprinted
        _warn_declared(found, expected, what)
        return
    if found.get("id") != expected["id"]:
        raise RecoMemoryError(
            f"{what} was built with backbone {found.get('name_or_path')!r} (id {found.get('id')}) but the model "
            f"uses {expected['name_or_path']!r} (id {expected['id']}): rebuild the memory with this backbone"
        )


_WARNED_DECLARED: set[str] = set()


def _warn_declared(found: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    """One warning per memory: an imported memory's backbone is trusted on its word (the dim matched)."""
    if what in _WARNED_DECLARED:
        return
    _WARNED_DECLARED.add(what)
    declared, used = found.get("name_or_path"), expected.get("name_or_path")
    local = Path(str(used)).is_dir() and Path(str(used)).resolve() == Path(str(declared)).resolve()
    same = "the model's backbone" if declared == used or local else f"not the model's {used!r}"
    warnings.warn(
        f"{what}'s backbone is declared, not verified: it was imported as encoded by {declared!r} ({same}, "
        f"dim {found.get('dim')}); its rows are used as if they came from the model's backbone",
        stacklevel=3,
    )


def reindex_spec(spec: str | dict[str, Any]) -> str | dict[str, Any]:
    """A memory's recorded backend spec, for indexing other rows: what its rules chose is chosen again.

    The spec's ``derived`` names the init_args a backend's rules chose from the rows it indexed (an IVF-PQ's
    nlist, nprobe and rerank, from N), and ``tuned`` says nprobe and rerank were measured on them (``reco
    memory tune``); they are left out, so ``select`` and ``concat`` derive them anew.
    """
    if not isinstance(spec, dict) or not (spec.get("derived") or spec.get("tuned")):
        return spec
    chosen = set(spec.get("derived") or ()) | ({"nprobe", "rerank"} if spec.get("tuned") else set())
    init_args = {k: v for k, v in (spec.get("init_args") or {}).items() if k not in chosen}
    return {"class_path": spec["class_path"], "init_args": init_args}


def write_metadata(
    path: Path, ids: np.ndarray, captions: Sequence[str] | None, keys: Sequence[str] | None
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(ids)
    for name, column in (("captions", captions), ("keys", keys)):
        if column is not None and len(column) != n:
            raise RecoMemoryError(f"{name} has {len(column)} entries for {n} memory rows")
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.int64()),
            "caption": pa.array(list(captions) if captions is not None else [""] * n, type=pa.string()),
            "key": pa.array(list(keys) if keys is not None else [str(i) for i in ids], type=pa.string()),
        }
    )
    pq.write_table(table, path)


def finish_memory(
    directory: Path,
    backend: str | dict[str, Any] | MemoryBackend,
    fingerprint: dict[str, Any] | None,
    source: str,
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    extra: dict[str, Any] | None = None,
    resume: bool = False,
) -> None:
    """Index the embeddings already in ``directory`` and write the manifest last (it marks completion).

    ``extra`` adds fields to the manifest (a build's bad-sample count and first keys). ``resume``: keep a
    modality's index already complete in ``directory`` (its ``backend.json`` is written last), for a
    resumed job whose plan pins the rows and the backend (``reco memory import``).
    """
    from tqdm.auto import tqdm

    count = dim = 0
    spec: dict[str, Any] = {}
    for modality in tqdm(MODALITIES, desc="indexing memory", leave=False):
        rows = np.load(directory / f"{modality}_emb.npy", mmap_mode="r")
        count, dim = rows.shape
        if count == 0:
            raise RecoMemoryError(
                f"no pairs were encoded into {directory}: the source is empty or every sample was bad"
            )
        target = directory / f"index_{modality}"
        if resume and (target / "backend.json").is_file():
            spec = recorded_spec(target)
            continue
        index = backend_from_spec(backend if not isinstance(backend, MemoryBackend) else backend.spec(), dim)
        index.build_saved(rows, target, train_size=train_size)
        spec = index.spec()
    manifest = {**_manifest(count, dim, fingerprint, spec, source), **(extra or {})}
    atomic_write_text(directory / "manifest.json", json.dumps(manifest, indent=2))


def record_backend(directory: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``directory/manifest.json`` atomically after a re-index, tuning or adoption of one side or both.

    ``backend`` becomes ``spec`` (the one just written; what ``concat`` and ``select`` re-index with by
    default). While the two sides' indexes differ (one side re-indexed or adopted, or each tuned to its own
    nprobe), ``backend_by_modality`` holds each side's spec as its index directory records it, so the
    manifest never describes an index the memory does not have; it is dropped once they agree again."""
    specs = {
        modality: recorded_spec(directory / f"index_{modality}")
        for modality in MODALITIES
        if (directory / f"index_{modality}" / "backend.json").is_file()
    }
    manifest = {k: v for k, v in _read_manifest(directory).items() if k != "backend_by_modality"}
    manifest["backend"] = spec
    if len({json.dumps(s, sort_keys=True) for s in specs.values()}) > 1:
        manifest["backend_by_modality"] = specs
    atomic_write_text(directory / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def _manifest(
    count: int,
    dim: int,
    fingerprint: dict[str, Any] | None,
    backend: MemoryBackend | dict[str, Any],
    source: str,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "dim": int(dim),
        "count": int(count),
        "dtype": "float16",
        "normalized": True,
        "backend": backend.spec() if isinstance(backend, MemoryBackend) else backend,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "source": source,
    }


def _validated_arrays(
    image: np.ndarray, text: np.ndarray, ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, text = np.asarray(image), np.asarray(text)
    if image.ndim != 2 or image.shape != text.shape:
        raise RecoMemoryError(
            f"image and text embeddings must be row-aligned [N, dim] arrays, got {image.shape} and {text.shape}"
        )
    if len(image) == 0:
        raise RecoMemoryError("cannot build an empty memory: give at least one image-text pair")
    ids = np.arange(len(image), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(image),):
        raise RecoMemoryError(f"ids must have shape [{len(image)}], got {ids.shape}")
    return image, text, ids


def _read_manifest(path: Path) -> dict[str, Any]:
    """The memory's manifest (see :func:`reco_lightning.arrays.read_manifest`), failures in a memory's words."""
    try:
        return read_manifest(path, FORMAT)
    except LayoutError as problem:
        manifest_path = problem.path
        if problem.problem == "missing":
            hint = (
                " (an interrupted build? resume it with the same `reco memory build` command)"
                if any(path.parent.glob(f".{path.name}.partial*"))
                else ""
            )
            message = f"{path} is not a memory: {manifest_path} is missing{hint}"
            if not path.exists() and not hint:
                message = f"memory directory {path} does not exist: build one with `reco memory build`"
        elif problem.problem == "corrupt":
            message = f"corrupt {manifest_path}: {problem.cause}; rebuild the memory"
        else:
            message = f"{manifest_path} is not a reco memory manifest (format={problem.found!r})"
        raise RecoMemoryError(message) from problem.cause


def _open_array(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """One store array (see :func:`reco_lightning.arrays.open_array`), failures in a memory's words."""
    try:
        return open_array(path, shape, dtype)
    except LayoutError as problem:
        err, found = problem.cause, problem.found
        if problem.problem == "missing":
            raise RecoMemoryError(
                f"missing memory file {path}: the memory is incomplete, rebuild it"
            ) from None
        if problem.problem == "unreadable":
            message = (
                f"cannot read {path} ({type(err).__name__}: {err}): the file is empty, truncated or corrupt, "
                "rebuild the memory"
            )
        else:
            message = (
                f"{path} holds {found.dtype}{list(found.shape)} but the manifest says {np.dtype(dtype)}{list(shape)}: "
                "rebuild the memory"
            )
        raise RecoMemoryError(message) from err


def _check_metadata(path: Path, count: int) -> None:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise RecoMemoryError(f"missing memory file {path}: the memory is incomplete, rebuild it")
    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid on truncated parquet
        raise RecoMemoryError(
            f"cannot read {path} ({err}): the file is truncated, rebuild the memory"
        ) from err
    if rows != count:
        raise RecoMemoryError(f"{path} has {rows} rows but the manifest says {count}: rebuild the memory")


def _backbone_key(fingerprint: dict[str, Any] | None) -> Any:
    """What must agree for two memories' rows to share a space: the fingerprint id, or a declared name and dim."""
    fingerprint = fingerprint or {}
    if fingerprint.get("declared"):
        return ("declared", fingerprint.get("name_or_path"), fingerprint.get("dim"))
    return fingerprint.get("id")


def _common(values: set[Any]) -> Any:
    """The one value all members share, else None (memories with different id schemes have none)."""
    return next(iter(values)) if len(values) == 1 else None


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent
