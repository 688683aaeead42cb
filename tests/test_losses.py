import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from reco_lightning.losses import LossConfig, RecoContrastiveLoss, gather_with_grad, info_nce


def reference_info_nce(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Written out element by element: mean over rows of -log softmax of the matching pair, both ways."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(a[j] @ b[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    return torch.tensor(total / (2 * n))


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_matches_hand_written_reference():
    a, b = unit(6, 8, seed=1), unit(6, 8, seed=2)
    assert torch.allclose(info_nce(a, b, torch.tensor(3.0)), reference_info_nce(a, b, 3.0), atol=1e-5)


def test_info_nce_is_low_for_matching_pairs_and_high_for_shuffled():
    a = unit(8, 16)
    assert info_nce(a, a, torch.tensor(50.0)) < 0.01
    assert info_nce(a, a.roll(1, 0), torch.tensor(50.0)) > 5


def test_reco_loss_is_the_sum_of_three_terms():
    v, t, vb, tb = (unit(5, 8, seed=s) for s in range(4))
    loss = RecoContrastiveLoss(LossConfig(init_temperature=0.5))
    out = loss(v, t, vb, tb)
    expected = sum(reference_info_nce(x, y, 2.0) for x, y in ((vb, tb), (vb, t), (v, tb)))
    assert torch.allclose(out["loss"], expected, atol=1e-4)
    assert set(out) == {"loss", "refined", "refined_image", "refined_text"}
    only_refined = RecoContrastiveLoss(LossConfig(init_temperature=0.5, mixed_terms=False))(v, t, vb, tb)
    assert torch.allclose(only_refined["loss"], reference_info_nce(vb, tb, 2.0), atol=1e-4)


def test_temperature_is_learnable_clip_initialised_and_capped():
    loss = RecoContrastiveLoss()
    assert loss.log_scale.requires_grad
    assert loss.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        loss.log_scale.fill_(10.0)
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(100.0, rel=1e-5)
    assert not RecoContrastiveLoss(LossConfig(learn_temperature=False)).log_scale.requires_grad


def test_temperature_above_the_cap_still_gets_a_gradient():
    """A clamp inside forward would give exactly zero gradient once an optimiser step overshoots the cap,
    freezing the temperature for good; the cap is applied to the parameter after each step instead."""
    v, t, vb, tb = (unit(6, 8, seed=s) for s in range(4))
    loss = RecoContrastiveLoss()
    with torch.no_grad():
        loss.log_scale.fill_(5.0)  # above log(100)
    loss(v, t, vb, tb)["loss"].backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.abs().item() > 0


def reference_soft_nce(a: torch.Tensor, b: torch.Tensor, scale: float, same: torch.Tensor) -> torch.Tensor:
    """Element by element: each row's (and each column's) target is uniform over its positives."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(a[j] @ b[i]) for j in range(n)]
        pos = [j for j in range(n) if same[i, j]]
        for logits in (row, col):
            lse = math.log(sum(math.exp(x) for x in logits))
            total += -sum(logits[j] - lse for j in pos) / len(pos)
    return torch.tensor(total / (2 * n))


def test_duplicates_are_uniform_positives_in_both_directions():
    """Rows with several positives get a uniform target from text to image too (the column branch once
    renormalised a row-normalised matrix, which weighted positives unevenly)."""
    a, b = unit(6, 8, seed=5), unit(6, 8, seed=6)
    same = torch.eye(6, dtype=torch.bool)  # a threshold is not transitive: 0~1 and 1~2, but not 0~2
    for i, j in ((0, 1), (1, 2), (4, 5)):
        same[i, j] = same[j, i] = True
    got = info_nce(a, b, torch.tensor(4.0), same)
    assert torch.allclose(got, reference_soft_nce(a, b, 4.0, same), atol=1e-5)


def test_duplicate_threshold_marks_identical_captions_as_positives():
    v, vb, tb = (unit(6, 8, seed=s) for s in (7, 8, 9))
    t = unit(6, 8, seed=10)
    t[1] = t[0]  # pairs 0 and 1 share a caption
    out = RecoContrastiveLoss(LossConfig(init_temperature=0.5, duplicate_threshold=0.99))(v, t, vb, tb)
    same = torch.eye(6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    expected = sum(reference_soft_nce(x, y, 2.0, same) for x, y in ((vb, tb), (vb, t), (v, tb)))
    assert torch.allclose(out["loss"], expected, atol=1e-4)


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


# --- DDP: 2 processes on the split batch == 1 process on the whole batch -----------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))


def _loss_on(model, loss_fn, v, t):
    v_bar, t_bar = F.normalize(model(v), dim=-1), F.normalize(model(t), dim=-1)
    return loss_fn(v, t, v_bar, t_bar)["loss"]


def _ddp_worker(rank: int, world: int, store: str, v, t, cut: int, threshold, out_dir: str) -> None:
    # a file store, not a TCP port: no free-port race between picking a port and binding it
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        loss_fn = RecoContrastiveLoss(LossConfig(learn_temperature=False, duplicate_threshold=threshold))
        shard = slice(0, cut) if rank == 0 else slice(cut, len(v))  # world == 2
        loss = _loss_on(model, loss_fn, v[shard], t[shard])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank done with every collective before any tears the group down: a rank that exits while
        # its peer still talks to it can abort the peer's gloo threads (SIGABRT, "terminate called ...")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # gloo's threads can still hold work objects (and their tensors) when the interpreter finalizes, which
    # aborts the process about once in 20 runs here (SIGABRT, "terminate called without an active
    # exception"; pytorch/pytorch#179291): the results are on disk, so leave without finalizing
    os._exit(0)


@pytest.mark.parametrize("threshold", [None, 0.99], ids=["plain", "duplicates"])
@pytest.mark.parametrize("cut", [4, 3], ids=["even", "uneven"])
def test_ddp_two_processes_match_one_process_on_concatenated_batch(tmp_path, cut, threshold):
    """Each rank computes only its rows against the global batch (B_local x B_global logits); the ranks'
    mean loss and every rank's gradients equal the single-process loss and gradients."""
    v, t = unit(8, 8, seed=3), unit(8, 8, seed=4)
    t[5] = t[2]  # a duplicate caption across the two ranks' shards
    model = _model()
    loss = _loss_on(
        model, RecoContrastiveLoss(LossConfig(learn_temperature=False, duplicate_threshold=threshold)), v, t
    )
    loss.backward()
    single_grads = [p.grad for p in model.parameters()]

    store = tmp_path / "store"
    mp.start_processes(
        _ddp_worker, args=(2, str(store), v, t, cut, threshold, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    mean = (results[0]["loss"] + results[1]["loss"]) / 2
    assert torch.allclose(mean, loss.detach(), atol=1e-6), "the ranks' shares average to the global loss"
    for result in results:
        for got, want in zip(result["grads"], single_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-6)
