import pytest
import torch

from reco_lightning.fusion import FusionConfig, FusionTransformer


def test_output_is_unit_norm_query_shaped():
    fusion = FusionTransformer(16, FusionConfig(num_heads=4))
    out = fusion(torch.randn(3, 16), torch.randn(3, 5, 16))
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_paper_sized_single_layer_has_about_3_2m_parameters():
    n = sum(p.numel() for p in FusionTransformer(512).parameters())
    assert 3.0e6 < n < 3.3e6


def test_masked_neighbours_do_not_change_the_output():
    torch.manual_seed(0)
    fusion = FusionTransformer(16, FusionConfig(num_heads=4)).eval()
    q, r = torch.randn(2, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    r2 = r.clone()
    r2[1, 3:] = 100.0
    out, out2 = fusion(q, r, mask), fusion(q, r2, mask)
    assert torch.allclose(out, out2, atol=1e-5)
    assert not torch.allclose(fusion(q, r2), out2, atol=1e-3), "without the mask the junk is read"


def test_all_neighbours_masked_still_works():
    fusion = FusionTransformer(8, FusionConfig(num_heads=2))
    out = fusion(torch.randn(2, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_width_projection_residual_and_layers():
    fusion = FusionTransformer(16, FusionConfig(width=32, num_layers=2, num_heads=4, residual=True))
    assert len(fusion.encoder.layers) == 2
    assert fusion(torch.randn(2, 16), torch.randn(2, 3, 16)).shape == (2, 16)
    # residual on: the learned branch starts silent, so the output is the query itself (width != dim too)
    zero = FusionTransformer(8, FusionConfig(width=16, num_heads=2, residual=True))
    q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    assert torch.allclose(zero(q, torch.randn(2, 3, 8)), q, atol=1e-5), (
        "residual returns the query when the update is 0"
    )


@pytest.mark.parametrize("width", [None, 16], ids=["width=dim", "width!=dim"])
def test_residual_returns_the_query_when_the_learned_branch_is_zeroed(width):
    """Whatever the init: zeroing the learned branch's last parameters (final LayerNorm, and proj_out when
    width != dim) leaves residual = the query alone. The zeroing loop must zero them (an earlier version
    iterated over nothing, as proj_out was an Identity, and only the init was checked)."""
    torch.manual_seed(0)
    fusion = FusionTransformer(8, FusionConfig(width=width, num_heads=2, residual=True))
    torch.nn.init.normal_(fusion.norm.weight), torch.nn.init.normal_(fusion.norm.bias)  # a trained branch
    q, r = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), torch.randn(3, 4, 8)
    assert not torch.allclose(fusion(q, r), q, atol=1e-3), "the active branch moves the output"
    zeroed = []
    with torch.no_grad():
        for name, p in fusion.named_parameters():
            if name.startswith(("norm.", "proj_out.")):
                p.zero_()
                zeroed.append(name)
    expected = {"norm.weight", "norm.bias"} | ({"proj_out.weight", "proj_out.bias"} if width else set())
    assert set(zeroed) == expected, f"the zeroing loop zeroed {zeroed}, not the learned branch {expected}"
    assert torch.allclose(fusion(q, r), q, atol=1e-6), "residual returns the query when the update is 0"


def test_gradients_reach_every_parameter():
    fusion = FusionTransformer(8, FusionConfig(num_heads=2))
    fusion(torch.randn(4, 8), torch.randn(4, 3, 8)).sum().backward()
    assert all(p.grad is not None for p in fusion.parameters())


def test_bad_heads_and_shapes_are_refused():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        FusionTransformer(10, FusionConfig(num_heads=4))
    with pytest.raises(ValueError, match=r"expected query \[B, D\]"):
        FusionTransformer(8, FusionConfig(num_heads=2))(torch.randn(8), torch.randn(1, 2, 8))


@pytest.mark.parametrize("layers", [1, 2])
def test_query_only_last_layer_equals_the_whole_encoder(layers):
    """The last layer computes the query position only; outputs and gradients match the full encoder."""
    torch.manual_seed(0)
    fusion = FusionTransformer(32, FusionConfig(num_layers=layers, num_heads=4, dropout=0.0, residual=True))
    torch.nn.init.ones_(fusion.norm.weight)  # make the learned branch matter
    q, r = torch.randn(5, 32), torch.randn(5, 7, 32)
    mask = torch.rand(5, 7) > 0.3

    def full_encoder() -> torch.Tensor:
        tokens = fusion.proj_in(torch.cat([q.unsqueeze(1), r], dim=1))
        types = torch.ones(8, dtype=torch.long)
        types[0] = 0
        tokens = tokens + fusion.type_embedding(types)
        padding = torch.nn.functional.pad(~mask, (1, 0), value=False)
        out = fusion.proj_out(fusion.norm(fusion.encoder(tokens, src_key_padding_mask=padding)[:, 0]))
        return torch.nn.functional.normalize(out + q, dim=-1)

    weights = torch.randn(5, 32)  # a loss whose gradient is not zero (|unit vector|^2 would be)
    want = full_encoder()
    (want * weights).sum().backward()
    want_grads = [p.grad.clone() for p in fusion.parameters()]
    fusion.zero_grad()
    got = fusion(q, r, mask)
    (got * weights).sum().backward()
    assert torch.allclose(got, want, atol=1e-6)
    for name_param, want_grad in zip(fusion.named_parameters(), want_grads, strict=True):
        assert want_grad.abs().sum() > 0, name_param[0]
        assert torch.allclose(name_param[1].grad, want_grad, atol=1e-6), name_param[0]


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_untrained_skips_are_query_plus_weighted_mean_of_valid_neighbours(weight):
    fusion = FusionTransformer(16, FusionConfig(num_heads=4, residual=True, retrieved_skip=weight))
    q, r = torch.randn(3, 16), torch.randn(3, 4, 16)
    mask = torch.tensor([[True, True, True, True], [True, False, True, False], [False] * 4])
    mean = (r * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    want = torch.nn.functional.normalize(q + weight * mean, dim=-1)
    assert torch.allclose(fusion(q, r, mask), want, atol=1e-6)


def test_negative_retrieved_skip_is_refused():
    with pytest.raises(ValueError, match="retrieved_skip is a weight >= 0"):
        FusionTransformer(16, FusionConfig(num_heads=4, retrieved_skip=-0.5))


@pytest.mark.parametrize("width", [None, 32], ids=["width=dim", "width!=dim"])
def test_skips_start_the_fusion_as_query_plus_weighted_mean(width):
    """With the skips on, the untrained fusion is exactly normalize(query + w x mean of neighbours), also
    when projections map a narrower or wider transformer in and out (proj_out's bias once leaked in)."""
    torch.manual_seed(0)
    fusion = FusionTransformer(16, FusionConfig(width=width, num_heads=4, residual=True, retrieved_skip=0.6))
    query = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    retrieved = torch.nn.functional.normalize(torch.randn(5, 3, 16), dim=-1)
    expected = torch.nn.functional.normalize(query + 0.6 * retrieved.mean(1), dim=-1)
    assert torch.allclose(fusion(query, retrieved), expected, atol=1e-6)
