"""Peak RAM of streaming webdataset shards through ImageTextDataModule: it must not grow with the data.

    python benchmarks/streaming_ram.py --out bench_out/              # 2k vs 10k pairs
    python benchmarks/streaming_ram.py --sizes 2000,50000 --out ...  # any sizes

Why: training data (CC3M, LAION subsets) is far larger than RAM, so the pair stream must hold a bounded
amount (a shuffle buffer, one tar member, a batch) whatever the number of pairs. The benchmark writes
img2dataset-layout shards (``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``, real PIL-encoded images) for each
size, then streams each data set once in its own fresh process (so one run's allocations cannot hide or
inflate the other's) through ``ImageTextDataModule.train_dataloader()`` with a tiny CLIP's processor, the
shuffle buffer and DataLoader workers on, encoding every batch with the frozen tiny CLIP as training would.

RSS is sampled every ``--sample-every`` batches: the main process and its DataLoader workers (their RSS
summed, so pages shared after fork count twice: an upper bound) and their PSS (shared pages split).
The main process's own high-water mark (VmHWM) is read at the end too. ``flat`` is true when the peaks of
the smallest and largest data sets differ by less than 10% or less than 50 MB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["is_flat", "main", "measure_stream", "write_shards"]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")
FLAT_FRACTION, FLAT_MB = 0.10, 50.0


# --- data ---------------------------------------------------------------------------------------------
def _image(rng: random.Random, size: int):
    """A shape on a noisy background: real pixels, so JPEG/PNG sizes and decode costs are realistic."""
    from PIL import Image, ImageDraw

    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    background = tuple(rng.randrange(150, 256) for _ in range(3))
    image = Image.effect_noise((size, size), rng.uniform(10, 40)).convert("RGB")
    image = Image.blend(image, Image.new("RGB", (size, size), background), 0.7)
    draw = ImageDraw.Draw(image)
    r = rng.randrange(size // 5, size // 2 - 2)
    cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, r // 3))
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = max(2, r // 3)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    return image, f"a {colour} {shape} on a light background"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(time.time())
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    directory: str | os.PathLike, pairs: int, per_shard: int = 1000, image_size: int = 64, seed: int = 0
) -> dict[str, Any]:
    """img2dataset-layout shards of ``pairs`` samples (JPEG and PNG alternate); returns their stats."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    total_bytes, shards = 0, 0
    for shard, start in enumerate(range(0, pairs, per_shard)):
        path = directory / f"{shard:05d}.tar"
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(pairs, start + per_shard)):
                key = f"{shard:05d}{i - start:04d}"
                image, caption = _image(rng, image_size)
                buffer = io.BytesIO()
                fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
                image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                _add(tar, f"{key}.{ext}", buffer.getvalue())
                _add(tar, f"{key}.txt", f"{caption}, number {i}".encode())
                _add(tar, f"{key}.json", json.dumps({"id": i, "key": key, "caption": caption}).encode())
        os.replace(tmp, path)
        total_bytes += path.stat().st_size
        shards += 1
    return {"pairs": pairs, "shards": shards, "bytes": total_bytes}


