"""Memories to and from clip-retrieval's embeddings layout (``reco memory import`` / ``reco memory export``).

The layout (clip-retrieval, autofaiss, embedding-reader, and our own ``reco predict``)::

    img_emb/img_emb_{i}.npy          [n_i, dim] image embeddings of part i
    text_emb/text_emb_{i}.npy        [n_i, dim] text embeddings of part i
    metadata/metadata_{i}.parquet    n_i rows: caption, image_path / key, ... of part i

Parts are matched across the three folders by their suffix ``i`` and taken in sorted file-name order, as
the readers take them. :func:`import_embeddings` scans every part before copying anything (a part missing
from a folder, or whose row counts differ, is refused: a short metadata part must never shift rows), then
copies part by part (each part memory-mapped, never the whole set in RAM) into the memory's arrays inside
the build's work directory ``.<name>.partial``; after each part a progress file is written, so a re-run
after a kill resumes from the next part and ends with the files of an uninterrupted run. ``metadata.parquet``
is written part by part too (a row group per part), and the index is built by the backend's
``build_saved`` (``ivfpq_ondisk``: in resumable shards inside the work directory).

The backbone is verified where it can be (:func:`verify_backbone`): its weights re-encode a sample of the
captions (always in the metadata) and of the images (where the keys are paths of files found); rows that do
not match are refused, and a match records the backbone's real fingerprint. Without its weights the memory
records it as declared (``{"name_or_path", "dim", "declared": True}``) and a model opens it with one warning
when the dims agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reco_lightning.arrays import RowWriter
from reco_lightning.atomic import atomic_write, atomic_write_text, claim_plan, plan_diff, replace_directory
from reco_lightning.errors import RecoMemoryError
from reco_lightning.hashing import derived_ids
from reco_lightning.memory.base import DEFAULT_TRAIN_SIZE, backend_from_spec, check_buildable
from reco_lightning.memory.store import MemoryStore, finish_memory

__all__ = ["NORM_TOLERANCE", "VERIFY_COSINE", "export_memory", "import_embeddings", "verify_backbone"]

#: rows whose L2 norm is further than this from 1 are normalised on import (and counted)
NORM_TOLERANCE = 1e-3
#: the median cosine between stored rows and their re-encoding that a verified backbone must reach (fp16
#: storage and other hardware leave ~0.999; another backbone of the same dim is near 0)
VERIFY_COSINE = 0.99
_FOLDERS = (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet"))
_PROGRESS, _BLOCK = "import_progress.json", 65_536
_ID_SCHEME_KEY = b"reco_id_scheme"  # an exported part's parquet metadata: the memory's id scheme


def _parts(src: Path) -> list[str]:
    """The part suffixes of ``src`` in sorted file-name order; a part missing from a folder is refused."""
    found: dict[str, set[str]] = {}
    for folder, ext in _FOLDERS:
        pattern = re.compile(rf"^{folder}_(.+){re.escape(ext)}$")
        directory = src / folder
        if not directory.is_dir():
            raise RecoMemoryError(
                f"{directory} is missing: {src} is not in clip-retrieval's embeddings layout"
            )
        found[folder] = {m.group(1) for p in directory.iterdir() if (m := pattern.match(p.name))}
    every = sorted(set().union(*found.values()))
    if not every:
        raise RecoMemoryError(f"{src} holds no parts in img_emb/, text_emb/, metadata/: nothing to import")
    for suffix in every:
        for folder, ext in _FOLDERS:
            if suffix not in found[folder]:
                raise RecoMemoryError(
                    f"part {suffix} has no {src / folder / f'{folder}_{suffix}{ext}'}: restore it, or remove that "
                    "part from every folder"
                )
    return every


def _scan(
    src: Path, id_column: str | None, caption_column: str, key_column: str | None
) -> tuple[list[dict[str, Any]], int, str, str | None]:
    """Every part's rows, the dim, the key source and the id scheme that :func:`export_memory` recorded in
    every part (None where a part has none: not our export), checked before anything is written."""
    import pyarrow.parquet as pq

    parts, dim, key_source, schemes = [], None, None, set()
    for suffix in _parts(src):
        img_path, text_path = (
            src / "img_emb" / f"img_emb_{suffix}.npy",
            src / "text_emb" / f"text_emb_{suffix}.npy",
        )
        meta_path = src / "metadata" / f"metadata_{suffix}.parquet"
        img, text = np.load(img_path, mmap_mode="r"), np.load(text_path, mmap_mode="r")
        for path, rows in ((img_path, img), (text_path, text)):
            if rows.ndim != 2 or rows.dtype.kind != "f":
                raise RecoMemoryError(
                    f"{path} holds {rows.dtype}{list(rows.shape)}, not float [rows, dim] embeddings: fix that part"
                )
        if len(img) != len(text):
            raise RecoMemoryError(
                f"{img_path} has {len(img)} rows but {text_path} has {len(text)}: the part's pairs are not aligned, "
                "fix or remove that part"
            )
        if img.shape[1] != text.shape[1] or (dim is not None and img.shape[1] != dim):
            raise RecoMemoryError(
                f"{img_path} / {text_path} have dims {img.shape[1]} / {text.shape[1]} but the parts before have "
                f"{dim or img.shape[1]}: every part must come from one backbone, remove the odd part"
            )
        dim = int(img.shape[1])
        meta = pq.ParquetFile(meta_path)
        if meta.metadata.num_rows != len(img):
            raise RecoMemoryError(
                f"{meta_path} has {meta.metadata.num_rows} rows but {img_path} has {len(img)}: the metadata would "
                "shift rows, fix or remove that part"
            )
        columns = set(meta.schema_arrow.names)
        for wanted, flag in (
            (id_column, "--id_column"),
            (caption_column, "--caption_column"),
            (key_column, "--key_column"),
        ):
            if wanted is not None and wanted not in columns:
                raise RecoMemoryError(
                    f"{meta_path} has no column {wanted!r} (it has {sorted(columns)}): pass the right {flag}"
                )
        source = key_column or next((c for c in ("key", "image_path") if c in columns), "position")
        if key_source is not None and source != key_source:
            raise RecoMemoryError(
                f"{meta_path} keys its rows by {source!r} but the parts before by {key_source!r}: pass --key_column"
            )
        key_source = source
        recorded = (meta.schema_arrow.metadata or {}).get(_ID_SCHEME_KEY)
        schemes.add(recorded.decode() if recorded is not None and "id" in columns else None)
        parts.append({"suffix": suffix, "rows": len(img)})
    assert dim is not None and key_source is not None
    return parts, dim, key_source, schemes.pop() if len(schemes) == 1 else None


def _read_meta(
    path: Path, suffix: str, id_column: str | None, caption_column: str, key_source: str, id_scheme: str
) -> tuple[np.ndarray, list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({c for c in (id_column, caption_column, key_source) if c and c != "position"})
    table = pq.read_table(path, columns=columns)
    captions = ["" if c is None else str(c) for c in table.column(caption_column).to_pylist()]
    if key_source == "position":
        keys = [f"{suffix}:{row}" for row in range(table.num_rows)]
    else:
        keys = ["" if k is None else str(k) for k in table.column(key_source).to_pylist()]
    if id_column is not None:
        column = table.column(id_column)
        if not pa.types.is_integer(column.type):
            raise RecoMemoryError(
                f"{path}: column {id_column!r} holds {column.type}, not integer ids: fix it"
            )
        if column.null_count:
            raise RecoMemoryError(
                f"{path}: column {id_column!r} has {column.null_count} empty ids: fill them"
            )
        ids = np.asarray(column.to_numpy(), dtype=np.int64)
    else:
        ids = derived_ids(id_scheme, keys)
    return ids, captions, keys


def _copy_rows(source: Path, target: RowWriter, start: int) -> int:
    """Copy a part's rows to ``target`` from row ``start`` as fp16, L2-normalising rows off unit norm; how many were.

    Read and written block by block with plain file I/O (a memmap's pages would count in RSS and fault one
    by one). Norms by torch (:func:`_norms`; numpy's norm was half of an import's time); an fp16 block
    already of unit norm is written as is, so the stored rows are the source's bits.
    """
    header = np.load(source, mmap_mode="r")  # shape, dtype and data offset only
    (count, dim), dtype, offset = header.shape, header.dtype, int(header.offset)
    del header
    fixed = 0
    with open(source, "rb") as fh:
        fh.seek(offset)
        for lo in range(0, count, _BLOCK):
            n = min(_BLOCK, count - lo)
            raw = np.fromfile(fh, dtype=dtype, count=n * dim).reshape(n, dim)
            block = torch.from_numpy(raw)
            norms = _norms(block)
            if not bool(torch.isfinite(norms).all()):
                finite = np.isfinite(raw).all(axis=1)
                if not finite.all():
                    bad = lo + int(np.flatnonzero(~finite)[0])
                    raise RecoMemoryError(f"{source} row {bad} is not finite: fix or remove that part")
                norms = torch.from_numpy(np.linalg.norm(raw.astype(np.float64), axis=1)).float()  # overflow
            off = (norms - 1.0).abs() > NORM_TOLERANCE
            n_off = int(off.sum())
            if n_off:
                if bool((norms[off] == 0).any()):
                    bad = lo + int(torch.nonzero(norms == 0)[0, 0])
                    raise RecoMemoryError(
                        f"{source} row {bad} is all zeros and cannot be normalised: fix that part"
                    )
                block = block.float()
                block[off] /= norms[off, None]
                fixed += n_off
            target.write(start + lo, raw if not n_off and dtype == np.float16 else block.half().numpy())
    return fixed


def _norms(block: torch.Tensor) -> torch.Tensor:
    """float32 L2 norms of the rows of ``block``; for fp16, a 3x cheaper fp16 screen first.

    torch reduces fp16 in float32 but rounds the norm to fp16 (half an ulp is 2**-11 ~ 0.00049 near 1), so a
    row whose fp16 norm is within ``NORM_TOLERANCE - 2**-11`` of 1 is within tolerance; only the others (and
    overflows) are measured again in float32, so ``NORM_TOLERANCE`` is applied exactly.
    """
    if block.dtype != torch.float16:
        return torch.linalg.vector_norm(block.float(), dim=1)
    norms = torch.linalg.vector_norm(block, dim=1).float()
    suspect = ~((norms - 1.0).abs() <= NORM_TOLERANCE - 2.0**-11)  # also catches inf / nan
    if bool(suspect.any()):
        norms[suspect] = torch.linalg.vector_norm(block[suspect].float(), dim=1)
    return norms


def import_embeddings(
    src: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str,
    backend: str | dict[str, Any] = "exact",
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    id_column: str | None = None,
    caption_column: str = "caption",
    key_column: str | None = None,
    overwrite: bool = False,
    verify: bool | None = None,
    image_root: str | os.PathLike | None = None,
    verify_samples: int = 64,
) -> Path:
    """Make the memory ``out`` from clip-retrieval embeddings in ``src`` encoded by ``backbone``.

    ``id_column``: a metadata column of unique integer pair ids (id scheme ``column:<name>``, comparable
    with sources that declare an id column); else, for parts written by :func:`export_memory` (which
    records the memory's id scheme in each), the exported ids under that scheme (an export re-imported is
    the same memory); else ids are derived from each row's key (``key_column``, else the metadata's ``key``
    or ``image_path`` column, else ``<part>:<row>``; id scheme ``import:<that>``).
    Resumable: re-run with the same arguments after a kill.

    The backbone (:func:`verify_backbone`): ``verify=None`` re-encodes ``verify_samples`` sampled captions
    (and their images, where the keys are image paths found, under ``image_root`` if relative) when the
    backbone is a local directory, ``True`` also loads a hub name, ``False`` never: the rows must match the
    re-encoding (median cosine >= ``VERIFY_COSINE``) and the memory records the backbone's real fingerprint;
    unverified, it is recorded as declared.
    """
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise RecoMemoryError(f"memory {out} already exists: choose another --out or pass --overwrite")
    check_buildable(backend)
    parts, dim, key_source, exported_scheme = _scan(src, id_column, caption_column, key_column)
    backend_from_spec(backend, dim)  # its settings against the dim, before any row is streamed (as build)
    total = sum(p["rows"] for p in parts)
    if id_column is None and exported_scheme is not None:  # our own export: its ids and their scheme back
        id_column, id_scheme = "id", exported_scheme
    else:
        id_scheme = f"column:{id_column}" if id_column is not None else f"import:{key_source}"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial"
    plan = {
        "source": str(src.resolve()),
        "parts": parts,
        "dim": dim,
        "backbone": backbone,
        "id_scheme": id_scheme,
        "caption_column": caption_column,
        "key_source": key_source,
        "backend": backend,  # a resumed import keeps an index already built: it must be this backend's
        "train_size": train_size,
    }
    progress = _read_progress(work)
    if progress is not None and progress.get("plan") != plan and progress.get("parts_done", 0) == 0:
        progress = None  # the other import copied nothing: nothing to keep
    if progress is not None and progress.get("plan") != plan:
        raise RecoMemoryError(
            f"{work} holds an interrupted import with other arguments or another source "
            f"({plan_diff(progress.get('plan') or {}, plan)}): re-run that import, or delete that folder to "
            "start over"
        )
    if progress is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        progress = {"plan": plan, "parts_done": 0, "normalised": {"image": 0, "text": 0}}
        for name in ("image_emb", "text_emb"):
            RowWriter(work / f"{name}.npy", np.float16, (total, dim)).close()
        RowWriter(work / "ids.npy", np.int64, (total,)).close()
        _write_progress(work, progress)
    arrays = {name: RowWriter(work / f"{name}.npy") for name in ("image_emb", "text_emb", "ids")}
    start = sum(p["rows"] for p in parts[: progress["parts_done"]])
    # the two sides' reads, norms and writes (which release the GIL) overlap each other and the metadata's work
    with ThreadPoolExecutor(max_workers=2) as pool:
        for index in range(progress["parts_done"], len(parts)):
            suffix, rows = parts[index]["suffix"], parts[index]["rows"]
            copies = {
                "image": pool.submit(
                    _copy_rows, src / "img_emb" / f"img_emb_{suffix}.npy", arrays["image_emb"], start
                ),
                "text": pool.submit(
                    _copy_rows, src / "text_emb" / f"text_emb_{suffix}.npy", arrays["text_emb"], start
                ),
            }
            try:
                ids, captions, keys = _read_meta(
                    src / "metadata" / f"metadata_{suffix}.parquet",
                    suffix,
                    id_column,
                    caption_column,
                    key_source,
                    id_scheme,
                )
            finally:  # a copy's error is raised here
                fixed = {side: copy.result() for side, copy in copies.items()}
            arrays["ids"].write(start, ids)  # in the page cache: a killed process loses none of it
            _write_part_meta(work / f"meta_{index:06d}.json", captions, keys)
            start += rows
            progress["parts_done"] = index + 1
            progress["normalised"] = {m: progress["normalised"][m] + fixed[m] for m in fixed}
            _write_progress(work, progress)
    for array in arrays.values():
        array.close()
    ids = np.load(work / "ids.npy", mmap_mode="r")  # 8 bytes a row: read as the metadata is written
    if id_column is not None:
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = int(unique[counts > 1][0])
            raise RecoMemoryError(
                f"{src}: column {id_column!r} holds id {dup} {int(counts[counts > 1][0])} times (and "
                f"{int((counts > 1).sum())} ids repeat in all): ids must be unique, fix the metadata or import "
                "without --id_column"
            )
    _write_metadata_parts(work, ids, len(parts))
    fingerprint = verify_backbone(work, backbone, dim, verify, image_root, verify_samples)
    finish_memory(
        work,
        backend,
        fingerprint,
        f"{src} ({total} pairs in {len(parts)} parts, imported)",
        train_size,
        extra={
            "id_scheme": id_scheme,
            "normalised_rows": progress["normalised"],
            "imported_parts": len(parts),
        },
        resume=True,
    )
    for index in range(len(parts)):
        (work / f"meta_{index:06d}.json").unlink()
    (work / _PROGRESS).unlink()
    replace_directory(work, out)
    return out


def _write_metadata_parts(work: Path, ids: np.ndarray, n_parts: int) -> None:
    """``metadata.parquet`` written part by part (a row group each): captions are never all in RAM."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("caption", pa.string()), ("key", pa.string())])
    start = 0

    def write(tmp: Path) -> None:
        nonlocal start
        with pq.ParquetWriter(tmp, schema) as writer:
            for index in range(n_parts):
                part = json.loads((work / f"meta_{index:06d}.json").read_text())
                stop = start + len(part["caption"])
                writer.write_table(
                    pa.table(
                        {"id": ids[start:stop], "caption": part["caption"], "key": part["key"]}, schema=schema
                    )
                )
                start = stop

    atomic_write(work / "metadata.parquet", write)


