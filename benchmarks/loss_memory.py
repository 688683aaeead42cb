"""Peak memory of one rank's share of the RECO loss: local (B_local x B_global logits) vs global (B x B).

    python benchmarks/loss_memory.py --out DIR [--global-batch 32768] [--worlds 1 2 4 8 16] [--dim 512]

Each rank of a DDP run gathers the global batch's embeddings and computes the loss of its own rows
against all columns (losses.local_info_nce, the function RecoContrastiveLoss runs); before, every rank
computed the whole B x B loss, which is what world size 1 measures here. Every configuration runs in a
fresh subprocess that builds the gathered tensors (v, t, v_bar, t_bar: [B, dim] float32, the refined
ones requiring grad), computes rank 0's three-term loss and its backward, and reports its peak RSS
above the RSS after the tensors were built: the memory the loss itself needs on one rank. A
configuration that would not fit in this machine's RAM is estimated, not run (marked so).
Writes DIR/loss_memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import psutil


def measure(batch: int, world: int, dim: int) -> dict:
    """Run in this process: rank 0's share of the loss at ``world`` ranks, forward + backward."""
    import torch
    import torch.nn.functional as F

    from reco_lightning.losses import local_info_nce

    torch.manual_seed(0)
    torch.set_num_threads(1)
    v, t = (F.normalize(torch.randn(batch, dim), dim=-1) for _ in range(2))
    v_bar, t_bar = (F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_() for _ in range(2))
    base = psutil.Process().memory_info().rss
    rows = batch // world
    scale = torch.tensor(1 / 0.07)
    local = slice(0, rows)

    def nce(a, b):
        return world * local_info_nce(a[local], b[local], a, b, scale, 0)

    loss = nce(v_bar, t_bar) + nce(v_bar, t) + nce(v, t_bar)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loss_peak_mib": round((peak - base) / 2**20, 1), "loss": float(loss)}


def estimate_mib(batch: int, world: int) -> float:
    """Six logits-sized float32 buffers kept for backward plus two transients per term: a rough bound."""
    return round(8 * (batch // world) * batch * 4 / 2**20, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--global-batch", type=int, default=32768)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return {}

    budget = psutil.virtual_memory().available * 0.7 / 2**20
    rows = []
    for world in args.worlds:
        row = {"global_batch": args.global_batch, "world": world, "local_batch": args.global_batch // world}
        row["logits_per_rank"] = f"{row['local_batch']} x {args.global_batch}"
        row["estimate_mib"] = estimate_mib(args.global_batch, world)
        if row["estimate_mib"] > budget:
            row["measured"] = False
            print(
                f"world {world}: estimated {row['estimate_mib']:.0f} MiB > {budget:.0f} MiB available: not run"
            )
        else:
            cmd = [sys.executable, __file__, "--child", str(args.global_batch), str(world), str(args.dim)]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            row.update(json.loads(out), measured=True)
            print(f"world {world}: {row['logits_per_rank']} logits, peak {row['loss_peak_mib']:.0f} MiB")
        rows.append(row)
    result = {"dim": args.dim, "rows": rows, "available_mib": round(budget / 0.7, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_memory.json").write_text(json.dumps(result, indent=2))
    print("\n| ranks | logits per rank | peak MiB of the loss on one rank |")
    print("|---:|---|---:|")
    for row in rows:
        value = (
            f"{row['loss_peak_mib']:.0f}"
            if row["measured"]
            else f"~{row['estimate_mib']:.0f} (estimate; not run)"
        )
        print(f"| {row['world']} | {row['logits_per_rank']} | {value} |")
    return result


if __name__ == "__main__":
    main()
