import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from reco_lightning.encoders import FrozenCLIP, projected_embedding


@pytest.fixture(scope="module")
def clip(tiny_backbone):
    return FrozenCLIP(tiny_backbone)


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(n)]


def test_embeddings_have_backbone_dim_and_unit_norm(clip):
    v = clip.encode_images(clip.preprocess_images(images(3)))
    t = clip.encode_captions(["a red circle.", "a blue square.", "yellow triangle"])
    assert v.shape == t.shape == (3, clip.dim) == (3, 32)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_backbone_is_frozen_and_stays_in_eval_mode(clip):
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not clip.model.training
    px = clip.preprocess_images(images(2))
    assert torch.equal(clip.encode_images(px), clip.encode_images(px)), "no dropout, deterministic"


def test_fingerprint_identifies_weights_not_location(clip, tiny_backbone, other_backbone, tmp_path):
    import shutil

    moved = shutil.copytree(tiny_backbone, tmp_path / "moved")
    assert FrozenCLIP(moved).fingerprint["id"] == clip.fingerprint["id"]
    other = FrozenCLIP(other_backbone).fingerprint
    assert other["id"] != clip.fingerprint["id"] and other["config_sha"] == clip.fingerprint["config_sha"]
    assert set(clip.fingerprint) == {"name_or_path", "family", "config_sha", "weights_sha", "dim", "id"}
    assert clip.fingerprint["family"] == "clip"


def test_projected_output_handles_transformers_4_and_5():
    x = torch.randn(2, 4)
    assert projected_embedding(x, "image") is x  # 4.x: a tensor
    assert projected_embedding(BaseModelOutputWithPooling(pooler_output=x), "text") is x  # 5.x: output object
    with pytest.raises(TypeError, match="projected image embedding"):
        projected_embedding(object(), "image")


def test_missing_backbone_gives_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenCLIP(tmp_path / "nope")
    (tmp_path / "empty").mkdir()  # a directory, but not a saved CLIP
    with pytest.raises(FileNotFoundError, match="cannot load backbone"):
        FrozenCLIP(tmp_path / "empty")