def verify_backbone(
    work: Path,
    backbone: str,
    dim: int,
    verify: bool | None,
    image_root: str | os.PathLike | None = None,
    samples: int = 64,
) -> dict[str, Any]:
    """The imported memory's backbone fingerprint: verified by re-encoding a sample of its pairs, or declared.

    Captions are always at hand (the metadata); images where the keys are paths of existing files. Rows
    that do not match the named backbone are refused; a backbone that cannot be loaded leaves the memory
    declared (``verify=None``) or is an error (``verify=True``).
    """
    import pyarrow.parquet as pq

    from reco_lightning.encoders import FrozenEncoder

    # a local directory declared by a relative path or an absolute one is the same backbone: record it absolute
    named = str(Path(backbone).resolve()) if Path(backbone).is_dir() else backbone
    declared = {"name_or_path": named, "dim": dim, "declared": True}
    if verify is False or (verify is None and not Path(backbone).is_dir()):
        return declared
    try:
        model = FrozenEncoder(backbone)
    except Exception as err:  # unreachable hub name, not a CLIP directory
        if verify:
            raise RecoMemoryError(f"cannot verify the backbone {backbone!r}: {err}") from err
        return declared
    if model.dim != dim:
        raise RecoMemoryError(
            f"the embeddings have dim {dim} but backbone {backbone!r} has dim {model.dim}: name the backbone that "
            "encoded them"
        )
    meta = pq.read_table(work / "metadata.parquet", columns=["caption", "key"])
    rows = np.sort(np.random.default_rng(0).choice(meta.num_rows, min(samples, meta.num_rows), replace=False))
    picked = meta.take(rows)
    checked: dict[str, Any] = {}
    text = model.encode_captions(picked.column("caption").to_pylist()).numpy()
    checked["text"] = _median_cosine(text, np.load(work / "text_emb.npy", mmap_mode="r")[rows])
    images, image_rows = _reachable_images(picked.column("key").to_pylist(), image_root)
    if images:
        encoded = model.encode_images(model.preprocess_images(images)).numpy()
        stored = np.load(work / "image_emb.npy", mmap_mode="r")[rows[image_rows]]
        checked["image"] = _median_cosine(encoded, stored)
    for side, (cosine, n) in checked.items():
        if cosine < VERIFY_COSINE:
            raise RecoMemoryError(
                f"the {side} embeddings do not match backbone {backbone!r}: median cosine {cosine:.3f} between {n} "
                f"stored rows and their re-encoding (a match gives >= {VERIFY_COSINE}): name the backbone that "
                "encoded them, or import with --verify false to record it as declared"
            )
    verified = {side: {"rows": n, "median_cosine": round(cosine, 4)} for side, (cosine, n) in checked.items()}
    return {**model.fingerprint, "verified": verified}


