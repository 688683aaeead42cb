"""`reco memory import` / `export`: clip-retrieval's embeddings layout to and from our memory."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory import MemoryStore, interop
from reco_lightning.memory.interop import export_memory, import_embeddings

DIM, SIZES = 16, (7, 3, 11)


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_clip_retrieval(root: Path, sizes=SIZES, dim: int = DIM, seed: int = 0) -> Path:
    """Three uneven parts; part 1's rows are scaled (not unit norm), part 0's image rows are fp32."""
    rng = np.random.default_rng(seed)
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True)
    start = 0
    for i, n in enumerate(sizes):
        img, text = _unit(rng, n, dim), _unit(rng, n, dim)
        if i == 1:
            img, text = img * 3.0, text * 0.5
        np.save(root / "img_emb" / f"img_emb_{i}.npy", img if i == 0 else img.astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{i}.npy", text.astype(np.float16))
        rows = range(start, start + n)
        pq.write_table(
            pa.table(
                {
                    "image_path": [f"images/{r:04d}.jpg" for r in rows],
                    "caption": [f"caption {r}" for r in rows],
                    "uid": pa.array([1000 + r for r in rows], type=pa.int64()),
                }
            ),
            root / "metadata" / f"metadata_{i}.parquet",
        )
        start += n
    return root


def expected_rows(src: Path, folder: str) -> np.ndarray:
    out = []
    for i in range(len(SIZES)):
        rows = np.load(src / folder / f"{folder}_{i}.npy").astype(np.float32)
        norms = np.linalg.norm(rows, axis=1)
        off = np.abs(norms - 1) > 1e-3
        rows[off] /= norms[off, None]
        out.append(rows.astype(np.float16))
    return np.concatenate(out)


def test_import_keeps_rows_ids_and_captions_in_part_order(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    out = import_embeddings(src, tmp_path / "memory", backbone="some/clip", id_column="uid")
    store = MemoryStore.open(out)
    assert len(store) == sum(SIZES) and store.dim == DIM
    np.testing.assert_array_equal(np.asarray(store.image_embeddings), expected_rows(src, "img_emb"))
    np.testing.assert_array_equal(np.asarray(store.text_embeddings), expected_rows(src, "text_emb"))
    np.testing.assert_array_equal(np.asarray(store.ids), 1000 + np.arange(sum(SIZES)))
    meta = pq.read_table(out / "metadata.parquet").to_pydict()
    assert meta["caption"] == [f"caption {r}" for r in range(sum(SIZES))]
    assert meta["key"] == [f"images/{r:04d}.jpg" for r in range(sum(SIZES))]
    assert meta["id"] == list(1000 + np.arange(sum(SIZES)))
    assert store.fingerprint == {"name_or_path": "some/clip", "dim": DIM, "declared": True}
    assert store.manifest["normalised_rows"] == {"image": SIZES[1], "text": SIZES[1]}
    assert store.manifest["id_scheme"] == "column:uid"
    _scores, rows = store.index("image").search(np.asarray(store.image_embeddings[:4], dtype=np.float32), 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(4))
    assert not list(tmp_path.glob(".memory.partial*"))


def test_ids_are_derived_from_image_paths_without_an_id_column(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    store = MemoryStore.open(import_embeddings(src, tmp_path / "memory", backbone="some/clip"))
    assert store.manifest["id_scheme"] == "import:image_path"
    ids = np.asarray(store.ids)
    assert len(set(ids.tolist())) == len(ids) and (ids >= 0).all()
    again = MemoryStore.open(import_embeddings(src, tmp_path / "again", backbone="some/clip"))
    np.testing.assert_array_equal(np.asarray(again.ids), ids)


def test_missing_metadata_part_is_refused_by_name(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    (src / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(RecoMemoryError, match=r"part 1 has no .*metadata_1\.parquet"):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip")
    assert not (tmp_path / "memory").exists() and not (tmp_path / ".memory.partial").exists()


def test_index_settings_that_cannot_fit_the_rows_dim_are_refused_before_streaming(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    with pytest.raises(RecoMemoryError, match=r"m=7 must divide dim=16"):
        backend = {"class_path": "ivfpq", "init_args": {"m": 7}}
        import_embeddings(src, tmp_path / "memory", backbone="some/clip", backend=backend)
    assert not (tmp_path / "memory").exists() and not (tmp_path / ".memory.partial").exists()


def test_short_metadata_part_is_refused_by_name(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    path = src / "metadata" / "metadata_2.parquet"
    pq.write_table(pq.read_table(path).slice(0, SIZES[2] - 1), path)
    with pytest.raises(RecoMemoryError, match=r"metadata_2\.parquet has 10 rows but .*img_emb_2\.npy has 11"):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip")


def test_misaligned_and_odd_dim_parts_are_refused(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    np.save(src / "text_emb" / "text_emb_1.npy", np.ones((SIZES[1] + 1, DIM), np.float16))
    with pytest.raises(RecoMemoryError, match=r"img_emb_1\.npy has 3 rows but .*text_emb_1\.npy has 4"):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip")
    np.save(src / "text_emb" / "text_emb_1.npy", np.ones((SIZES[1], DIM), np.float16))
    np.save(src / "img_emb" / "img_emb_2.npy", np.ones((SIZES[2], DIM + 1), np.float16))
    np.save(src / "text_emb" / "text_emb_2.npy", np.ones((SIZES[2], DIM + 1), np.float16))
    with pytest.raises(RecoMemoryError, match=r"img_emb_2\.npy .* dims 17 / 17 but the parts before have 16"):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip")


def test_duplicate_declared_ids_are_refused(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    path = src / "metadata" / "metadata_2.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(2, "uid", pa.array([1000] * SIZES[2], type=pa.int64())), path)
    with pytest.raises(RecoMemoryError, match="ids must be unique"):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip", id_column="uid")


def _files(memory: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in memory.iterdir() if p.suffix in (".npy", ".parquet")}
    manifest = json.loads((memory / "manifest.json").read_text())
    manifest.pop("created")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.mark.parametrize(
    ("where", "copied_again"),
    [
        ("_write_progress", ["img_emb_2.npy", "text_emb_2.npy"]),  # killed once part 1 is recorded
        (
            "_write_part_meta",
            ["img_emb_1.npy", "text_emb_1.npy", "img_emb_2.npy", "text_emb_2.npy"],
        ),  # inside it
    ],
)
def test_killed_import_resumes_to_the_files_of_an_uninterrupted_one(
    tmp_path, monkeypatch, where, copied_again
):
    src = make_clip_retrieval(tmp_path / "src")
    whole = import_embeddings(src, tmp_path / "whole", backbone="some/clip")

    real, calls = getattr(interop, where), []

    def killed_in_part_1(*args):
        real(*args)
        calls.append(args)
        if len(calls) == (3 if where == "_write_progress" else 2):  # progress is also written at the start
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(interop, where, killed_in_part_1)
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip")
    assert not (tmp_path / "memory").exists()
    monkeypatch.setattr(interop, where, real)

    copied = []
    real_copy = interop._copy_rows
    monkeypatch.setattr(
        interop, "_copy_rows", lambda s, t, start: copied.append(s.name) or real_copy(s, t, start)
    )
    resumed = import_embeddings(src, tmp_path / "memory", backbone="some/clip")
    assert copied == copied_again
    assert _files(resumed) == _files(whole)
    assert set(_files(whole)) == {
        "image_emb.npy", "text_emb.npy", "ids.npy", "metadata.parquet", "manifest.json"
    }  # fmt: skip


def _interrupt_in_part(monkeypatch, part: int) -> None:
    """The next import stops (KeyboardInterrupt) while writing part ``part``'s metadata."""
    real, calls = interop._write_part_meta, []

    def stopped(*args):
        calls.append(args)
        if len(calls) == part + 1:
            raise KeyboardInterrupt("stopped")
        real(*args)

    monkeypatch.setattr(interop, "_write_part_meta", stopped)


