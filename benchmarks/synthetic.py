"""Synthetic unit vectors with CLIP-like statistics, for benchmarking memory backends without a real memory.

Uniform random unit vectors are a poor stand-in for CLIP embeddings: in 512 dimensions every pair of them is
nearly orthogonal and nearest neighbours are barely closer than anything else, which makes approximate
indexes look far worse (and exact search no different) than on real data. CLIP image/text embeddings are

* anisotropic: they share a common mean direction, so the cosine between two random embeddings is about
  0.2-0.5 rather than about 0;
* clustered: semantic groups (dogs, screenshots, product photos, ...) of very different sizes, closer to a
  power law (Zipf) than to equal-sized clusters;
* spread within a cluster along a few directions (variation inside a concept is low-rank: pose, colour,
  background), plus a small isotropic residue.

The generator reproduces these four ingredients: ``x = normalise(a*mean + b*centre[c] + s*basis[c] @ z + e)``
with the cluster ``c`` drawn with probability proportional to ``(c + 1) ** -zipf_exponent``, cluster
centres drawn in a shared lower-dimensional "semantic" subspace with a decaying spectrum, ``z`` a
low-rank Gaussian with a decaying spectrum in a per-cluster basis, and ``e`` isotropic noise. The squared
weights ``a^2, b^2, s^2, noise^2`` are the shares of each ingredient in a vector's (pre-normalisation) energy,
so the cosine between two points of different clusters is close to ``a^2`` and between two points of the same
cluster close to ``a^2 + b^2``.

Everything (mean, centres, bases, cluster sizes) is fixed by ``seed``; database rows and queries are
independent draws from that same distribution (different random streams), so a query is never a copy of a
row. Rows are produced in chunks so N = 1M x 512 needs only the 2 GB output plus a few MB of scratch.

Benchmark data, not part of the library: the benchmarks import it as ``synthetic`` (their folder is on
``sys.path`` when they run as scripts; tests put it there, see tests/test_benchmark_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["clustered_queries", "clustered_unit_vectors"]

_CHUNK = 16384
_DATABASE_STREAM, _QUERY_STREAM = 0, 1


@dataclass(frozen=True)
class _Distribution:
    mean: np.ndarray  # [dim] unit vector shared by all points
    centres: np.ndarray  # [n_clusters, dim] unit vectors
    bases: np.ndarray  # [n_clusters, local_rank, dim] within-cluster directions, pre-scaled by the spectrum
    probs: np.ndarray  # [n_clusters] Zipf cluster probabilities


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _spectrum(rank: int, decay: float) -> np.ndarray:
    """Standard deviations of a power-law spectrum with unit total variance."""
    var = (np.arange(rank) + 1.0) ** -decay
    return np.sqrt(var / var.sum())


def _distribution(
    dim: int, n_clusters: int, zipf_exponent: float, semantic_rank: int, local_rank: int, seed: int
) -> _Distribution:
    rng = np.random.default_rng([seed, 7919])
    mean = _unit(rng.standard_normal(dim))
    # Cluster centres live in a shared semantic subspace (concepts are related to each other), with a
    # decaying spectrum inside it, plus a small full-rank part so no two centres coincide.
    rank = min(semantic_rank, dim)
    semantic = np.linalg.qr(rng.standard_normal((dim, rank)))[0]  # [dim, rank] orthonormal columns
    coords = rng.standard_normal((n_clusters, rank)) * _spectrum(rank, 1.0)
    centres = _unit(_unit(coords @ semantic.T) + 0.3 * _unit(rng.standard_normal((n_clusters, dim))))
    # Remove the mean direction from centres and bases so ``a`` alone controls the shared component.
    centres = _unit(centres - np.outer(centres @ mean, mean))
    r = min(local_rank, dim)
    bases = rng.standard_normal((n_clusters, r, dim)) / np.sqrt(dim)
    bases -= (bases @ mean)[..., None] * mean
    bases *= _spectrum(r, 1.0)[None, :, None]  # so z ~ N(0, I) gives unit expected energy
    probs = (np.arange(n_clusters) + 1.0) ** -zipf_exponent
    probs = rng.permutation(probs / probs.sum())  # cluster ids carry no size order
    return _Distribution(mean, centres.astype(np.float32), bases.astype(np.float32), probs)


def _sample(
    dist: _Distribution,
    n: int,
    weights: tuple[float, float, float, float],
    seed: int,
    stream: int,
    return_labels: bool,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    a, b, s, noise = (float(w) for w in np.sqrt(np.asarray(weights) / np.sum(weights)))
    dim = dist.mean.shape[0]
    out = np.empty((n, dim), dtype=np.float32) if out is None else out
    labels = np.empty(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 104729, stream])
    mean = dist.mean.astype(np.float32)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        c = rng.choice(len(dist.probs), size=stop - start, p=dist.probs)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
        x += a * mean
        x += b * dist.centres[c]
        # Within-cluster low-rank spread: one small matmul per cluster present in the chunk.
        order = np.argsort(c, kind="stable")
        bounds = np.flatnonzero(np.diff(c[order])) + 1
        for rows in np.split(order, bounds):
            z = rng.standard_normal((len(rows), dist.bases.shape[1]), dtype=np.float32)
            x[rows] += s * (z @ dist.bases[c[rows[0]]])
        out[start:stop] = _unit(x)
        labels[start:stop] = c
    return (out, labels) if return_labels else out


def clustered_unit_vectors(
    n: int,
    dim: int,
    n_clusters: int = 1024,
    seed: int = 0,
    *,
    mean_share: float = 0.35,
    cluster_share: float = 0.30,
    spread_share: float = 0.25,
    noise_share: float = 0.10,
    zipf_exponent: float = 1.0,
    semantic_rank: int = 128,
    local_rank: int = 16,
    return_labels: bool = False,
    queries: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised float32 rows [n, dim] with CLIP-like anisotropy, Zipf clusters and low-rank spread.

    The ``*_share`` arguments are the relative energy of the shared mean direction, the cluster centre, the
    within-cluster low-rank spread and the isotropic noise (normalised to sum to 1). ``return_labels`` also
    returns each row's cluster id, for tests and diagnostics. ``queries`` draws from an independent random
    stream of the same distribution (see :func:`clustered_queries`). ``out``: an [n, dim] array (e.g. an fp16
    memmap) filled chunk by chunk instead of a new float32 one, for databases larger than RAM.
    """
    _validate(n, dim, n_clusters, (mean_share, cluster_share, spread_share, noise_share))
    dist = _distribution(dim, n_clusters, zipf_exponent, semantic_rank, local_rank, seed)
    weights = (mean_share, cluster_share, spread_share, noise_share)
    stream = _QUERY_STREAM if queries else _DATABASE_STREAM
    return _sample(dist, n, weights, seed, stream, return_labels, out)


def clustered_queries(
    n: int, dim: int, n_clusters: int = 1024, seed: int = 0, **shape: Any
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Held-out queries from the same distribution as ``clustered_unit_vectors(..., seed=seed)``.

    Same arguments, independent random stream: queries resemble the database (as real queries resemble the
    memory) without being copies of its rows, which would make every index look perfect at top-1.
    """
    return clustered_unit_vectors(n, dim, n_clusters, seed, queries=True, **shape)


def _validate(n: int, dim: int, n_clusters: int, shares: tuple[float, ...]) -> None:
    if n < 0 or dim <= 0 or n_clusters <= 0:
        raise ValueError(
            f"need n >= 0, dim > 0 and n_clusters > 0, got n={n}, dim={dim}, n_clusters={n_clusters}"
        )
    if min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"energy shares must be non-negative with a positive sum, got {shares}")