def _median_cosine(encoded: np.ndarray, stored: np.ndarray) -> tuple[float, int]:
    stored = np.asarray(stored, dtype=np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    return float(np.median((encoded * stored).sum(axis=1))), len(stored)


def _reachable_images(keys: list[str], root: str | os.PathLike | None) -> tuple[list[Any], list[int]]:
    """The images of ``keys`` that are paths of readable image files (relative ones under ``root``)."""
    from PIL import Image

    images, found = [], []
    for index, key in enumerate(keys):
        path = Path(key)
        if not path.is_absolute():
            if root is None:
                continue
            path = Path(root) / path
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp", ".bmp") or not path.is_file():
            continue
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError:
            continue
        found.append(index)
    return images, found


def _read_progress(work: Path) -> dict[str, Any] | None:
    path = work / _PROGRESS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _write_progress(work: Path, progress: dict[str, Any]) -> None:
    atomic_write_text(work / _PROGRESS, json.dumps(progress, indent=1))


def _write_part_meta(path: Path, captions: list[str], keys: list[str]) -> None:
    atomic_write_text(path, json.dumps({"caption": captions, "key": keys}))


def export_memory(memory_dir: str | os.PathLike, out: str | os.PathLike, part_size: int = 1_000_000) -> Path:
    """Write the memory ``memory_dir`` into ``out`` in clip-retrieval's layout: fp16 parts of ``part_size`` rows.

    Each file is written to a temp name and renamed; a part's metadata (id, caption, key, and the memory's
    id scheme in the parquet metadata, so that importing the parts gives the same ids back) goes last, so a
    part is complete iff its metadata file exists. Resumable: ``out/export.json`` records what is being
    exported while it runs, and a re-run of the same export skips the complete parts (another export into
    that folder is refused). ``out`` must not hold parts of anything else.
    """
    import pyarrow.parquet as pq

    if part_size < 1:
        raise RecoMemoryError(f"part_size must be at least 1, got {part_size}")
    store = MemoryStore.open(memory_dir, load_indexes=False)
    out = Path(out)
    plan = {"memory": str(Path(memory_dir).resolve()), "identity": store.identity, "part_size": part_size}
    marker = out / "export.json"
    if not marker.is_file():
        for folder, _ in _FOLDERS:
            if (out / folder).is_dir() and any((out / folder).iterdir()):
                raise RecoMemoryError(f"{out / folder} is not empty: export into a new folder")
        out.mkdir(parents=True, exist_ok=True)
    found = claim_plan(marker, plan)
    if found is not None:
        raise RecoMemoryError(
            f"{out} holds an interrupted export of {found.get('memory')} (part_size {found.get('part_size')}): "
            "re-run that export, or export into a new folder"
        )
    for folder, _ in _FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    meta = pq.ParquetFile(Path(memory_dir) / "metadata.parquet")
    scheme = store.manifest.get("id_scheme")
    count = len(store)
    n_parts = -(-count // part_size)
    width = max(4, len(str(n_parts - 1)))
    for index in range(n_parts):
        lo, hi = index * part_size, min(count, (index + 1) * part_size)
        suffix = f"{index:0{width}d}"
        if (out / "metadata" / f"metadata_{suffix}.parquet").is_file():
            continue  # complete: written by the run this one resumes
        for folder, rows in (("img_emb", store.image_embeddings), ("text_emb", store.text_embeddings)):
            atomic_write(
                out / folder / f"{folder}_{suffix}.npy",
                lambda tmp, r=rows, a=lo, b=hi: _save_rows(tmp, r, a, b),
            )
        part = _metadata_rows(meta, lo, hi)
        if scheme is not None:  # an import of this export takes its ids back under the same scheme
            part = part.replace_schema_metadata({**(part.schema.metadata or {}), _ID_SCHEME_KEY: scheme})
        atomic_write(
            out / "metadata" / f"metadata_{suffix}.parquet", lambda tmp, t=part: pq.write_table(t, tmp)
        )
    marker.unlink()
    return out


def _metadata_rows(meta: Any, lo: int, hi: int) -> Any:
    """Rows ``[lo, hi)`` of a ParquetFile (id, caption, key), reading only the row groups that hold them."""
    import pyarrow as pa

    tables, start = [], 0
    for group in range(meta.num_row_groups):
        rows = meta.metadata.row_group(group).num_rows
        if start < hi and start + rows > lo:
            table = meta.read_row_group(group, columns=["id", "caption", "key"])
            tables.append(table.slice(max(0, lo - start), min(hi, start + rows) - max(lo, start)))
        start += rows
    return pa.concat_tables(tables)


def _save_rows(path: Path, rows: np.ndarray, lo: int, hi: int) -> None:
    """``rows[lo:hi]`` as an fp16 .npy, block by block (a part is never whole in RAM, nor mapped)."""
    with RowWriter(path, np.float16, (hi - lo, rows.shape[1])) as target:
        target.copy(0, rows, lo, hi, block=_BLOCK)