# --- measurement (runs in its own process) ------------------------------------------------------------
def _tree_memory_mb() -> tuple[float, float, int]:
    """(summed RSS, summed PSS, number of processes) of this process and its children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    rss = pss = 0.0
    count = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        count += 1
    return rss / 2**20, pss / 2**20, count


def _vm_hwm_mb() -> float | None:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def measure_stream(
    data: str,
    backbone: str,
    batch_size: int = 64,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    sample_every: int = 5,
    first_batches: int = 5,
    encode: bool = True,
) -> dict[str, Any]:
    """One pass over ``data`` through the data module (as ``fit`` would), sampling RSS as it goes."""
    import torch

    from reco_lightning.data.datamodule import ImageTextDataModule
    from reco_lightning.encoders import FrozenCLIP

    torch.set_num_threads(1)  # the workers decode on the other cores
    rss_start, _, _ = _tree_memory_mb()
    clip = FrozenCLIP(backbone) if encode else None
    datamodule = ImageTextDataModule(
        backbone, train=data, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer
    )
    loader = datamodule.train_dataloader()
    samples: list[dict[str, float]] = []
    pairs = batches = 0
    after_first: tuple[float, float] | None = None
    start = time.perf_counter()
    for batch in loader:
        batch = datamodule.on_after_batch_transfer(batch, 0)
        if clip is not None and "pixel_values" in batch:
            clip.encode_images(batch["pixel_values"])
            clip.encode_texts(batch["input_ids"], batch["attention_mask"])
        batches += 1
        pairs += len(batch["id"])
        if batches == first_batches or batches % sample_every == 0:
            rss, pss, procs = _tree_memory_mb()
            samples.append(
                {"batch": batches, "pairs": pairs, "rss_mb": rss, "pss_mb": pss, "processes": procs}
            )
            if batches == first_batches:
                after_first = (rss, pss)
            if batches % (sample_every * 10) == 0:
                print(f"    {pairs} pairs, {batches} batches, RSS {rss:.0f} MB", flush=True)
    seconds = time.perf_counter() - start
    rss, pss, procs = _tree_memory_mb()  # workers have exited here: main process only
    samples.append({"batch": batches, "pairs": pairs, "rss_mb": rss, "pss_mb": pss, "processes": procs})
    bad = len(datamodule.pop_bad_samples("run"))
    if after_first is None:  # fewer batches than first_batches
        after_first = (samples[0]["rss_mb"], samples[0]["pss_mb"])
    return {
        "pairs_streamed": pairs,
        "bad_samples": bad,
        "batches": batches,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds if seconds > 0 else 0.0,
        "rss_at_start_mb": rss_start,
        "rss_after_first_batches_mb": after_first[0],
        "pss_after_first_batches_mb": after_first[1],
        "peak_rss_mb": max(s["rss_mb"] for s in samples),
        "peak_pss_mb": max(s["pss_mb"] for s in samples),
        "main_process_vmhwm_mb": _vm_hwm_mb(),
        "growth_after_first_batches_mb": max(s["rss_mb"] for s in samples) - after_first[0],
        "samples": samples,
    }


def is_flat(peaks: Sequence[float]) -> bool:
    """Peak RAM is flat when the largest and smallest peaks differ by < 10% (of the smaller) or < 50 MB."""
    low, high = min(peaks), max(peaks)
    return high - low < FLAT_MB or high - low < FLAT_FRACTION * low


# --- driver -------------------------------------------------------------------------------------------
def _run_child(data: Path, backbone: Path, result: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--data",
        str(data),
        "--backbone",
        str(backbone),
        "--result",
        str(result),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
        "--shuffle-buffer",
        str(args.shuffle_buffer),
        "--sample-every",
        str(args.sample_every),
        "--first-batches",
        str(args.first_batches),
    ]
    if args.no_encode:
        command.append("--no-encode")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    subprocess.run(command, check=True, env=env)
    return json.loads(result.read_text())


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Streaming RAM (webdataset shards -> ImageTextDataModule, batch {report['batch_size']}, "
        f"{report['num_workers']} workers, shuffle buffer {report['shuffle_buffer']}; RSS summed over the "
        "main process and its workers)",
        "",
        "| pairs | shards | data MB | peak RSS MB | RSS after first batches MB | peak PSS MB | "
        "main VmHWM MB | seconds | pairs/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['pairs']} | {r['shards']} | {r['bytes'] / 2**20:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['rss_after_first_batches_mb']:.0f} | {r['peak_pss_mb']:.0f} | "
            f"{(r['main_process_vmhwm_mb'] or 0):.0f} | {r['seconds']:.1f} | {r['pairs_per_s']:.0f} |"
        )
    lines += [
        "",
        f"flat (peak difference < 10% or < 50 MB): **{report['flat']}** "
        f"(difference {report['peak_difference_mb']:.1f} MB)",
    ]
    return "\n".join(lines) + "\n"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for the .json and .md")
    p.add_argument("--sizes", default="2000,10000", help="comma list of data set sizes (pairs)")
    p.add_argument("--per-shard", type=int, default=1000, help="pairs per .tar shard")
    p.add_argument("--image-size", type=int, default=64, help="side of the generated images (pixels)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="per-worker shuffle buffer (pairs)")
    p.add_argument("--sample-every", type=int, default=5, help="sample RSS every N batches")
    p.add_argument("--first-batches", type=int, default=5, help="the early RSS sample is after N batches")
    p.add_argument("--no-encode", action="store_true", help="only load batches, do not run the tiny CLIP")
    p.add_argument("--seed", type=int, default=0)
    # internal: one measurement in this process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--backbone", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Generate the data sets, stream each in a fresh process, write ``streaming_ram.{json,md}``."""
    args = _parse(argv)
    from reco_lightning.atomic import atomic_write_text

    if args.child:
        result = measure_stream(
            args.data,
            args.backbone,
            args.batch_size,
            args.num_workers,
            args.shuffle_buffer,
            args.sample_every,
            args.first_batches,
            encode=not args.no_encode,
        )
        atomic_write_text(args.result, json.dumps(result))
        return result

    from reco_lightning.tiny_clip import save_tiny_clip

    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="reco-streaming-") as tmp:
        work = Path(tmp)
        captions = [
            f"a {c} {s} on a light background, number {i}" for c in COLOURS for s in SHAPES for i in range(10)
        ]
        backbone = save_tiny_clip(work / "clip", captions, seed=args.seed)
        for size in sizes:
            print(f"[{size} pairs] writing shards", flush=True)
            start = time.perf_counter()
            stats = write_shards(work / f"data_{size}", size, args.per_shard, args.image_size, args.seed)
            stats["write_s"] = time.perf_counter() - start
            print(f"[{size} pairs] streaming in a fresh process", flush=True)
            measured = _run_child(work / f"data_{size}", backbone, work / f"result_{size}.json", args)
            if measured["pairs_streamed"] != size:
                raise RuntimeError(
                    f"streamed {measured['pairs_streamed']} of {size} pairs: the stream lost data"
                )
            runs.append({**stats, **measured})
            print(
                f"[{size} pairs] peak RSS {measured['peak_rss_mb']:.0f} MB in {measured['seconds']:.1f}s",
                flush=True,
            )
    peaks = [r["peak_rss_mb"] for r in runs]
    report = {
        "runs": runs,
        "by_size": {str(r["pairs"]): {k: v for k, v in r.items() if k != "samples"} for r in runs},
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "shuffle_buffer": args.shuffle_buffer,
        "image_size": args.image_size,
        "per_shard": args.per_shard,
        "encode_with_tiny_clip": not args.no_encode,
        "peak_difference_mb": max(peaks) - min(peaks),
        "peak_ratio": max(peaks) / min(peaks),
        "flat": is_flat(peaks),
        "flat_rule": "max peak - min peak < 10% of the min peak or < 50 MB",
        "cpu_count": os.cpu_count(),
    }
    text = markdown(report)
    atomic_write_text(args.out / "streaming_ram.json", json.dumps(report, indent=2))
    atomic_write_text(args.out / "streaming_ram.md", text)
    print(text)
    return report


if __name__ == "__main__":
    main()
