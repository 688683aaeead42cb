"""The memory's whitening (reco_lightning.whitening): an answer read from neighbours meets the classes through
the memory's covariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reco_lightning.whitening import MemoryWhitening

DIM = 8


def test_memory_whitening_weighs_the_directions_captions_share_less():
    """Captions that share one strong direction (a phrasing, a collapsed region of names) and differ on a
    weak one: by cosine an answer is nearer the prompt that shares its strong component; whitened, the weak
    direction that tells the concepts apart decides. The map is (answer - mean) @ inverse, unit rows."""
    rng = np.random.default_rng(0)
    shared, concept = rng.standard_normal(400) * 3.0, np.sign(rng.standard_normal(400)) * 0.3
    captions = np.zeros((400, DIM), dtype=np.float32)
    captions[:, 0], captions[:, 1] = shared, concept
    captions[:, 2:] = 0.05 * rng.standard_normal((400, DIM - 2))
    whitening = MemoryWhitening(captions, ridge=1e-3)
    answer = torch.zeros(1, DIM)
    answer[0, 0], answer[0, 1] = -2.0, 0.3  # of concept +1, with a large negative shared component
    prompts = torch.zeros(2, DIM)
    prompts[0, 0], prompts[0, 1] = 2.0, 0.3  # concept +1, the other end of the shared direction
    prompts[1, 0], prompts[1, 1] = -2.0, -0.3  # concept -1, the answer's end of it
    prompts = torch.nn.functional.normalize(prompts, dim=-1)
    plain = torch.nn.functional.normalize(answer, dim=-1) @ prompts.T
    whitened = whitening(answer) @ prompts.T
    assert plain.argmax().item() == 1 and whitened.argmax().item() == 0
    x = captions.astype(np.float64)
    cov = np.cov((x - x.mean(0)).T)
    inverse = np.linalg.inv(cov + 1e-3 * np.linalg.eigvalsh(cov).max() * np.eye(DIM))
    expected = (answer.numpy()[0] - x.mean(0)) @ inverse
    assert np.allclose(whitening(answer)[0].numpy(), expected / np.linalg.norm(expected), atol=1e-4)
    assert torch.allclose(whitening(answer).norm(dim=-1), torch.ones(1))
    with pytest.raises(ValueError, match="ridge must be > 0"):
        MemoryWhitening(captions, ridge=0.0)


def test_of_memory_reads_the_asked_modality_from_a_fixed_draw(tmp_path):
    """``of_memory``: the statistics of the memory's captions (the default) or images, from up to ``sample``
    rows drawn the same way every time (a lookup over images needs the images' covariance)."""
    from reco_lightning.memory import MemoryStore

    rng = np.random.default_rng(2)
    images, captions = rng.standard_normal((30, DIM)), rng.standard_normal((30, DIM)) + 5.0
    store = MemoryStore.open(
        MemoryStore.write(tmp_path / "memory", images.astype(np.float32), captions.astype(np.float32))
    )
    text, image = MemoryWhitening.of_memory(store, 0.01), MemoryWhitening.of_memory(store, 0.01, "image")
    stored = {m: np.asarray(store.embeddings(m), dtype=np.float64) for m in ("text", "image")}
    assert np.allclose(text.mean.numpy(), stored["text"].mean(0), atol=1e-3)
    assert np.allclose(image.mean.numpy(), stored["image"].mean(0), atol=1e-3)
    drawn = MemoryWhitening.of_memory(store, 0.01, sample=10)
    assert np.array_equal(drawn.mean.numpy(), MemoryWhitening.of_memory(store, 0.01, sample=10).mean.numpy())
    assert not np.allclose(drawn.mean.numpy(), text.mean.numpy())
