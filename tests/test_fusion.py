import pytest
import torch

from reco_lightning.fusion import FusionTransformer


def test_output_is_unit_norm_query_shaped():
    fusion = FusionTransformer(16, num_heads=4)
    out = fusion(torch.randn(3, 16), torch.randn(3, 5, 16))
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_paper_sized_single_layer_has_about_3_2m_parameters():
    n = sum(p.numel() for p in FusionTransformer(512).parameters())
    assert 3.0e6 < n < 3.3e6


def test_masked_neighbours_do_not_change_the_output():
    torch.manual_seed(0)
    fusion = FusionTransformer(16, num_heads=4).eval()
    q, r = torch.randn(2, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    r2 = r.clone()
    r2[1, 3:] = 100.0
    out, out2 = fusion(q, r, mask), fusion(q, r2, mask)
    assert torch.allclose(out, out2, atol=1e-5)
    assert not torch.allclose(fusion(q, r2), out2, atol=1e-3), "without the mask the junk is read"


def test_all_neighbours_masked_still_works():
    fusion = FusionTransformer(8, num_heads=2)
    out = fusion(torch.randn(2, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_width_projection_residual_and_layers():
    fusion = FusionTransformer(16, width=32, num_layers=2, num_heads=4, residual=True)
    assert len(fusion.encoder.layers) == 2
    assert fusion(torch.randn(2, 16), torch.randn(2, 3, 16)).shape == (2, 16)
    zero = FusionTransformer(8, num_heads=2, residual=True)
    for p in zero.proj_out.parameters() if isinstance(zero.proj_out, torch.nn.Linear) else []:
        p.data.zero_()
    with torch.no_grad():
        zero.norm.weight.zero_(), zero.norm.bias.zero_()
    q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    assert torch.allclose(zero(q, torch.randn(2, 3, 8)), q, atol=1e-5), (
        "residual returns the query when the update is 0"
    )


def test_gradients_reach_every_parameter():
    fusion = FusionTransformer(8, num_heads=2)
    fusion(torch.randn(4, 8), torch.randn(4, 3, 8)).sum().backward()
    assert all(p.grad is not None for p in fusion.parameters())


def test_bad_heads_and_shapes_are_refused():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        FusionTransformer(10, num_heads=4)
    with pytest.raises(ValueError, match=r"expected query \[B, D\]"):
        FusionTransformer(8, num_heads=2)(torch.randn(8), torch.randn(1, 2, 8))