def test_resume_with_other_arguments_is_refused_naming_them(tmp_path, monkeypatch):
    src = make_clip_retrieval(tmp_path / "src")
    _interrupt_in_part(monkeypatch, 1)  # part 0 copied: something to keep
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip")
    monkeypatch.undo()
    with pytest.raises(
        RecoMemoryError, match=r"other arguments or another source \(backbone: 'some/clip' -> 'other/clip'\)"
    ):
        import_embeddings(src, tmp_path / "memory", backbone="other/clip")


def test_an_import_stopped_before_its_first_part_is_taken_over_by_other_arguments(tmp_path, monkeypatch):
    src = make_clip_retrieval(tmp_path / "src")
    _interrupt_in_part(monkeypatch, 0)  # nothing copied yet
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip")
    monkeypatch.undo()
    memory = import_embeddings(src, tmp_path / "memory", backbone="other/clip")
    whole = import_embeddings(src, tmp_path / "whole", backbone="other/clip")
    assert _files(memory) == _files(whole)


def test_export_then_import_round_trips(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    first = import_embeddings(src, tmp_path / "memory", backbone="some/clip", id_column="uid")
    exported = export_memory(first, tmp_path / "exported", part_size=8)
    assert sorted(p.name for p in (exported / "img_emb").iterdir()) == [
        f"img_emb_{i:04d}.npy" for i in range(3)
    ]
    assert np.load(exported / "img_emb" / "img_emb_0002.npy").shape == (sum(SIZES) - 16, DIM)
    back = import_embeddings(exported, tmp_path / "back", backbone="some/clip")  # ids and scheme recorded
    a, b = MemoryStore.open(first), MemoryStore.open(back)
    assert a.manifest["id_scheme"] == b.manifest["id_scheme"] == "column:uid"
    named = import_embeddings(exported, tmp_path / "named", backbone="some/clip", id_column="id")
    assert MemoryStore.open(named).manifest["id_scheme"] == "column:id"  # a named column wins
    np.testing.assert_array_equal(np.asarray(MemoryStore.open(named).ids), np.asarray(a.ids))
    np.testing.assert_array_equal(np.asarray(b.image_embeddings), np.asarray(a.image_embeddings))
    np.testing.assert_array_equal(np.asarray(b.text_embeddings), np.asarray(a.text_embeddings))
    np.testing.assert_array_equal(np.asarray(b.ids), np.asarray(a.ids))
    assert b.manifest["normalised_rows"] == {"image": 0, "text": 0}
    assert pq.read_table(back / "metadata.parquet").equals(pq.read_table(first / "metadata.parquet"))


def test_cli_import_and_export(tmp_path, capsys):
    from reco_lightning.cli import main

    src = make_clip_retrieval(tmp_path / "src")
    main(["memory", "import", str(src), "--out", str(tmp_path / "memory"), "--backbone", "some/clip"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"memory written to {tmp_path / 'memory'}: 21 rows from 3 parts")
    assert "3 image and 3 text rows normalised" in line
    main(
        [
            "memory",
            "export",
            str(tmp_path / "memory"),
            "--out",
            str(tmp_path / "exported"),
            "--part_size",
            "10",
        ]
    )
    assert capsys.readouterr().out.strip().endswith("21 rows in 3 parts")
    assert len(list((tmp_path / "exported" / "metadata").glob("metadata_*.parquet"))) == 3


def _declared_memory(tmp_path: Path, dim: int, name: str) -> Path:
    rng = np.random.default_rng(1)
    src = tmp_path / f"src{dim}"
    for folder in ("img_emb", "text_emb", "metadata"):
        (src / folder).mkdir(parents=True)
    np.save(src / "img_emb" / "img_emb_0.npy", _unit(rng, 20, dim).astype(np.float16))
    np.save(src / "text_emb" / "text_emb_0.npy", _unit(rng, 20, dim).astype(np.float16))
    pq.write_table(
        pa.table({"caption": [f"c{i}" for i in range(20)]}), src / "metadata" / "metadata_0.parquet"
    )
    return import_embeddings(
        src, tmp_path / f"memory{dim}", backbone=name, verify=False
    )  # declared on purpose


def test_model_opens_a_declared_memory_of_its_dim_with_one_warning(tiny_dir, tmp_path):
    from reco_lightning.encoders import FrozenCLIP
    from reco_lightning.model import RecoModule

    backbone = str(tiny_dir / "clip")
    dim = FrozenCLIP(backbone).dim
    memory = _declared_memory(tmp_path, dim, "openai/clip-vit-base-patch32")
    module = RecoModule(backbone=backbone, memory=str(memory), k=4, fusion_config={"num_heads": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup("fit")
        module.set_memory(str(memory))  # the same memory again: no second warning
    declared = [w for w in caught if "declared, not verified" in str(w.message)]
    assert len(declared) == 1
    assert "openai/clip-vit-base-patch32" in str(declared[0].message)
    assert module.retriever is not None

    other = _declared_memory(tmp_path, dim + 8, backbone)
    with pytest.raises(RecoMemoryError, match=f"has dim {dim + 8} but the backbone"):
        module.set_memory(str(other))


def test_concat_of_imported_memories_checks_their_declared_backbones(tmp_path):
    src = make_clip_retrieval(tmp_path / "src")
    a = import_embeddings(src, tmp_path / "a", backbone="some/clip")
    b = import_embeddings(src, tmp_path / "b", backbone="another/clip")
    with pytest.raises(
        RecoMemoryError, match=r"built with different backbones \(another/clip vs some/clip\)"
    ):
        MemoryStore.concat([a, b], tmp_path / "ab")
    both = MemoryStore.open(MemoryStore.concat([a, a], tmp_path / "aa"), load_indexes=False)
    one = MemoryStore.open(a, load_indexes=False)
    np.testing.assert_array_equal(
        np.asarray(both.image_embeddings), np.concatenate([one.image_embeddings] * 2)
    )
    np.testing.assert_array_equal(np.asarray(both.ids), np.concatenate([one.ids] * 2))
    assert both.fingerprint == one.fingerprint and both.fingerprint["declared"]
    captions = pq.read_table(tmp_path / "aa" / "metadata.parquet").column("caption").to_pylist()
    assert captions == pq.read_table(a / "metadata.parquet").column("caption").to_pylist() * 2


def _encoded_folder(tiny_dir: Path, backbone: str, root: Path, relative: bool) -> Path:
    """tiny_dir's training pairs encoded by ``backbone``, in clip-retrieval's layout (two parts)."""
    import csv

    from PIL import Image

    from reco_lightning.encoders import FrozenCLIP

    model = FrozenCLIP(backbone)
    with open(tiny_dir / "train.csv") as fh:
        pairs = list(csv.DictReader(fh))[:40]
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True)
    for part, chunk in enumerate((pairs[:25], pairs[25:])):
        images = [Image.open(tiny_dir / p["filepath"]).convert("RGB") for p in chunk]
        np.save(
            root / "img_emb" / f"img_emb_{part}.npy",
            model.encode_images(model.preprocess_images(images)).numpy().astype(np.float16),
        )
        np.save(
            root / "text_emb" / f"text_emb_{part}.npy",
            model.encode_captions([p["caption"] for p in chunk]).numpy().astype(np.float16),
        )
        paths = [p["filepath"] if relative else str(tiny_dir / p["filepath"]) for p in chunk]
        pq.write_table(
            pa.table({"image_path": paths, "caption": [p["caption"] for p in chunk]}),
            root / "metadata" / f"metadata_{part}.parquet",
        )
    return root


def test_a_local_backbone_is_verified_by_re_encoding_a_sample(
    tiny_dir, tiny_backbone, other_backbone, tmp_path
):
    from reco_lightning.encoders import FrozenCLIP

    src = _encoded_folder(tiny_dir, tiny_backbone, tmp_path / "src", relative=False)
    memory = import_embeddings(src, tmp_path / "verified", backbone=tiny_backbone, verify_samples=16)
    fingerprint = MemoryStore.open(memory, load_indexes=False).fingerprint
    assert fingerprint["id"] == FrozenCLIP(tiny_backbone).fingerprint["id"] and not fingerprint.get(
        "declared"
    )
    assert fingerprint["verified"]["text"]["rows"] == 16 and fingerprint["verified"]["image"]["rows"] == 16
    assert min(side["median_cosine"] for side in fingerprint["verified"].values()) >= interop.VERIFY_COSINE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified memory opens like a built one: no "declared" warning
        MemoryStore.open(memory, expected_fingerprint=FrozenCLIP(tiny_backbone).fingerprint)

    with pytest.raises(RecoMemoryError, match=r"do not match backbone .*median cosine"):
        import_embeddings(src, tmp_path / "wrong", backbone=other_backbone)
    declared = import_embeddings(src, tmp_path / "declared", backbone=other_backbone, verify=False)
    assert MemoryStore.open(declared, load_indexes=False).fingerprint["declared"]
    # the same local backbone declared by a relative path: the same backbone (concat accepts the two)
    relative = os.path.relpath(other_backbone)
    again = import_embeddings(src, tmp_path / "declared2", backbone=relative, verify=False)
    assert MemoryStore.open(again, load_indexes=False).fingerprint["name_or_path"] == str(
        Path(other_backbone).resolve()
    )
    MemoryStore.concat([declared, again], tmp_path / "both")
    with pytest.raises(RecoMemoryError, match="cannot verify the backbone .*no/such-clip.* does not exist"):
        import_embeddings(src, tmp_path / "unreachable", backbone=str(tmp_path / "no/such-clip"), verify=True)


def test_relative_image_keys_are_checked_under_image_root(tiny_dir, tiny_backbone, tmp_path):
    src = _encoded_folder(tiny_dir, tiny_backbone, tmp_path / "src", relative=True)
    text_only = import_embeddings(src, tmp_path / "a", backbone=tiny_backbone, verify_samples=8)
    assert set(MemoryStore.open(text_only, load_indexes=False).fingerprint["verified"]) == {"text"}
    both = import_embeddings(
        src, tmp_path / "b", backbone=tiny_backbone, verify_samples=8, image_root=tiny_dir
    )
    assert set(MemoryStore.open(both, load_indexes=False).fingerprint["verified"]) == {"text", "image"}


def test_a_killed_export_resumes_to_the_files_of_an_uninterrupted_one(tmp_path, monkeypatch):
    memory = import_embeddings(
        make_clip_retrieval(tmp_path / "src"), tmp_path / "memory", backbone="some/clip"
    )
    whole = export_memory(memory, tmp_path / "whole", part_size=6)  # 21 rows: 4 parts

    real, calls = interop._save_rows, []

    def killed_in_part_2(*args):
        calls.append(args)
        if len(calls) == 5:  # parts 0 and 1 written (2 sides each), killed in part 2
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(interop, "_save_rows", killed_in_part_2)
    with pytest.raises(KeyboardInterrupt):
        export_memory(memory, tmp_path / "out", part_size=6)
    monkeypatch.setattr(interop, "_save_rows", real)
    with pytest.raises(RecoMemoryError, match=r"holds an interrupted export .* \(part_size 6\)"):
        export_memory(memory, tmp_path / "out", part_size=5)
    written = []
    monkeypatch.setattr(interop, "_save_rows", lambda path, *a: written.append(path.name) or real(path, *a))
    resumed = export_memory(memory, tmp_path / "out", part_size=6)
    assert len(written) == 4  # parts 2 and 3 only (temp names: two sides each)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(resumed) == files(whole) and not (resumed / "export.json").exists()
    with pytest.raises(RecoMemoryError, match="is not empty: export into a new folder"):
        export_memory(memory, resumed, part_size=6)
