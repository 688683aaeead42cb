import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from reco_lightning.losses import RecoContrastiveLoss, gather_with_grad, info_nce


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
    loss = RecoContrastiveLoss(init_temperature=0.5)
    out = loss(v, t, vb, tb)
    expected = sum(reference_info_nce(x, y, 2.0) for x, y in ((vb, tb), (vb, t), (v, tb)))
    assert torch.allclose(out["loss"], expected, atol=1e-4)
    assert set(out) == {"loss", "refined", "refined_image", "refined_text"}
    only_refined = RecoContrastiveLoss(init_temperature=0.5, mixed_terms=False)(v, t, vb, tb)
    assert torch.allclose(only_refined["loss"], reference_info_nce(vb, tb, 2.0), atol=1e-4)


def test_temperature_is_learnable_clip_initialised_and_capped():
    loss = RecoContrastiveLoss()
    assert loss.log_scale.requires_grad
    assert loss.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        loss.log_scale.fill_(10.0)
    assert loss.logit_scale.item() == pytest.approx(100.0, rel=1e-5)
    assert not RecoContrastiveLoss(learn_temperature=False).log_scale.requires_grad


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


def _ddp_worker(rank: int, world: int, port: int, v, t, cut: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        loss_fn = RecoContrastiveLoss(learn_temperature=False)
        shard = slice(0, cut) if rank == 0 else slice(cut, len(v))  # world == 2
        loss = _loss_on(model, loss_fn, v[shard], t[shard])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cut", [4, 3], ids=["even", "uneven"])
def test_ddp_two_processes_match_one_process_on_concatenated_batch(tmp_path, cut):
    v, t = unit(8, 8, seed=3), unit(8, 8, seed=4)
    model = _model()
    loss = _loss_on(model, RecoContrastiveLoss(learn_temperature=False), v, t)
    loss.backward()
    single_grads = [p.grad for p in model.parameters()]

    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), v, t, cut, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], loss.detach(), atol=1e-6), "every rank computes the global loss"
        for got, want in zip(result["grads"], single_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-6)
